"""Issue 29, what the outputs say: budgets reject label names the series do not carry; measure logs JSON when
stderr is not a terminal; track() prints no log lines into the program; the summary header; the daemon's
sensors_started and device_class_unmeasured lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carbond import cli
from tests.harness.daemon import Daemon
from tests.sensors.test_issue29_cpu import machine


def test_budget_selector_on_an_unknown_label_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"budgets": [{"name": "ml", "selector": {"namespace": "ml"}, "grams": 1000}]}))
    assert cli.main(["budgets", "render", str(path)]) == 2
    text = capsys.readouterr().err
    assert "did you mean 'pod_namespace'" in text
    assert "label_*" in text


def test_budget_selector_on_known_labels_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "budgets.yaml"
    budget = {"name": "ml", "selector": {"pod_namespace": "ml", "label_app": "x"}, "grams": 1000}
    path.write_text(yaml.safe_dump({"budgets": [budget]}))
    assert cli.main(["budgets", "render", str(path)]) == 0
    assert 'pod_namespace="ml"' in capsys.readouterr().out


def _config(tmp_path: Path) -> Path:
    paths = machine(tmp_path / "m", vm=True, cpus=2)  # masked model on a VM: the model logs a warning
    path = tmp_path / "carbond.yaml"
    path.write_text(yaml.safe_dump({"paths": paths, "sensors": ["tdp"], "measure_power_secs": 0.2}))
    return path


def test_measure_logs_json_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carbond", "measure", "--config", str(_config(tmp_path)), "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "cpu_power_model" and e["level"] == "warning" for e in logged), done.stderr
    header = next(line for line in done.stderr.splitlines() if line.startswith("carbond: run "))
    assert header.endswith(": true (exit code 0)")
    assert "carbond run" not in header


def test_track_prints_no_log_lines_into_the_program(tmp_path: Path) -> None:
    program = (
        "import carbond\n"
        f"with carbond.track(config={str(_config(tmp_path))!r}, interval_s=0.2):\n"
        "    pass\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # warnings only, one line each (the model's warning for a masked VM); never the info lines of start-up
    assert all(" sensors_started" not in line and "embodied_" not in line for line in lines), lines
    assert len(lines) <= 2, lines


def test_daemon_names_ram_and_dram_reasons_of_dram_backends_only(tmp_path: Path) -> None:
    paths = machine(tmp_path / "m", cpus=2)
    (tmp_path / "a").mkdir()
    with Daemon(tmp_path / "a", {"paths": paths, "sensors": ["tdp", "ram"]}) as d:
        log = d.wait_for_log('"sensors_started"')
    (started,) = [json.loads(x) for x in log.splitlines() if '"sensors_started"' in x]
    assert started["covers"] == ["cpu", "ram"]
    (tmp_path / "b").mkdir()
    with Daemon(tmp_path / "b", {"paths": paths, "sensors": ["tdp", "nvml"]}) as d:
        log = d.wait_for_log('"sensors_started"')
    (unmeasured,) = [json.loads(x) for x in log.splitlines() if '"device_class_unmeasured"' in x]
    assert unmeasured["device_class"] == "dram"
    assert not any(r.startswith("nvml") for r in unmeasured["reasons"])
