"""Node power at the wall: the platform's figure where it reads, ``other`` = platform - components (never negative),
the component sum when the platform fails, a node total that never steps back, and attribution of ``other``."""

from __future__ import annotations

import math

import pytest
from structlog.testing import capture_logs

from carbond.model import Intensity, Snapshot
from carbond.monitor import Monitor
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from tests.harness.monitors import build_monitor

pytestmark = pytest.mark.asyncio
FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)
ADDITIVE = {"cpu", "dram", "gpu", "ram", "soc", "other"}


async def rig(platform_w: float) -> tuple[Monitor, FakeSensor, FakeSensor, ManualClock]:
    clock = ManualClock()
    parts = FakeSensor([FakeDevice("package-0", "cpu", 40.0), FakeDevice("dram-0", "dram", 6.0)], clock)
    wall = FakeSensor([FakeDevice("psu", "platform", platform_w)], clock)
    wall.name = "wall"
    for s in (parts, wall):
        await s.start()
    mon = build_monitor(parts, wall, host="n", intensity=FR, clock=clock)
    await mon.prime()
    return mon, parts, wall, clock


async def step(mon: Monitor, clock: ManualClock, seconds: float = 10.0) -> Snapshot:
    clock.advance(seconds)
    return await mon.tick()


def by_kind(snap: Snapshot) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in snap.devices.states:
        if d.kind in ADDITIVE and d.in_node_total:
            out[d.kind] = out.get(d.kind, 0.0) + d.energy_j_total
    return out


async def test_node_is_the_wall_and_other_is_the_rest() -> None:
    mon, _, _, clock = await rig(80.0)
    snap = await step(mon, clock)
    other = next(d for d in snap.devices.states if d.kind == "other")
    assert (other.device, other.sensor) == ("other", "wall")
    assert other.power_w == pytest.approx(34.0)
    assert snap.node.power_w == pytest.approx(80.0)
    assert snap.node.platform == "wall"
    assert snap.node.energy_j_total == pytest.approx(800.0)
    kinds = by_kind(snap)
    assert math.fsum(kinds.values()) == pytest.approx(snap.node.energy_j_total, rel=1e-12)  # additive kinds = node
    platform = next(d for d in snap.devices.states if d.kind == "platform")
    assert not platform.in_node_total
    assert platform.power_w == pytest.approx(80.0)


async def test_a_failed_platform_falls_back_to_components_and_never_steps_back() -> None:
    mon, _, wall, clock = await rig(80.0)
    first = await step(mon, clock)
    wall.fail_next(2)
    with capture_logs() as logs:
        down = await step(mon, clock)
        down2 = await step(mon, clock)
    assert down.node.platform == ""
    assert down.node.power_w == pytest.approx(46.0)
    assert down.node.energy_j_total == pytest.approx(first.node.energy_j_total + 460.0)
    assert down2.node.energy_j_total == pytest.approx(down.node.energy_j_total + 460.0)
    assert next(s for s in down.health.sensors if s.name == "wall").up is False
    other = next(d for d in down.devices.states if d.kind == "other")
    assert math.isnan(other.power_w)  # no stale figure for other while the wall is unknown
    assert [e["event"] for e in logs].count("node_source_components") == 1  # one line per change, not per tick
    # The wall's counter ran on while its reads failed: its delta back spans the two ticks already charged at the
    # component sum, and is charged only beyond them, so over the three ticks the node is exactly what the wall
    # counted: no interval twice, no spike.
    back = await step(mon, clock)
    assert back.node.platform == "wall"
    assert back.node.energy_j_total == pytest.approx(first.node.energy_j_total + 3 * 800.0)
    again = await step(mon, clock)
    assert again.node.energy_j_total == pytest.approx(back.node.energy_j_total + 800.0)
    assert math.fsum(by_kind(again).values()) == pytest.approx(again.node.energy_j_total, rel=1e-12)


async def test_a_tick_without_a_new_wall_sample_is_not_counted_twice() -> None:
    """A meter polled as often as the ticks drifts against them: a tick can see no new sample (the same reading
    again), and the next one a delta spanning two ticks."""
    mon, _, wall, clock = await rig(80.0)
    first = await step(mon, clock)
    frozen_at = clock.now
    real_read = wall.read

    async def same_reading(host: object) -> object:  # the last sample again, as a slow meter gives it
        got = await real_read(host)  # type: ignore[arg-type]
        return type(got)(
            tuple(type(r)(r.device, r.kind, 80.0 * (frozen_at - 1000.0), frozen_at, False, False) for r in got.readings)
        )

    wall.read = same_reading  # type: ignore[method-assign]
    stale = await step(mon, clock)
    wall.read = real_read  # type: ignore[method-assign]
    assert stale.node.platform == ""
    assert stale.node.energy_j_total == pytest.approx(first.node.energy_j_total + 460.0)
    caught_up = await step(mon, clock)
    assert caught_up.node.platform == "wall"
    assert caught_up.node.energy_j_total == pytest.approx(first.node.energy_j_total + 2 * 800.0)
    other = next(d for d in caught_up.devices.states if d.kind == "other")
    assert other.power_w == pytest.approx((1600.0 - 460.0 - 460.0) / 20.0)  # over the wall's 20 s span


async def test_components_above_the_wall_are_clamped_counted_and_logged_once() -> None:
    mon, _, _, clock = await rig(30.0)  # less than the 46 W of the components: a slow or wrong meter
    with capture_logs() as logs:
        a = await step(mon, clock)
        b = await step(mon, clock)
    other = next(d for d in b.devices.states if d.kind == "other")
    assert other.power_w == 0.0
    assert other.energy_j_total == 0.0
    assert b.node.power_w == pytest.approx(46.0)
    assert b.node.energy_j_total == pytest.approx(920.0)
    assert (a.node.platform_clamped_total, b.node.platform_clamped_total) == (1, 2)
    assert [e["event"] for e in logs].count("platform_below_components") == 1
    assert math.fsum(by_kind(b).values()) == pytest.approx(b.node.energy_j_total, rel=1e-12)


async def test_power_change_at_the_wall_moves_other_only() -> None:
    mon, _, wall, clock = await rig(80.0)
    await step(mon, clock)
    wall.set_watts("psu", 100.0)
    snap = await step(mon, clock)
    other = next(d for d in snap.devices.states if d.kind == "other")
    assert other.power_w == pytest.approx(54.0)
    assert snap.node.power_w == pytest.approx(100.0)
