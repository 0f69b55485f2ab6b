"""What people see: short jobs' memory energy and embodied figures, J/Wh, the live line on a terminal, -q, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from carbond.cli import main
from carbond.job import measure
from carbond.job.modelcard import model_card
from carbond.job.report import load_json

from .conftest import burn

#: a job that holds 60 MB for a moment, far shorter than the tick
HOLD = "import time\nx = bytearray(60_000_000)\nx[::4096] = b'1' * len(x[::4096])\ntime.sleep(0.2)\n"


def _slow_tick(fake_config: Path, tmp_path: Path, **extra: object) -> Path:
    cfg = {**yaml.safe_load(fake_config.read_text()), "measure_power_secs": 30, **extra}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("attribution", ["proctree", "auto"])
def test_a_job_shorter_than_a_tick_gets_memory_energy(fake_config: Path, tmp_path: Path, attribution: str) -> None:
    out = tmp_path / "r.json"
    cfg = _slow_tick(fake_config, tmp_path)
    args = ["measure", "--config", str(cfg), "-q", "--attribution", attribution, "--json", str(out)]
    assert main([*args, "--", sys.executable, "-c", HOLD]) == 0
    r = load_json(out)
    assert r.scope == "job"
    assert r.duration_s < 30
    assert r.energy_by_kind_j.get("dram", 0.0) > 0, (r.method, r.energy_by_kind_j)  # its peak memory's share
    assert r.energy_by_kind_j["dram"] < 6.0 * r.duration_s  # never more than the whole 6 W DRAM


def test_embodied_in_the_report_json_and_model_card(fake_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cfg = _slow_tick(fake_config, tmp_path, embodied={"server_kg": 1000.0, "share": 1.0})
    assert (
        main(["measure", "--config", str(cfg), "-q", "--attribution", "machine", "--json", str(out), "--", "true"]) == 0
    )
    doc = json.loads(out.read_text())
    # 1,000 kg over 4 years, for the run's seconds (the fake GPU describes no model: not counted)
    per_second = 1000.0 * 1000 / (4 * 365.25 * 86400)
    assert doc["embodied_g"] == pytest.approx(per_second * doc["duration_s"], rel=1e-6)
    source = model_card(load_json(out))["co2_eq_emissions"]["source"]
    assert source.startswith("estimated: ")
    assert "embodied" in source
    assert "not included" in source


def test_summary_speaks_joules_and_grams(fake_config: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--config", str(fake_config), "--", sys.executable, "-c", burn(0.3)]) == 0
    err = capfd.readouterr().err
    assert " J IT (" in err
    assert " mg CO2e" in err
    assert "e-0" not in err
    assert "kWh" not in err.replace("g/kWh", "")  # kWh only in the intensity's unit
    assert "\r" not in err  # no progress line when standard error is not a terminal


def test_live_progress_line_on_a_terminal(fake_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(measure._Progress, "AFTER_S", 0.3)
    monkeypatch.setattr(measure._Progress, "EVERY_S", 0.2)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.2: pass\n"
    assert main(["measure", "--config", str(fake_config), "--", sys.executable, "-c", code]) == 0
    tty.close()
    reader.join(5)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r\x1b[Kcarbond: " in text
    assert "running" in text
    assert "so far" in text
    assert "duration" in text.split("running")[-1]  # the summary follows the cleared line


def test_quiet_prints_nothing_but_errors(fake_config: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load(fake_config.read_text())
    cfg.pop("intensity")  # no zone: a warning log line without -q
    path = tmp_path / "nozone.yaml"
    path.write_text(yaml.safe_dump(cfg))
    base = [sys.executable, "-m", "carbond", "measure", "--config", str(path)]
    env = {**os.environ, "TZ": "UTC"}
    loud = subprocess.run([*base, "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    quiet = subprocess.run([*base, "-q", "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert loud.returncode == quiet.returncode == 0
    assert "zone" in loud.stderr
    assert "duration" in loud.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == ""


def test_report_on_a_file_that_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_file = tmp_path / "emissions.csv"
    csv_file.write_text("timestamp,project_name\n2026-01-01T00:00:00,x\n")
    other = tmp_path / "other.json"
    other.write_text('{"emissions": 1}')
    for path in (csv_file, other):
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is not a carbond job report" in err
        assert "Traceback" not in err
    assert main(["report", "--model-card", str(other)]) == 2
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["measure", "--interval", "0", "--", "true"],
        ["measure", "--interval", "-1", "--", "true"],
        ["measure", "--interval", "nan", "--", "true"],
        ["probe", "--seconds", "0"],
        ["probe", "--seconds", "-0.5"],
    ],
)
def test_non_positive_seconds_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert ("--interval" if argv[0] == "measure" else "--seconds") in capsys.readouterr().err


def test_zones_survives_a_closed_pipe() -> None:
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "carbond", "zones", "--top", "0"], stdout=write, stderr=subprocess.PIPE
    )
    os.close(write)
    os.close(read)  # the reader is gone before carbond writes a byte (as `carbond zones | head -0`)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err, err
    assert b"BrokenPipe" not in err, err


def test_attribution_line_says_whose_once() -> None:
    from carbond.job.report import Report
    from carbond.job.text import summary

    r = Report("p", "0" * 32, 0.0, 1.0, scope="machine", method="daemon")
    r.method_detail = "the whole machine, from the daemon at http://127.0.0.1:9090"
    line = next(x for x in summary(r).splitlines() if "attribution" in x)
    assert line.count("whole machine") == 1, line
    r.scope, r.method, r.method_detail = "job", "proctree", "the command's process tree through /proc"
    line = next(x for x in summary(r).splitlines() if "attribution" in x)
    assert line.endswith("(the job's share)"), line
