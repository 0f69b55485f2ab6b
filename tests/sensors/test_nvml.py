from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import DeviceInfo, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.nvml import NvmlSensor
from carbond.testing.clock import ManualClock
from tests.harness.daemon import Daemon, Metrics

FAKE_DIR = Path(importlib.import_module("carbond.testing.nvml_fake").__path__[0])


def fake_nvml(spec: dict[str, Any], clock: ManualClock | None = None) -> ModuleType:
    """The fake pynvml with ``spec``'s GPUs, on ``clock`` (the sensor's: time moves only when the test says)."""
    mod = importlib.import_module("carbond.testing.nvml_fake.pynvml")
    mod.nvmlShutdown()
    mod.configure(spec, clock or time.monotonic)
    return mod


def gpu(i: int, watts: float, counter: bool = True, **kw: Any) -> dict[str, Any]:
    return {
        "name": "NVIDIA A100-SXM4-40GB",
        "uuid": f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
        "power_w": watts,
        "energy_counter": counter,
        **kw,
    }


NO_HOST = HostSample(b"")  # NVML does not look at /proc


async def read(sensor: NvmlSensor) -> SensorRead:
    return await sensor.read(NO_HOST)


async def devices(sensor: NvmlSensor) -> list[str]:
    """The devices a read describes."""
    return [i.device for i in (await read(sensor)).device_info]


async def power(sensor: NvmlSensor, clock: ManualClock, seconds: float) -> dict[str, float]:
    """Mean power per device over ``seconds`` of the manual clock, from the energy and times the sensor reports."""
    first = {r.device: r for r in (await read(sensor)).readings}
    clock.advance(seconds)
    return {
        r.device: (r.joules - first[r.device].joules) / (r.at - first[r.device].at)
        for r in (await read(sensor)).readings
        if r.device in first
    }


@pytest.mark.asyncio
async def test_counter_and_power_only_gpus() -> None:
    clock = ManualClock()
    mod = fake_nvml({"gpus": [gpu(0, 300.0), gpu(1, 150.0, counter=False)]}, clock)
    s = NvmlSensor(clock, power_sample_hz=20, module=mod)
    await s.start()
    watts = await power(s, clock, 0.6)
    assert watts["gpu-0"] == pytest.approx(300.0, rel=1e-6)
    assert watts["gpu-1"] == pytest.approx(150.0, rel=1e-6)  # never 0 W for lack of a counter
    assert (await read(s)).device_info[1] == DeviceInfo(
        "gpu-1", "NVIDIA A100-SXM4-40GB", "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "nvml", "power integration"
    )
    await s.close()


@pytest.mark.asyncio
async def test_selection_by_index_uuid_and_mig() -> None:
    mig = "MIG-11111111-2222-3333-4444-555555555555"
    mod = fake_nvml({"gpus": [gpu(0, 100.0), gpu(1, 200.0, mig=[mig]), gpu(2, 300.0)]})
    s = NvmlSensor(time.monotonic, devices=["0", mig, "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd"], module=mod)
    await s.start()
    assert [d for d in await devices(s) if "-mig-" not in d] == ["gpu-0", "gpu-1", "gpu-2"]
    await s.close()
    s = NvmlSensor(time.monotonic, devices=[mig, "1"], module=fake_nvml({"gpus": [gpu(0, 1), gpu(1, 2, mig=[mig])]}))
    await s.start()
    # a MIG UUID selects its parent, measured once; its MIG devices are apportioned beside it
    assert await devices(s) == ["gpu-1", "gpu-1-mig-gi1-ci0", "gpu-1-mig-unallocated"]
    await s.close()


@pytest.mark.asyncio
async def test_cuda_visible_devices_does_not_renumber(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    s = NvmlSensor(time.monotonic, module=fake_nvml({"gpus": [gpu(0, 100.0), gpu(1, 200.0)]}))
    await s.start()
    assert await devices(s) == ["gpu-0", "gpu-1"]
    await s.close()


@pytest.mark.asyncio
async def test_lost_gpu_goes_down_others_go_on_and_it_recovers() -> None:
    clock = ManualClock()
    mod = fake_nvml({"gpus": [gpu(0, 100.0), gpu(1, 50.0, lost_after_s=0.3, recover_after_s=0.9)]}, clock)
    s = NvmlSensor(clock, retry_secs=0.2, module=mod)
    await s.start()
    clock.advance(0.4)  # lost since 0.3 s
    result = await read(s)
    readings = {r.device: r for r in result.readings}
    assert "gpu-1" not in readings
    assert "gpu-0" in readings
    assert result.partial_errors == 1
    clock.advance(0.8)  # back since 0.9 s, and past its retry
    result = await read(s)
    readings = {r.device: r for r in result.readings}
    assert "gpu-1" in readings
    assert not result.down
    assert result.partial_errors == 1
    clock.advance(1.0)  # its counter kept counting while it was lost: measured from the recovery on
    after = {r.device: r.joules for r in (await read(s)).readings}
    assert after["gpu-1"] - readings["gpu-1"].joules == pytest.approx(50.0, rel=1e-6)
    await s.close()


@pytest.mark.parametrize(("missing", "word"), [("library", "Library"), ("driver", "Driver")])
@pytest.mark.asyncio
async def test_missing_library_or_driver_is_unavailable(missing: str, word: str) -> None:
    s = NvmlSensor(time.monotonic, module=fake_nvml({"gpus": [], "missing": missing}))
    with pytest.raises(SensorUnavailable) as info:
        await s.start()
    assert word in info.value.reason


def test_importing_carbond_loads_no_vendor_library() -> None:
    code = "import sys, carbond, carbond.sensors, carbond.app; print('pynvml' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(FAKE_DIR)},
    )
    assert out.stdout.strip() == "False"


def test_four_gpus_end_to_end(tmp_path: Path) -> None:
    spec = {"gpus": [gpu(0, 300.0), gpu(1, 250.0), gpu(2, 120.0, counter=False), gpu(3, 200.0, lost_after_s=2.0)]}
    (tmp_path / "nvml.json").write_text(json.dumps(spec))
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")]),
        "CARBOND_FAKE_NVML": str(tmp_path / "nvml.json"),
    }
    cfg = {"measure_power_secs": 0.5, "sensors": ["nvml"], "nvml": {"power_sample_hz": 10}}

    def get(name: str, device: str, m: Metrics) -> float | None:
        hits = [v for (n, lab), v in m.items() if n == name and dict(lab).get("device") == device]
        return hits[0] if hits else None

    def settled(m: Metrics) -> Metrics | None:
        """gpu-3 lost (after 2 s of the daemon's life) and a power figure for each of the others."""
        powers = [get("carbond_device_power_watts", f"gpu-{i}", m) for i in range(3)]
        return m if get("carbond_device_up", "gpu-3", m) == 0.0 and None not in powers else None

    with Daemon(tmp_path, cfg, env=env) as d:
        m = d.wait_for(settled, what="gpu-3 lost, the others measured")
        m = d.wait_for_ticks(1)  # a power figure over a whole tick after the loss
        assert d.proc is not None
        assert d.proc.poll() is None

    assert get("carbond_device_power_watts", "gpu-0", m) == pytest.approx(300.0, rel=0.01)
    assert get("carbond_device_power_watts", "gpu-1", m) == pytest.approx(250.0, rel=0.01)
    assert get("carbond_device_power_watts", "gpu-2", m) == pytest.approx(120.0, rel=0.01)
    assert get("carbond_device_power_watts", "gpu-3", m) is None  # lost: no power, never a stale or 0 W value
    assert get("carbond_device_up", "gpu-3", m) == 0.0
    assert get("carbond_device_up", "gpu-0", m) == 1.0
    errors = [v for (n, lab), v in m.items() if n == "carbond_sensor_errors_total" and dict(lab)["sensor"] == "nvml"]
    assert errors
    assert errors[0] >= 1
    info = [dict(lab) for (n, lab), _ in m.items() if n == "carbond_device_info"]
    assert {i["device"] for i in info} == {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}
    assert all(i["uuid"].startswith("GPU-") and i["model"].startswith("NVIDIA") for i in info)


@pytest.mark.asyncio
async def test_process_shares_from_sm_utilisation_or_equal_split() -> None:
    mod = fake_nvml(
        {
            "gpus": [
                gpu(0, 300.0, processes={"101": 60, "102": 20}),
                gpu(1, 100.0, processes={"201": 0, "202": 0}, no_process_samples=True),
            ]
        }
    )
    s = NvmlSensor(time.monotonic, module=mod)
    await s.start()
    shares = (await read(s)).process_shares
    assert shares["gpu-0"] == {101: pytest.approx(0.75), 102: pytest.approx(0.25)}
    assert shares["gpu-1"] == {201: pytest.approx(0.5), 202: pytest.approx(0.5)}  # no samples: equal split
    await s.close()


@pytest.mark.parametrize("lost_handle", [False, True], ids=["lost-at-name", "lost-at-handle"])
@pytest.mark.asyncio
async def test_gpu_lost_from_the_start_does_not_hide_the_others_and_is_measured_once_back(lost_handle: bool) -> None:
    clock = ManualClock()
    lost = gpu(1, 50.0, lost_after_s=0.0, recover_after_s=0.5, lost_handle=lost_handle)
    mod = fake_nvml({"gpus": [gpu(0, 100.0), lost, gpu(2, 200.0, counter=False)]}, clock)
    s = NvmlSensor(clock, retry_secs=0.2, power_sample_hz=20, module=mod)
    await s.start()  # one GPU off the bus is not the whole sensor unavailable
    assert s.covers == frozenset({"gpu"})
    await read(s)
    clock.advance(0.1)
    result = await read(s)
    assert {r.device for r in result.readings} == {"gpu-0", "gpu-2"}
    assert [(d.device, d.kind) for d in result.down] == [("gpu-1", "gpu")]
    assert "GPU is lost" in result.down[0].reason
    assert [i.device for i in result.device_info] == ["gpu-0", "gpu-2"]  # nothing known of it yet
    assert result.partial_errors == 1
    clock.advance(0.2)  # retried at 0.2 s, still lost: the next retry waits twice as long (0.4 s)
    assert [d.device for d in (await read(s)).down] == ["gpu-1"]
    clock.advance(0.3)  # back at 0.5 s, but its next retry is at 0.7 s
    assert [d.device for d in (await read(s)).down] == ["gpu-1"]
    clock.advance(0.2)  # retried: described, then measured
    await read(s)
    clock.advance(0.3)
    watts = await power(s, clock, 0.4)
    assert watts["gpu-1"] == pytest.approx(50.0, rel=1e-6)
    assert watts["gpu-2"] == pytest.approx(200.0, rel=1e-6)
    result = await read(s)
    assert not result.down
    assert [i.device for i in result.device_info] == ["gpu-0", "gpu-1", "gpu-2"]
    await s.close()


@pytest.mark.asyncio
async def test_every_gpu_lost_from_the_start_is_a_failing_read_not_an_unavailable_sensor() -> None:
    mod = fake_nvml({"gpus": [gpu(0, 100.0, lost_after_s=0.0)]})
    s = NvmlSensor(time.monotonic, module=mod)
    await s.start()
    with pytest.raises(SensorReadError, match="every GPU is down"):
        await read(s)
    await s.close()


def test_daemon_and_probe_show_a_gpu_lost_from_the_start(tmp_path: Path) -> None:
    spec = {"gpus": [gpu(0, 300.0), gpu(1, 250.0, lost_after_s=0.0), gpu(2, 120.0)]}
    (tmp_path / "nvml.json").write_text(json.dumps(spec))
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")]),
        "CARBOND_FAKE_NVML": str(tmp_path / "nvml.json"),
    }
    cfg = {"measure_power_secs": 0.5, "sensors": ["nvml"]}

    def measured(m: Metrics) -> bool:
        energy = {dict(lab).get("device") for (n, lab), _ in m.items() if n == "carbond_device_energy_joules_total"}
        return {"gpu-0", "gpu-2"} <= energy

    with Daemon(tmp_path, cfg, env=env) as d:
        d.wait_for(measured, what="gpu-0 and gpu-2 measured")
        m = d.scrape()
    up = {dict(lab)["device"]: v for (n, lab), v in m.items() if n == "carbond_device_up"}
    assert up == {"gpu-0": 1.0, "gpu-1": 0.0, "gpu-2": 1.0}
    assert not [
        lab for (n, lab), _ in m.items() if n == "carbond_device_energy_joules_total" and ("device", "gpu-1") in lab
    ]
    assert [v for (n, lab), v in m.items() if n == "carbond_sensor_up"] == [1.0]
    probe = subprocess.run(
        [sys.executable, "-m", "carbond", "probe", "--config", str(d.config_path), "--seconds", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    rows = {line.split()[2]: line for line in probe.stdout.splitlines() if line.startswith("nvml")}
    assert set(rows) == {"gpu-0", "gpu-1", "gpu-2"}, probe.stdout
    assert rows["gpu-1"].split()[1] == "down"
    assert "GPU is lost" in rows["gpu-1"]
    assert rows["gpu-0"].split()[1] == "available"
