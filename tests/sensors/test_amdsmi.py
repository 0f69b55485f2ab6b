from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from carbond.errors import SensorUnavailable
from carbond.model import SensorRead
from carbond.procfs import HostSample
from carbond.sensors.amdsmi import AmdSmiSensor
from carbond.testing.clock import ManualClock
from tests.harness.daemon import Daemon, Metrics

FAKE_DIR = Path(importlib.import_module("carbond.testing.amdsmi_fake").__path__[0])


def fake(spec: dict[str, Any], clock: ManualClock | None = None) -> ModuleType:
    mod = importlib.import_module("carbond.testing.amdsmi_fake.amdsmi")
    mod.configure(spec, clock or time.monotonic)
    return mod


async def started(spec: dict[str, Any], **kw: Any) -> tuple[AmdSmiSensor, ManualClock, ModuleType]:
    """A sensor started on a manual clock that the fake shares. start() checks each counter against the power
    reading across a real sleep timed on the sensor's clock, so the clock follows the loop's time until start()
    returns; then it stands still until the test moves it."""
    clock = ManualClock()
    mod = fake(spec, clock)
    s = AmdSmiSensor(clock, module=mod, **kw)
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(s.start())
    base, t0 = clock.now, loop.time()
    while not starting.done():
        await asyncio.wait({starting}, timeout=0.01)
        clock.now = base + loop.time() - t0
    await starting
    return s, clock, mod


def gpu(i: int, watts: float, **kw: Any) -> dict[str, Any]:
    return {"name": "AMD Instinct MI250X", "uuid": f"{i:08x}-0000-1000-8000-00000000000{i}", "power_w": watts, **kw}


NO_HOST = HostSample(b"")  # amdsmi does not look at /proc


async def read(s: AmdSmiSensor) -> SensorRead:
    return await s.read(NO_HOST)


async def watts_of(s: AmdSmiSensor, clock: ManualClock, seconds: float = 0.5) -> dict[str, float]:
    """Mean power per device over ``seconds`` of the manual clock, from the energy and times the sensor reports."""
    a = {r.device: r for r in (await read(s)).readings}
    clock.advance(seconds)
    return {r.device: (r.joules - a[r.device].joules) / (r.at - a[r.device].at) for r in (await read(s)).readings}


@pytest.mark.asyncio
async def test_mi250_pair_shows_one_gpu_with_both_dies_power() -> None:
    s, clock, _ = await started({"gpus": [gpu(0, 500.0), gpu(1, 500.0, zero_die=True)]})
    watts = await watts_of(s, clock)
    assert set(watts) == {"gpu-0"}  # no 0 W GPU
    assert watts["gpu-0"] == pytest.approx(500.0, rel=1e-6)
    await s.close()


@pytest.mark.asyncio
async def test_counter_validation_falls_back_to_power_and_legacy_key() -> None:
    spec = {"gpus": [gpu(0, 300.0, bad_resolution=True), gpu(1, 200.0, legacy_key=True), gpu(2, 100.0, counter=False)]}
    s, clock, _ = await started(spec, power_sample_hz=20)
    info = {i.device: i for i in (await read(s)).device_info}
    assert info["gpu-0"].method == "power integration"
    assert "counter gave" in info["gpu-0"].detail
    assert info["gpu-1"].method == "energy counter"
    assert info["gpu-2"].method == "power integration"
    assert {i.model for i in info.values()} == {"AMD Instinct MI250X"}
    watts = await watts_of(s, clock)
    assert watts["gpu-0"] == pytest.approx(300.0, rel=1e-6)
    assert watts["gpu-1"] == pytest.approx(200.0, rel=1e-6)
    assert watts["gpu-2"] == pytest.approx(100.0, rel=1e-6)
    await s.close()


@pytest.mark.asyncio
async def test_not_initialised_is_retried_after_reinit() -> None:
    mod = fake({"gpus": [gpu(0, 250.0)]})
    s = AmdSmiSensor(time.monotonic, module=mod)
    await s.start()
    await read(s)
    mod.fail_not_init_once()
    result = await read(s)
    assert [r.device for r in result.readings] == ["gpu-0"]
    assert result.partial_errors == 0
    await s.close()


@pytest.mark.asyncio
async def test_driver_missing_is_unavailable() -> None:
    with pytest.raises(SensorUnavailable, match="DRIVER_NOT_LOADED"):
        await AmdSmiSensor(time.monotonic, module=fake({"gpus": [], "missing": "driver"})).start()


def test_mi250_end_to_end(tmp_path: Path) -> None:
    spec = {"gpus": [gpu(0, 480.0), gpu(1, 480.0, zero_die=True), gpu(2, 450.0), gpu(3, 450.0, zero_die=True)]}
    (tmp_path / "amd.json").write_text(json.dumps(spec))
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")]),
        "CARBOND_FAKE_AMDSMI": str(tmp_path / "amd.json"),
    }

    def power_of(m: Metrics) -> dict[str | None, float]:
        return {dict(lab).get("device"): v for (n, lab), v in m.items() if n == "carbond_device_power_watts"}

    with Daemon(tmp_path, {"measure_power_secs": 0.5, "sensors": ["amdsmi"]}, env=env) as d:
        d.wait_for(power_of, what="a GPU power figure")
        power = power_of(d.wait_for_ticks(1))  # every GPU of the first tick, and one tick more
    assert set(power) == {"gpu-0", "gpu-2"}
    assert power["gpu-0"] == pytest.approx(480.0, rel=0.01)
    assert power["gpu-2"] == pytest.approx(450.0, rel=0.01)


@pytest.mark.asyncio
async def test_gpu_failing_at_start_is_down_the_others_measured_and_it_comes_back() -> None:
    spec = {"gpus": [gpu(0, 300.0), gpu(1, 200.0, lost_for_s=0.3), gpu(2, 100.0, counter=False)]}
    s, clock, _ = await started(spec, retry_secs=1.0, power_sample_hz=20)  # one GPU failing: not unavailable
    result = await read(s)
    assert {r.device for r in result.readings} == {"gpu-0", "gpu-2"}
    assert [d.device for d in result.down] == ["gpu-1"]
    assert "6" in result.down[0].reason
    assert [i.device for i in result.device_info] == ["gpu-0", "gpu-2"]
    clock.advance(1.0)  # back (lost for 0.3 s) and past its retry, 1 s after it failed in start()
    await read(s)
    watts = await watts_of(s, clock, 0.4)
    assert watts["gpu-1"] == pytest.approx(200.0, rel=1e-6)
    assert watts["gpu-2"] == pytest.approx(100.0, rel=1e-6)  # power-only: integrated, never 0 W
    assert not (await read(s)).down
    await s.close()
