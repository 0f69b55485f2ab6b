"""CodeCarbon 3.3's public API, as its own tests exercise it, on carbond's drop-in (written for carbond): the
public names, tolerant construction, the offline tracker without a country, ``measure_power_secs=0``, the
``force_*`` keywords, the ``codecarbon`` logger and the ``.bak`` of a CSV in another layout."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import carbond.codecarbon as cc
from carbond.codecarbon import EmissionsTracker, OfflineEmissionsTracker
from carbond.codecarbon.options import checked, config_update
from carbond.codecarbon.settings import DEFAULTS
from carbond.config import load
from carbond.intensity.static import lookup
from carbond.job.csvfile import CODECARBON_COLUMNS, COLUMNS

from .conftest import PUE


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.codecarbon.config, ./.codecarbon.config or CODECARBON_* but the test's own."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for name in [n for n in __import__("os").environ if n.upper().startswith("CODECARBON_")]:
        monkeypatch.delenv(name)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def codecarbon_log() -> Iterator[Records]:
    """A handler on the ``codecarbon`` logger, as CodeCarbon users attach theirs."""
    handler = Records()
    logger = logging.getLogger("codecarbon")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_public_names_as_codecarbon_exports_them() -> None:
    for name in ("EmissionsTracker", "OfflineEmissionsTracker", "OutputMethod", "track_emissions"):
        assert name in cc.__all__
        assert hasattr(cc, name)
    assert callable(cc.track_task_emissions)
    assert callable(cc.TaskEmissionsTracker)
    assert [m.value for m in cc.OutputMethod] == ["csv", "api", "logger", "prometheus", "logfire", "boamps"]
    assert cc.OutputMethod("csv") is cc.OutputMethod.CSV
    assert cc.OutputMethod.CSV == "csv"


def test_offline_without_country_runs_on_the_world_average(
    fake_config: Path, tmp_path: Path, codecarbon_log: Records
) -> None:
    tracker = OfflineEmissionsTracker(config=fake_config, measure_power_secs=1)
    tracker.start()
    tracker.start_task()
    task = tracker.stop_task()
    kg = tracker.stop()
    assert kg is not None
    assert kg > 0
    assert task is not None
    assert task.country_name is None
    row = rows(tmp_path / "emissions.csv")[0]
    assert row["country_name"] == row["country_iso_code"] == ""
    assert row["intensity_zone"] == "world"
    world = lookup("world")
    assert world is not None
    assert math.isclose(float(row["intensity_g_per_kwh"]), world.g_per_kwh)
    said = [line for line in codecarbon_log.lines if "world average" in line]
    OfflineEmissionsTracker(config=fake_config)  # said once per process, not once per tracker
    assert len(said) == 1
    assert said == [line for line in codecarbon_log.lines if "world average" in line]


def test_measure_power_secs_zero_measures_once_at_stop(fake_config: Path, tmp_path: Path) -> None:
    tracker = OfflineEmissionsTracker(country_iso_code="FRA", measure_power_secs=0, config=fake_config)
    tracker.start()
    kg = tracker.stop()
    assert kg is not None
    assert kg > 0
    assert tracker._tracker._interval == 3600.0  # no periodic tick: the measurement at stop is the run's


@pytest.mark.parametrize(
    ("given", "key", "expected"),
    [
        ({"measure_power_secs": "abc"}, "measure_power_secs", 15.0),
        ({"measure_power_secs": -2}, "measure_power_secs", 15.0),
        ({"pue": "abc"}, "pue", None),
        ({"pue": 0.9}, "pue", 1.0),
        ({"wue": "x"}, "wue", 0.0),
        ({"tracking_mode": "everything"}, "tracking_mode", "machine"),
        ({"on_csv_write": "replace"}, "on_csv_write", "append"),
        ({"force_cpu_power": -5}, "force_cpu_power", None),
        ({"force_carbon_intensity_g_co2e_kwh": "dirty"}, "force_carbon_intensity_g_co2e_kwh", None),
    ],
)
def test_bad_values_fall_back_with_an_error(
    given: dict[str, object], key: str, expected: object, codecarbon_log: Records
) -> None:
    o = checked({**DEFAULTS, **given})
    assert o[key] == expected
    assert any(line.startswith("ERROR") and key in line for line in codecarbon_log.lines), codecarbon_log.lines


def test_bad_inputs_never_raise(fake_config: Path, tmp_path: Path, codecarbon_log: Records) -> None:
    """What CodeCarbon tolerates: a config file with bad numbers, pue below 1, three positional arguments, an
    unknown log level, a cloud provider without region, a country carbond cannot place."""
    (tmp_path / ".codecarbon.config").write_text("[codecarbon]\nmeasure_power_secs=abc\npue=abc\n")
    trackers = [
        EmissionsTracker("three", 1, 8, config=fake_config),
        EmissionsTracker(pue=0.9, log_level="chatty", config=fake_config),
        OfflineEmissionsTracker(cloud_provider="aws", config=fake_config),
        OfflineEmissionsTracker(country_iso_code="XYZ", config=fake_config),
    ]
    assert trackers[0]._tracker.project == "three"
    for t in trackers:
        t.start()
        assert t.stop() is not None
    pues = [float(r["pue"]) for r in rows(tmp_path / "emissions.csv")]
    assert pues == [PUE, 1.0, PUE, PUE]  # the file's bad pue ignored (the config's); 0.9 raised to 1
    errors = " ".join(line for line in codecarbon_log.lines if line.startswith("ERROR"))
    for word in ("measure_power_secs", "pue", "chatty", "cloud_region", "XYZ"):
        assert word in errors, (word, errors)
    with pytest.raises(TypeError):  # a keyword neither tool knows is a programming error, as with CodeCarbon
        EmissionsTracker(no_such_keyword=1)


def test_run_id_data_and_hardware_as_codecarbon_types_them(fake_config: Path, tmp_path: Path) -> None:
    tracker = EmissionsTracker(config=fake_config, measure_power_secs=1)
    assert isinstance(tracker.run_id, uuid.UUID)
    hardware = tracker.get_detected_hardware()
    assert set(hardware) == {
        "ram_total_size",
        "cpu_count",
        "cpu_physical_count",
        "cpu_model",
        "gpu_count",
        "gpu_model",
        "gpu_ids",
    }
    assert hardware["cpu_count"] >= 1
    assert hardware["ram_total_size"] > 0
    tracker.start()
    tracker.stop()
    data = tracker.final_emissions_data
    assert data is not None
    assert data.run_id == str(tracker.run_id)
    assert data.latitude is None
    assert data.longitude is None
    decoded = json.loads(data.toJSON())
    assert decoded["run_id"] == str(tracker.run_id)
    assert decoded["energy_consumed"] == data.energy_consumed
    assert list(decoded) == sorted(decoded)


def test_task_tracker_and_task_decorator(fake_config: Path, tmp_path: Path) -> None:
    tracker = EmissionsTracker(config=fake_config, measure_power_secs=1)
    tracker.start()
    with cc.TaskEmissionsTracker("load", tracker=tracker):
        pass

    @cc.track_task_emissions(tracker=tracker, task_name="train")
    def train(x: int) -> int:
        return x + 1

    assert train(1) == 2
    tracker.stop()
    tasks = rows(next(tmp_path.glob("emissions_base_*.csv")))
    assert [t["task_name"] for t in tasks] == ["load", "train"]


def test_forced_intensity_is_honoured(fake_config: Path, tmp_path: Path) -> None:
    tracker = OfflineEmissionsTracker(
        country_iso_code="FRA", force_carbon_intensity_g_co2e_kwh=500, config=fake_config, measure_power_secs=1
    )
    tracker.start()
    kg = tracker.stop()
    data = tracker.final_emissions_data
    assert kg is not None
    assert data is not None
    assert math.isclose(kg / data.energy_consumed, 0.5, rel_tol=1e-6)  # 500 g/kWh on energy with PUE
    assert rows(tmp_path / "emissions.csv")[0]["intensity_provider"] == "override"


def test_forced_powers_map_onto_carbonds_models(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"sensors": ["rapl", "nvml", "powermetrics", "tdp", "ram"]}))
    cfg = load(cfg_path)
    o = checked({**DEFAULTS, "force_cpu_power": 100, "force_ram_power": 12, "rapl_prefer_psys": False})
    update = config_update(o, cfg)
    assert update["sensors"] == ["nvml", "tdp", "ram"]
    assert update["cpu"].power_watts == 100.0
    assert update["rapl"].use_psys is False
    mem_kib = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemT"))
    assert math.isclose(update["ram"].watts_per_gb * mem_kib / 2**20, 12.0, rel_tol=1e-9)
    assert "sensors" in config_update(checked({**DEFAULTS, "force_mode_cpu_load": True}), cfg)


def test_forced_ram_power_in_a_run(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"sensors": ["tdp", "ram"], "state_dir": str(tmp_path / "s")}))
    tracker = OfflineEmissionsTracker(
        country_iso_code="FRA", force_ram_power=2, force_cpu_power=50, config=cfg, measure_power_secs=0.5
    )
    tracker.start()
    burn = time.process_time()
    while time.process_time() - burn < 1.0:  # work, so the sensors' start-up is a small part of the run
        pass
    tracker.stop()
    data = tracker.final_emissions_data
    assert data is not None
    assert math.isclose(data.ram_power, 2.0, rel_tol=0.25), data.ram_power  # the model alone: 0.375 W/GiB
    assert 0.75 * 50 <= data.cpu_power <= 1.25 * 50 * 1.02  # 50 W at full load (the burn), start-up bias aside


def test_codecarbon_logger_receives_the_drop_ins_messages(fake_config: Path, codecarbon_log: Records) -> None:
    EmissionsTracker(config=fake_config, api_key="k")
    assert any("api_key" in line and line.startswith("WARNING") for line in codecarbon_log.lines)
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    try:
        before = len(codecarbon_log.lines)
        EmissionsTracker(config=fake_config, api_key="k")
        assert len(codecarbon_log.lines) == before  # the codecarbon logger's level is respected
    finally:
        logging.getLogger("codecarbon").setLevel(logging.NOTSET)


def test_a_file_in_another_layout_is_moved_aside(fake_config: Path, tmp_path: Path, codecarbon_log: Records) -> None:
    older = [c for c in CODECARBON_COLUMNS if c not in ("water_consumed", "wue")]  # an older CodeCarbon's
    (tmp_path / "emissions.csv").write_text(",".join(older) + "\nx\n")
    (tmp_path / "emissions.csv.bak").write_text("earlier backup\n")
    for _ in range(2):
        t = EmissionsTracker(config=fake_config, measure_power_secs=1)
        t.start()
        t.stop()
    assert (tmp_path / "emissions.csv.bak").read_text() == "earlier backup\n"
    assert (tmp_path / "emissions.csv_0.bak").read_text() == ",".join(older) + "\nx\n"
    assert len(rows(tmp_path / "emissions.csv")) == 2  # the second run appended to the new file
    assert (tmp_path / "emissions.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)
    assert any("emissions.csv_0.bak" in line for line in codecarbon_log.lines)


def test_codecarbons_own_and_carbonds_supersets_are_appended_to(fake_config: Path, tmp_path: Path) -> None:
    theirs, older = tmp_path / "theirs.csv", tmp_path / "older.csv"
    theirs.write_text(",".join(CODECARBON_COLUMNS) + "\n")
    older.write_text(",".join(c for c in COLUMNS if c != "embodied_emissions") + "\n")
    for path in (theirs, older):
        t = EmissionsTracker(config=fake_config, output_file=path.name, measure_power_secs=1)
        t.start()
        t.stop()
        assert len(rows(path)) == 1
    assert not list(tmp_path.glob("*.bak"))
