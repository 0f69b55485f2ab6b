"""A tick that overruns its slot: the monitor logs ``tick_overran`` with the slots it skips and keeps its
drift-free schedule, rather than bunching the late ticks together."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from carbond.model import Intensity, SensorRead
from carbond.monitor import Monitor
from carbond.procfs import HostSample
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from tests.harness.monitors import build_monitor
from tests.harness.wait import eventually_async

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)
INTERVAL_S = 0.05  # real seconds the loop sleeps at most between ticks; the schedule itself runs on the clock


class SlowFakeSensor(FakeSensor):
    """A FakeSensor whose every read takes ``takes_s`` of the injected manual clock (a slow bus or driver)."""

    def __init__(self, devices: Sequence[FakeDevice], clock: ManualClock, takes_s: float) -> None:
        super().__init__(devices, clock)
        self._manual = clock
        self.takes_s = takes_s

    async def read(self, host: HostSample) -> SensorRead:
        self._manual.advance(self.takes_s)
        return await super().read(host)


async def run_until(takes_s: float, ticks: int) -> tuple[list[MutableMapping[str, Any]], Monitor]:
    """Run a monitor on a sensor taking ``takes_s`` per read until it has published ``ticks`` snapshots."""
    clock = ManualClock()
    sensor = SlowFakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock, takes_s)
    await sensor.start()
    mon = build_monitor(
        sensor, interval_s=INTERVAL_S, intensity=FR, sensor_timeout_s=10.0, clock=clock, wall_clock=lambda: 1.7e9
    )
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(mon.run(stop))
        try:
            await eventually_async(lambda: (s := mon.latest()) is not None and s.seq >= ticks, what=f"{ticks} ticks")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10.0)
    return logs, mon


@pytest.mark.asyncio
async def test_a_tick_that_overruns_its_slot_is_logged_with_the_slots_skipped() -> None:
    logs, mon = await run_until(takes_s=2.5 * INTERVAL_S, ticks=3)  # each read lasts two and a half slots
    overran = [e for e in logs if e["event"] == "tick_overran"]
    # the first ends 2.5 slots after the schedule's start: the two slots it ran into are skipped, not more; later
    # ones begin where the last read left the clock (it moves only in reads), so they run into one or two
    assert overran, overran
    assert overran[0]["skipped"] == 2, overran
    assert all(e["skipped"] in (1, 2) for e in overran), overran
    assert overran[0]["log_level"] == "warning"
    snap = mon.latest()
    assert snap is not None
    assert snap.node.power_w == pytest.approx(40.0)  # a late tick measures the interval it really covered


@pytest.mark.asyncio
async def test_a_tick_within_its_slot_logs_nothing() -> None:
    logs, _ = await run_until(takes_s=0.5 * INTERVAL_S, ticks=4)
    assert [e for e in logs if e["event"] == "tick_overran"] == []
