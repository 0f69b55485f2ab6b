"""In-process figures: CPU time per tick on fixtures (powercap tree + RAM model, plus fake GPUs), back to back, and
the daemon's embedded defaults on their real 1 s schedule (cold caches, the wake-up included)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from carbond import builder, logs
from carbond.config import Config
from carbond.intensity import FixedIntensity
from carbond.model import Intensity
from carbond.monitor import Monitor
from carbond.sensors.base import Sensor
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.sensors.ram import RamSensor
from carbond.sensors.rapl import MAX_POWER_W, RaplSensor
from carbond.state import Persistence, StateStore
from carbond.testing.powercap import typical_intel
from carbond.testing.procfs import ProcTree

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)


async def _tick_cpu(root: Path, gpus: int, ticks: int, persist: bool) -> list[float]:
    typical_intel(root / "sys", psys=True)
    ProcTree(root / "proc")
    sensors: list[Sensor] = [RaplSensor(root / "sys", time.monotonic), RamSensor(root / "proc", time.monotonic)]
    if gpus:
        sensors.append(FakeSensor([FakeDevice(f"gpu-{i}", "gpu", 250.0) for i in range(gpus)], time.monotonic))
    for s in sensors:
        await s.start()
    persistence = Persistence(StateStore(root / "state"), "bench", "boot", max_power_w=MAX_POWER_W) if persist else None
    mon = Monitor(
        sensors,
        host="bench",
        interval_s=1.0,
        pue=1.2,
        intensity=FixedIntensity(FR),
        sensor_timeout_s=1.0,
        persistence=persistence,
    )
    await mon.tick()
    samples = []
    for _ in range(ticks):
        t0 = time.process_time()
        await mon.tick()
        samples.append(time.process_time() - t0)
    for s in sensors:
        await s.close()
    return samples


async def _scheduled_cpu(root: Path, seconds: float) -> float:
    """CPU seconds per tick of ``Monitor.run`` on the embedded defaults (this machine's sensors, attribution, state)."""
    logs.configure("error", "json")  # the start-up events would clutter the bench's output
    stack = contextlib.AsyncExitStack()
    mon, _ = await builder.build_monitor(Config(measure_power_secs=1, state_dir=root / "state"), stack)

    def seq() -> int:
        snap = mon.latest()
        return snap.seq if snap is not None else 0

    stop = asyncio.Event()
    run = asyncio.create_task(mon.run(stop))
    await asyncio.sleep(2)  # past the start-up
    seq0, t0 = seq(), time.process_time()
    await asyncio.sleep(seconds)
    cpu, ticks = time.process_time() - t0, seq() - seq0
    stop.set()
    await run
    await stack.aclose()
    return cpu / max(ticks, 1)


def tick_costs(ticks: int = 300, scheduled_s: float = 30.0) -> dict[str, float]:
    """Median CPU milliseconds per tick for each scenario."""
    out = {}
    for label, gpus, persist in (
        ("machine only", 0, False),
        ("machine only + state file", 0, True),
        ("machine + 8 GPUs", 8, False),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            samples = asyncio.run(_tick_cpu(Path(tmp), gpus, ticks, persist))
        out[label] = statistics.median(samples) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        out["embedded defaults on a 1 s schedule (cold, wake-up included)"] = (
            asyncio.run(_scheduled_cpu(Path(tmp), scheduled_s)) * 1000
        )
    return out


if __name__ == "__main__":  # python -m bench.ticks
    for name, value in tick_costs().items():
        print(f"{name}: {value:.3f} ms")
