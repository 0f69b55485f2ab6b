from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import Reading
from carbond.procfs import HostSample
from carbond.sensors.rapl import RaplSensor
from carbond.testing.clock import ManualClock
from carbond.testing.powercap import PowercapTree, typical_intel, unprivileged_reader
from tests.harness.wait import eventually_async


async def started(sysfs: Path, clock: ManualClock | None = None, **kw: object) -> RaplSensor:
    s = RaplSensor(sysfs, clock or ManualClock(), **kw)  # type: ignore[arg-type]
    await s.start()
    return s


NO_HOST = HostSample(b"")  # RAPL does not look at /proc


async def read(s: RaplSensor) -> tuple[Reading, ...]:
    return (await s.read(NO_HOST)).readings


async def totals(s: RaplSensor) -> dict[str, float]:
    return {r.device: r.joules for r in await read(s)}


@pytest.mark.asyncio
async def test_symlinked_tree_is_walked_once(tmp_path: Path) -> None:
    typical_intel(tmp_path)
    s = await started(tmp_path)
    readings = await read(s)
    assert sorted(r.device for r in readings) == ["core-0", "dram-0", "package-0", "uncore-0"]
    node = {r.device for r in readings if r.in_node_total}
    assert node == {"package-0", "dram-0"}  # core/uncore are inside the package
    assert s.covers == {"cpu", "dram"}
    await s.close()


@pytest.mark.asyncio
async def test_psys_alone_is_the_node_total(tmp_path: Path) -> None:
    typical_intel(tmp_path, psys=True)
    s = await started(tmp_path)
    assert {r.device for r in await read(s) if r.in_node_total} == {"psys"}
    await s.close()
    s = await started(tmp_path, use_psys=False)
    assert {r.device for r in await read(s) if r.in_node_total} == {"package-0", "dram-0"}
    await s.close()


@pytest.mark.asyncio
async def test_mmio_copy_of_package_is_dropped(tmp_path: Path) -> None:
    typical_intel(tmp_path, mmio=True)
    s = await started(tmp_path)
    assert [r.device for r in await read(s)].count("package-0") == 1
    await s.close()


@pytest.mark.asyncio
async def test_mmio_only_view_is_kept(tmp_path: Path) -> None:
    PowercapTree(tmp_path).add_zone("package-0", mmio=True)
    s = await started(tmp_path)
    assert [r.device for r in await read(s)] == ["package-0"]
    await s.close()


@pytest.mark.asyncio
async def test_wrap_is_exact(tmp_path: Path) -> None:
    clock = ManualClock()
    pkg = PowercapTree(tmp_path).add_zone("package-0", range_uj=2_000_000_000)
    pkg.set_energy_uj(1_500_000_000)
    s = await started(tmp_path, clock)
    clock.advance(3)
    pkg.advance(1000.0)  # 1500 J + 1000 J wraps to 500 J
    assert pkg.energy_uj == 500_000_000
    assert (await totals(s))["package-0"] == pytest.approx(1000.0, abs=1e-6)
    await s.close()


@pytest.mark.asyncio
async def test_fast_wrapping_counter_is_polled_between_ticks(tmp_path: Path) -> None:
    # a 20 J range at 40 W wraps every 0.5 s; between two reads the poller must see every wrap
    range_j, watts = 20.0, 40.0
    pkg = PowercapTree(tmp_path).add_zone("package-0", range_uj=round(range_j * 1e6))
    t0 = time.monotonic()
    raws: list[int] = []

    def counter_at_read(path: Path) -> str:
        """The counter as a 40 W load makes it at the moment it is read (the sensor stamps its clock right after),
        so energy and reported times agree without a writer thread lagging behind."""
        if path.name == "energy_uj":
            pkg.set_energy_uj(round(watts * (time.monotonic() - t0) * 1e6) % round(range_j * 1e6))
            raws.append(pkg.energy_uj)
        return path.read_text()

    def wraps() -> int:
        return sum(b < a for a, b in itertools.pairwise(raws))

    s = RaplSensor(tmp_path, time.monotonic, max_power_w=100.0, read_file=counter_at_read)
    await s.start()
    assert s.poll_interval_s == pytest.approx(0.1)
    first = (await read(s))[0]
    seen = wraps()
    await eventually_async(lambda: wraps() >= seen + 2, what="two wraps seen by the poller")
    last = (await read(s))[0]
    await s.close()
    delta, elapsed = last.joules - first.joules, last.at - first.at
    assert last.raw_j is not None
    assert first.raw_j is not None
    # exact modulo the range: the sensor adds what the counter moved, plus whole ranges for the wraps it saw ...
    wrapped = (delta - (last.raw_j - first.raw_j)) / range_j
    assert wrapped == pytest.approx(round(wrapped), abs=1e-6)
    assert round(wrapped) >= 2
    # ... and a wrap missed would be a whole range (20 J) off what 40 W gave over the interval it reports
    assert abs(delta - watts * elapsed) < range_j / 4, (delta, elapsed)


@pytest.mark.asyncio
@pytest.mark.parametrize("garbage", ["", "abc\n", "-5\n", "99999999999999999\n"])
async def test_garbage_read_gives_no_reading_and_no_spike(tmp_path: Path, garbage: str) -> None:
    clock = ManualClock()
    tree = PowercapTree(tmp_path)
    pkg = tree.add_zone("package-0", range_uj=10**12)
    dram = tree.add_zone("dram", parent=pkg)
    s = await started(tmp_path, clock)
    clock.advance(10)
    pkg.advance(400.0)
    dram.advance(60.0)
    before = await totals(s)
    clock.advance(10)
    pkg.advance(400.0)
    dram.advance(60.0)
    pkg.corrupt(garbage)
    during = await totals(s)
    assert "package-0" not in during
    assert during["dram-0"] == pytest.approx(120.0)
    clock.advance(10)
    pkg.restore()
    pkg.advance(400.0)
    after = await totals(s)
    # 40 W over the 20 s since the last good reading: no energy lost, none invented
    assert after["package-0"] - before["package-0"] == pytest.approx(800.0)
    await s.close()


@pytest.mark.asyncio
async def test_implausible_jump_is_rejected_then_rebaselined(tmp_path: Path) -> None:
    clock = ManualClock()
    pkg = PowercapTree(tmp_path).add_zone("package-0", range_uj=10**12)
    pkg.set_energy_uj(10**9)
    s = await started(tmp_path, clock, max_power_w=500.0)
    clock.advance(1)
    pkg.set_energy_uj(10**9 + 500 * 10**6)  # 500 J in 1 s at 500 W max: 1000 W plausible bound, fine
    assert (await totals(s))["package-0"] == pytest.approx(500.0)
    clock.advance(1)
    pkg.set_energy_uj(10**9 + 500 * 10**6 + 900_000 * 10**6)  # 900 kJ in a second: garbage
    with pytest.raises(SensorReadError):
        await read(s)
    clock.advance(1)
    with pytest.raises(SensorReadError):
        await read(s)
    clock.advance(1)
    with pytest.raises(SensorReadError):  # the third in a row re-baselines without counting
        await read(s)
    clock.advance(1)
    pkg.advance(100.0)
    assert (await totals(s))["package-0"] == pytest.approx(600.0)
    await s.close()


@pytest.mark.asyncio
async def test_mirrored_dies_are_counted_once(tmp_path: Path) -> None:
    clock = ManualClock()
    tree = PowercapTree(tmp_path)
    d0, d1 = tree.add_zone("package-0-die-0"), tree.add_zone("package-0-die-1")
    d0.set_energy_uj(7_000_000)
    d1.set_energy_uj(7_000_000)
    s = await started(tmp_path, clock)
    clock.advance(1)
    d0.advance(50.0)
    d1.advance(50.0)
    readings = await read(s)
    assert [r.device for r in readings] == ["package-0-die-0"]
    assert sum(r.joules for r in readings if r.in_node_total) == pytest.approx(50.0)
    await s.close()


@pytest.mark.asyncio
async def test_distinct_dies_are_both_counted(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path)
    d0, d1 = tree.add_zone("package-0-die-0"), tree.add_zone("package-0-die-1")
    d0.set_energy_uj(7_000_000)
    d1.set_energy_uj(9_000_000)
    clock = ManualClock()
    s = await started(tmp_path, clock)
    clock.advance(1)
    d0.advance(30.0)
    d1.advance(20.0)
    readings = await read(s)
    assert sum(r.joules for r in readings if r.in_node_total) == pytest.approx(50.0)
    await s.close()


@pytest.mark.asyncio
async def test_root_only_counters_explain_how_to_grant_access(tmp_path: Path) -> None:
    typical_intel(tmp_path)
    for p in tmp_path.rglob("energy_uj"):
        p.chmod(0o400)
    s = RaplSensor(tmp_path, ManualClock(), read_file=unprivileged_reader)
    with pytest.raises(SensorUnavailable) as info:
        await s.start()
    reason = info.value.reason
    assert "energy_uj" in reason
    assert "CVE-2020-8694" in reason
    assert "udev" in reason
    assert "0440" in reason
    assert "0444" not in reason


@pytest.mark.asyncio
async def test_unknown_range_skips_the_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    pkg = PowercapTree(tmp_path).add_zone("package-0", range_uj=None)
    pkg.set_energy_uj(5_000_000_000)
    s = await started(tmp_path, clock)
    clock.advance(1)
    pkg.set_energy_uj(100_000_000)  # went back; without the range we cannot know how much
    with pytest.raises(SensorReadError):
        await read(s)
    clock.advance(1)
    pkg.set_energy_uj(150_000_000)
    assert (await totals(s))["package-0"] == pytest.approx(50.0)  # only what is known: never garbage
    await s.close()


@pytest.mark.asyncio
async def test_no_zones(tmp_path: Path) -> None:
    with pytest.raises(SensorUnavailable, match="no powercap RAPL zones"):
        await RaplSensor(tmp_path, ManualClock()).start()
