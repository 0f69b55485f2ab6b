"""Each GPU vendor named in ``sensors:`` is its own obligation: a working AMD GPU does not cover a broken NVIDIA
driver (they read different devices), so nvml is down (``carbond_sensor_up 0``, CarbondSensorDown) while amdsmi
measures. The CPU classes keep their fallbacks: a failed rapl covered by the tdp model stays quiet."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from carbond.builder import SensorSet, configured_down
from carbond.config import Config
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon

FAKE_NVML = Path(importlib.import_module("carbond.testing.nvml_fake").__path__[0])
FAKE_AMDSMI = Path(importlib.import_module("carbond.testing.amdsmi_fake").__path__[0])


def test_a_failed_gpu_vendor_is_down_whatever_else_covers_the_gpu_class() -> None:
    cfg = Config.model_validate({"sensors": ["rapl", "amdsmi", "nvml", "tdp", "ram"]})
    sensors = SensorSet(unavailable={"rapl": "no powercap", "nvml": "nvmlInit failed: Driver Not Loaded"})
    down = configured_down(cfg, sensors, {"cpu", "dram", "gpu"})
    assert down == {"nvml": "nvmlInit failed: Driver Not Loaded"}  # rapl: the tdp model is its fallback


def test_auto_detected_gpu_sensors_stay_quiet() -> None:
    sensors = SensorSet(unavailable={"nvml": "nvidia-ml-py is not installed", "amdsmi": "not installed"})
    assert configured_down(Config(), sensors, {"cpu", "dram"}) == {}


def test_broken_nvidia_beside_working_amd_reports_nvml_down(tmp_path: Path) -> None:
    (tmp_path / "nvml.json").write_text(json.dumps({"gpus": [], "missing": "driver"}))
    amd = {"name": "AMD Instinct MI210", "uuid": "amd-0", "power_w": 300, "counter": True}
    (tmp_path / "amd.json").write_text(json.dumps({"gpus": [amd]}))
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), str(FAKE_AMDSMI), os.environ.get("PYTHONPATH", "")]),
        "CARBOND_FAKE_NVML": str(tmp_path / "nvml.json"),
        "CARBOND_FAKE_AMDSMI": str(tmp_path / "amd.json"),
    }
    ProcTree(tmp_path / "proc")
    cfg = {
        "measure_power_secs": 0.5,
        "sensors": ["amdsmi", "nvml", "tdp", "ram"],
        "paths": {"sysfs": str(tmp_path / "no-sys"), "procfs": str(tmp_path / "proc")},
    }
    with Daemon(tmp_path, cfg, env=env) as d:
        m = d.wait_for_ticks(1)
    up = {dict(labels)["sensor"]: v for (name, labels), v in m.items() if name == "carbond_sensor_up"}
    assert up == {"amdsmi": 1.0, "nvml": 0.0, "tdp": 1.0, "ram": 1.0}
    gpu_power = [
        v for (name, labels), v in m.items() if name == "carbond_device_power_watts" and ("kind", "gpu") in labels
    ]
    assert gpu_power
    assert all(v > 0 for v in gpu_power)
