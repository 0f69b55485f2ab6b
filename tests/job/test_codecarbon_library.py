"""The CodeCarbon drop-in behaves as a library: the program's logging configuration is left alone, carbond's
messages go to the ``carbond.codecarbon`` stdlib logger and its children; and the rows CodeCarbon fills
(``tracking_mode`` of a failed run, ``country_name`` of a cloud region, ``gpu_ids`` from ``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import yaml

from carbond.codecarbon import EmissionsTracker
from carbond.job.report import location

ROOT = Path(__file__).resolve().parents[2]


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def zoneless(fake_config: Path) -> Path:
    """The fake sensors' config without a zone: carbond.intensity warns zone_unknown (the time zone is UTC)."""
    cfg = yaml.safe_load(fake_config.read_text())
    del cfg["intensity"]
    path = fake_config.with_name("zoneless.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_programs_logging_configuration_is_left_alone(
    fake_config: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Etc/UTC")
    fake_config = zoneless(fake_config)
    structlog.reset_defaults()
    root = logging.getLogger()
    before = (structlog.is_configured(), structlog.get_config(), list(root.handlers), root.level)
    with caplog.at_level(logging.INFO, logger="carbond.codecarbon"):
        tracker = EmissionsTracker(output_dir=str(tmp_path), config=fake_config, log_level="info")
        tracker.start()
        assert tracker.stop() is not None
    after = (structlog.is_configured(), structlog.get_config(), list(root.handlers))
    assert after == before[:3]
    assert root.level == before[3]
    # carbond's own modules (builder, sensors ...) log as children of carbond.codecarbon, at log_level
    names = {r.name for r in caplog.records}
    assert any(n.startswith("carbond.codecarbon.") for n in names), names
    assert all(n.startswith("carbond.codecarbon") for n in names), names
    assert capsys.readouterr().out == ""  # nothing printed into the program's standard output


def test_a_structlog_program_sees_its_own_output_only(fake_config: Path, tmp_path: Path) -> None:
    """A program using structlog's defaults: its events keep their format on stdout; carbond's warnings (the zone
    below is unknown) go to stderr through stdlib logging; log_level=error silences them."""
    cfg = zoneless(fake_config)
    script = textwrap.dedent(
        f"""
        import logging, structlog
        from carbond.codecarbon import EmissionsTracker
        log = structlog.get_logger()
        level = {{}}
        for run, lvl in (("a", None), ("b", "error")):
            t = EmissionsTracker(output_dir={str(tmp_path)!r}, config={str(cfg)!r}, log_level=lvl)
            t.start(); t.stop()
            log.info("mine", run=run)
        print("configured", structlog.is_configured(), logging.getLogger().handlers)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TZ": "Etc/UTC"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("ROCR_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert [line.split("[info     ] ")[1].split()[0] for line in out[:2]] == ["mine", "mine"], out
    assert out[2] == "configured False []"
    assert done.stderr.count("zone_unknown") == 1, done.stderr  # run a's warning; run b at error level says nothing


def test_a_failed_run_keeps_the_tracking_mode_asked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sensors: [rapl]\npaths: {{sysfs: {tmp_path / 'nosys'}}}\n")
    for mode in ("process", "machine"):
        tracker = EmissionsTracker(output_dir=str(tmp_path), config=cfg, tracking_mode=mode, log_level="critical")
        tracker.start()
        assert tracker.stop() is None
    assert [(r["scope"], r["tracking_mode"]) for r in rows(tmp_path / "emissions.csv")] == [
        ("none", "process"),
        ("none", "machine"),
    ]


def test_cloud_regions_name_their_country(fake_config: Path, tmp_path: Path) -> None:
    tracker = EmissionsTracker(
        output_dir=str(tmp_path), config=fake_config, cloud_provider="gcp", cloud_region="europe-west1"
    )
    tracker.start()
    tracker.stop()
    row = rows(tmp_path / "emissions.csv")[0]
    assert (row["country_name"], row["country_iso_code"], row["on_cloud"]) == ("Belgium", "BEL", "Y")
    assert (row["cloud_provider"], row["cloud_region"], row["intensity_zone"]) == (
        "gcp",
        "europe-west1",
        "gcp:europe-west1",
    )
    assert location("aws:eu-west-3")["country_name"] == "France"
    assert location("azure:West Europe")["country_iso_code"] == "NLD"
    # the table names these regions by a city or a US state; the report and the CSV name their country
    assert location("gcp:europe-west10")["country_name"] == "Germany"
    assert location("gcp:us-east2")["country_iso_code"] == "USA"  # not Georgia, the country


@pytest.mark.parametrize(
    ("visible", "gpu_counted"), [("0", True), ("1", False), ("-1,0", False), ("", True), (None, True)]
)
def test_gpu_ids_default_to_cuda_visible_devices(
    fake_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str | None, gpu_counted: bool
) -> None:
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    tracker = EmissionsTracker(output_dir=str(tmp_path), config=fake_config, measure_power_secs=0.2)
    tracker.start()
    tracker.stop()
    row = rows(tmp_path / "emissions.csv")[0]
    assert (float(row["gpu_energy"]) > 0) is gpu_counted, row["gpu_energy"]


def test_gpu_uuids_in_cuda_visible_devices_select_nvml_gpus(tmp_path: Path) -> None:
    """UUIDs, as CUDA_VISIBLE_DEVICES often holds them: only that GPU counts (the fake NVML's two GPUs draw 100 W
    and 300 W; the second's UUID is given)."""
    spec = tmp_path / "nvml.json"
    gpus = [
        {"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-aaaa", "power_w": 100, "energy_counter": True},
        {"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-bbbb", "power_w": 300, "energy_counter": True},
    ]
    spec.write_text(json.dumps({"gpus": gpus}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"sensors: [nvml]\nmeasure_power_secs: 0.2\npue: 1.0\nintensity: {{zone: FR}}\nstate_dir: {tmp_path}\n"
    )
    script = textwrap.dedent(
        f"""
        import time
        from carbond.codecarbon import EmissionsTracker
        t = EmissionsTracker(output_dir={str(tmp_path)!r}, config={str(cfg)!r}, measure_power_secs=0.2)
        t.start(); time.sleep(1.0); t.stop()
        """
    )
    fake = ROOT / "carbond" / "testing" / "nvml_fake"
    env = {
        **os.environ,
        "PYTHONPATH": f"{fake}:{ROOT}",
        "CARBOND_FAKE_NVML": str(spec),
        "CUDA_VISIBLE_DEVICES": "GPU-bbbb",
    }
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    row = rows(tmp_path / "emissions.csv")[0]
    assert row["gpu_count"] == "1", row
    assert float(row["gpu_power"]) == pytest.approx(300, rel=0.1), row["gpu_power"]
