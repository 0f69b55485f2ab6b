"""Sensor health as users meet it: a configured sensor that cannot start is down (and alerts), an auto-detected one
that is absent stays quiet, and a reload whose sensors cannot start keeps the running configuration."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon
from tests.harness.tools import require_tool

pytestmark = pytest.mark.e2e

FAKE_NVML = Path(importlib.import_module("carbond.testing.nvml_fake").__path__[0])
RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "carbond.rules.yml"


def nvml_env(tmp_path: Path, spec: dict[str, Any]) -> dict[str, str]:
    (tmp_path / "nvml.json").write_text(json.dumps(spec))
    return {
        "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), os.environ.get("PYTHONPATH", "")]),
        "CARBOND_FAKE_NVML": str(tmp_path / "nvml.json"),
    }


def model_host(tmp_path: Path, **cfg: Any) -> dict[str, Any]:
    ProcTree(tmp_path / "proc")
    return {
        "measure_power_secs": 0.5,
        "paths": {"sysfs": str(tmp_path / "no-sys"), "procfs": str(tmp_path / "proc")},
        **cfg,
    }


def sensor_up(m: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {dict(lab)["sensor"]: v for (n, lab), v in m.items() if n == "carbond_sensor_up"}


def test_configured_sensor_that_cannot_start_is_down_and_the_alert_fires(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    env = nvml_env(tmp_path, {"gpus": [], "missing": "driver"})
    with Daemon(tmp_path, model_host(tmp_path, sensors=["nvml", "tdp", "ram"], host_name="gpu-ws"), env=env) as d:
        m = d.wait_for_ticks(1)
    assert sensor_up(m) == {"tdp": 1.0, "ram": 1.0, "nvml": 0.0}
    events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    (line,) = [e for e in events if e["event"] == "sensor_unavailable" and e["sensor"] == "nvml"]
    assert line["level"] == "warning"
    assert "Driver Not Loaded" in line["reason"]

    # the daemon's own series, held for 20 minutes, through the shipped rules: CarbondSensorDown fires
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'carbond_sensor_up{{host="gpu-ws",sensor="{sensor}"}}', "values": f"{value:g}x20"}
                    for sensor, value in sensor_up(m).items()
                ],
                "alert_rule_test": [
                    {"alertname": "CarbondSensorDown", "eval_time": "5m", "exp_alerts": []},
                    {
                        "alertname": "CarbondSensorDown",
                        "eval_time": "15m",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "host": "gpu-ws", "sensor": "nvml"},
                                "exp_annotations": {
                                    "summary": "carbond sensor nvml on gpu-ws has failed for 10 minutes",
                                    "description": "Energy from this sensor is not being measured; "
                                    "see the carbond log for the reason.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "sensor.test.yml").write_text(yaml.safe_dump(test))
    out = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "sensor.test.yml")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_absent_auto_detected_sensors_and_fallbacks_stay_quiet(tmp_path: Path) -> None:
    env = nvml_env(tmp_path, {"gpus": [], "missing": "driver"})
    # the default list (auto-detection): rapl, nvml, amdsmi and powermetrics are absent here
    with Daemon(tmp_path / "a", model_host(tmp_path / "a"), env=env) as d:
        assert sensor_up(d.wait_for_ticks(1)) == {"tdp": 1.0, "ram": 1.0}
    # rapl named before the models it falls back to (the Kubernetes base config): the models cover its classes
    with Daemon(tmp_path / "b", model_host(tmp_path / "b", sensors=["rapl", "tdp", "ram"])) as d:
        assert sensor_up(d.wait_for_ticks(1)) == {"tdp": 1.0, "ram": 1.0}


def test_reload_whose_sensors_cannot_start_keeps_the_running_config(tmp_path: Path) -> None:
    cfg = model_host(tmp_path, sensors=["tdp", "ram"])
    with Daemon(tmp_path, cfg) as d:
        before = d.wait_for_ticks(1)
        d.config_path.write_text(yaml.safe_dump({**yaml.safe_load(d.config_path.read_text()), "sensors": ["rapl"]}))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log('"event": "reload_failed"')
        after = d.wait_for_ticks(1)  # a tick after the failed reload
        assert d.proc.poll() is None, d.log()  # still running
    assert sensor_up(after) == sensor_up(before) == {"tdp": 1.0, "ram": 1.0}
    energy = [v for (n, _), v in after.items() if n == "carbond_node_energy_joules_total"]
    assert energy[0] > next(v for (n, _), v in before.items() if n == "carbond_node_energy_joules_total")
    events = [json.loads(line)["event"] for line in d.log().splitlines() if line.startswith("{")]
    assert "reload_failed" in events
    assert "stopped" in events
