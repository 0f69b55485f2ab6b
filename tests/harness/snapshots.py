"""A frozen, fully deterministic snapshot (golden exposition, exporter tests)."""

from __future__ import annotations

from carbond.embodied import Embodied, EmbodiedConfig
from carbond.model import Intensity, Snapshot
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from tests.harness.monitors import build_monitor

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0, source="owid", year=2023)


async def frozen_snapshot() -> Snapshot:
    """Four 15 s ticks of package 40 W (core 25 W inside it) and dram 6 W at PUE 1.25 in FR; a 1,000 kg server."""
    clock = ManualClock()
    sensor = FakeSensor(
        [
            FakeDevice("package-0", "cpu", 40.0),
            FakeDevice("core-0", "core", 25.0, in_node_total=False),
            FakeDevice("dram-0", "dram", 6.0),
        ],
        clock,
    )
    await sensor.start()
    mon = build_monitor(
        sensor,
        host="node-a",
        interval_s=15,
        pue=1.25,
        intensity=FR,
        sensor_timeout_s=5,
        clock=clock,
        wall_clock=lambda: 1.7e9,
        embodied=Embodied(EmbodiedConfig(), 1000.0),
    )
    snap = await mon.tick()
    for _ in range(4):
        clock.advance(15)
        snap = await mon.tick()
    return snap
