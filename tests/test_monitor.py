from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from carbond.model import Intensity, Reading, SensorRead, Snapshot
from carbond.monitor import Monitor
from carbond.procfs import HostSample
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from tests.harness.monitors import build_monitor
from tests.harness.wait import eventually_async

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)


def make(
    clock: ManualClock, *devices: FakeDevice, pue: float = 1.0, interval: float = 15.0
) -> tuple[Monitor, FakeSensor]:
    sensor = FakeSensor(devices, clock)
    mon = build_monitor(sensor, interval_s=interval, pue=pue, intensity=FR, clock=clock, wall_clock=lambda: 1.7e9)
    return mon, sensor


@pytest.mark.asyncio
async def test_power_energy_and_emissions_are_exact() -> None:
    clock = ManualClock()
    mon, sensor = make(clock, FakeDevice("package-0", "cpu", 40.0), FakeDevice("dram-0", "dram", 6.0), pue=1.2)
    await sensor.start()
    await mon.tick()
    for _ in range(4):
        clock.advance(15)
        snap = await mon.tick()
    by = {d.device: d for d in snap.devices.states}
    assert by["package-0"].power_w == pytest.approx(40.0)
    assert by["dram-0"].power_w == pytest.approx(6.0)
    assert snap.node.power_w == pytest.approx(46.0)
    assert snap.node.energy_j_total == pytest.approx(46.0 * 60)
    kwh = 46.0 * 60 / 3.6e6
    assert snap.node.emissions_g_total == pytest.approx(kwh * 1.2 * 56.0, rel=1e-9)
    assert by["package-0"].emissions_g_total == pytest.approx(40 * 60 / 3.6e6 * 1.2 * 56.0, rel=1e-9)


@pytest.mark.asyncio
async def test_contained_domains_stay_out_of_the_node_total() -> None:
    clock = ManualClock()
    mon, sensor = make(
        clock, FakeDevice("package-0", "cpu", 40.0), FakeDevice("core-0", "cpu", 30.0, in_node_total=False)
    )
    await sensor.start()
    await mon.tick()
    clock.advance(10)
    snap = await mon.tick()
    assert snap.node.power_w == pytest.approx(40.0)
    assert snap.node.energy_j_total == pytest.approx(400.0)


@pytest.mark.asyncio
async def test_failed_read_marks_down_then_recovers_without_spike() -> None:
    clock = ManualClock()
    mon, sensor = make(clock, FakeDevice("package-0", "cpu", 40.0))
    await sensor.start()
    await mon.tick()
    clock.advance(15)
    sensor.fail_next()
    snap = await mon.tick()
    assert snap.health.sensors[0].up is False
    assert snap.health.sensors[0].errors_total == 1
    clock.advance(15)
    snap = await mon.tick()
    assert snap.health.sensors[0].up is True
    dev = snap.devices.states[0]
    assert dev.power_w == pytest.approx(40.0)  # the gap is spread over 30 s, not dumped into 15
    assert dev.energy_j_total == pytest.approx(40.0 * 30)  # and none of it is lost


@pytest.mark.asyncio
async def test_stale_device_has_no_power_but_keeps_its_counter() -> None:
    clock = ManualClock()
    mon, sensor = make(clock, FakeDevice("package-0", "cpu", 40.0))
    await sensor.start()
    await mon.tick()
    clock.advance(15)
    await mon.tick()
    sensor.fail_next(3)
    for _ in range(3):
        clock.advance(15)
        snap = await mon.tick()
    assert math.isnan(snap.devices.states[0].power_w)
    assert snap.devices.states[0].energy_j_total == pytest.approx(600.0)
    assert math.isnan(snap.node.power_w)  # no fresh device: no node power, never a silent 0


class HangingSensor:
    name = "hang"
    inline = False
    covers = frozenset({"gpu"})

    async def start(self) -> None:
        return None

    async def read(self, host: HostSample) -> SensorRead:
        await asyncio.sleep(3600)
        return SensorRead(())

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
async def test_hung_sensor_is_timed_out_and_others_report() -> None:
    clock = ManualClock()
    fake = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await fake.start()
    mon = build_monitor(fake, HangingSensor(), interval_s=1, intensity=FR, sensor_timeout_s=0.05, clock=clock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    snap = await mon.tick()
    assert loop.time() - started < 1.0
    states = {s.name: s for s in snap.health.sensors}
    assert states["hang"].up is False
    assert "timed out" in states["hang"].reason
    assert states["fake"].up is True


class BackwardsSensor:
    name = "back"
    inline = True
    covers = frozenset({"cpu"})

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.t = 0.0

    async def start(self) -> None:
        return None

    async def read(self, host: HostSample) -> SensorRead:
        self.t += 1
        return SensorRead((Reading("package-0", "cpu", self.values.pop(0), self.t),))

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
async def test_energy_going_backwards_is_never_negative() -> None:
    sensor = BackwardsSensor([100.0, 140.0, 10.0, 50.0])
    mon = build_monitor(sensor, interval_s=1, intensity=FR, clock=ManualClock())
    for _ in range(4):
        snap = await mon.tick()
    assert snap.node.energy_j_total == pytest.approx(80.0)  # 40 before the reset, 40 after; the step back adds 0


@pytest.mark.asyncio
async def test_tick_histogram_counts_every_tick() -> None:
    clock = ManualClock()
    mon, sensor = make(clock, FakeDevice("package-0", "cpu", 1.0))
    await sensor.start()
    for _ in range(5):
        snap = await mon.tick()
    assert snap.health.tick_duration.count == 5
    assert snap.health.tick_duration.counts[-1] == 5  # zero time on a frozen clock lands in every bucket
    assert snap.seq == 5


@pytest.mark.asyncio
async def test_run_is_drift_free_and_stops_promptly() -> None:
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 1.0)], asyncio.get_running_loop().time)
    await sensor.start()
    loop = asyncio.get_running_loop()
    mon = build_monitor(sensor, interval_s=0.05, intensity=FR, sensor_timeout_s=0.04, clock=loop.time)
    stop = asyncio.Event()
    started = loop.time()
    task = asyncio.create_task(mon.run(stop))
    await asyncio.sleep(0.52)  # the run under test: ticks are counted against the time it actually lasted
    stop.set()
    ran_s = loop.time() - started
    await asyncio.wait_for(task, 1.0)
    snap = mon.latest()
    assert snap is not None
    # a tick per 0.05 s slot begun plus the final one; drift would lose ticks, bunching would add them
    slots = ran_s / 0.05
    assert slots - 2 <= snap.seq <= slots + 3, (snap.seq, ran_s)


@pytest.mark.asyncio
async def test_first_published_snapshot_already_has_power() -> None:
    loop = asyncio.get_running_loop()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], loop.time)
    await sensor.start()
    mon = build_monitor(sensor, interval_s=0.2, intensity=FR, sensor_timeout_s=0.1, clock=loop.time)
    stop = asyncio.Event()
    task = asyncio.create_task(mon.run(stop))
    first = await eventually_async(mon.latest, what="a first snapshot")
    stop.set()
    await task
    assert first is not None
    assert first.seq == 1
    assert first.node.power_w == pytest.approx(40.0, rel=0.01)


@pytest.mark.asyncio
async def test_closing_the_pipeline_closes_every_kept_descriptor(tmp_path: Path) -> None:
    """A reload closes one pipeline's exit stack and builds another: the old one's descriptors must not leak."""
    import contextlib
    import os

    from carbond.builder import build_monitor
    from carbond.config import Config
    from carbond.testing.cgroupfs import CgroupTree

    tree = CgroupTree(tmp_path / "cg")
    tree.add("system.slice/a.service", cpus=0.5, memory_bytes=1 << 20)
    fds = len(os.listdir("/proc/self/fd"))
    cfg = Config(  # the real /proc: its files are generated on read, so /proc/stat and /proc/meminfo are kept open
        sensors=["fake"],
        measure_power_secs=0.1,
        state_dir=tmp_path / "state",
        paths={"cgroupfs": tmp_path / "cg", "sysfs": tmp_path / "no-sys"},
        embodied={"enabled": False},
    )
    stack = contextlib.AsyncExitStack()
    mon, _ = await build_monitor(cfg, stack)
    stop = asyncio.Event()
    task = asyncio.create_task(mon.run(stop))
    await eventually_async(mon.latest, what="a first tick")
    assert len(os.listdir("/proc/self/fd")) > fds  # descriptors are kept while it runs
    stop.set()
    await asyncio.wait_for(task, 1.0)
    await stack.aclose()
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.asyncio
async def test_an_observer_that_raises_is_dropped_with_one_log_line_and_ticks_go_on() -> None:
    clock = ManualClock()
    mon, sensor = make(clock, FakeDevice("package-0", "cpu", 40.0))
    await sensor.start()
    seen: list[float] = []

    def broken(_snap: Snapshot) -> None:
        raise ValueError("bug")

    mon.on_snapshot(broken)
    mon.on_snapshot(lambda snap: seen.append(snap.node.energy_j_total))
    with capture_logs() as logs:
        for _ in range(3):
            clock.advance(15)
            await mon.tick()
    failed = [e for e in logs if e["event"] == "snapshot_observer_failed"]
    assert len(failed) == 1
    assert "ValueError: bug" in failed[0]["error"]
    assert len(seen) == 3  # the other observer saw every tick
    assert seen[-1] > seen[0]
