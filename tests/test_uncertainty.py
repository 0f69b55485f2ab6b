"""Error bars: bands per method and intensity source, propagated to devices, node, emissions, jobs and reports."""

from __future__ import annotations

import math

import pytest

from carbond.job.report import Report
from carbond.job.text import plus_minus
from carbond.model import DeviceInfo, Intensity, Snapshot
from carbond.monitor import Monitor
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from carbond.uncertainty import (
    INTENSITY_LIVE,
    INTENSITY_YEARLY,
    METHODS,
    device_band,
    emissions_rel,
    intensity_band,
    rss,
)
from tests.harness.monitors import build_monitor

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0, year=2023)


def named(sensor: FakeSensor, name: str) -> FakeSensor:
    sensor.name = name  # the bands follow the sensor's name, as a real rapl or ipmi sensor would carry
    return sensor


async def monitor(wall_w: float | None = None, pue: float = 1.0, pue_u: float = 0.0) -> tuple[Monitor, ManualClock]:
    clock = ManualClock()
    sensors = [
        named(FakeSensor([FakeDevice("package-0", "cpu", 40.0), FakeDevice("dram-0", "dram", 6.0)], clock), "rapl")
    ]
    if wall_w is not None:
        sensors.append(named(FakeSensor([FakeDevice("bmc", "platform", wall_w)], clock), "ipmi"))
    for s in sensors:
        await s.start()
    mon = build_monitor(*sensors, host="n", pue=pue, pue_u=pue_u, intensity=FR, clock=clock)
    await mon.prime()
    return mon, clock


async def ticks(mon: Monitor, clock: ManualClock, n: int) -> Snapshot:
    snap = None
    for _ in range(n):
        clock.advance(10)
        snap = await mon.tick()
    assert snap is not None
    return snap


def device(snap: Snapshot, name: str) -> tuple[float, float]:
    d = next(d for d in snap.devices.states if d.device == name)
    return d.power_u_w, d.energy_u_j_total


def test_bands_follow_the_method() -> None:
    assert device_band("rapl", "cpu", None) is METHODS["rapl:cpu"]
    assert device_band("rapl", "dram", None) is METHODS["rapl:dram"]
    counter = DeviceInfo("gpu-0", "A100", sensor="nvml", method="energy counter")
    sampled = DeviceInfo("gpu-0", "T4", sensor="nvml", method="power integration")
    assert device_band("nvml", "gpu", counter).rel < device_band("nvml", "gpu", sampled).rel
    configured = DeviceInfo("cpu-0", "x", sensor="tdp", method="tdp", detail="cpu.tdp_watts 65 W")
    table = DeviceInfo("cpu-0", "x", sensor="tdp", method="tdp", detail="Xeon TDP 205 W per socket")
    assert device_band("tdp", "cpu", configured).term == "configured CPU power"
    assert device_band("tdp", "cpu", table).term == "TDP model"
    assert device_band("tdp", "cpu", DeviceInfo("cpu-0", "", method="per-thread-default")).rel == 1.0
    meter = DeviceInfo("power1", "acpi", sensor="hwmon", detail="accuracy 1.5%")
    assert device_band("hwmon", "platform", meter).rel == pytest.approx(0.015 / math.sqrt(3))
    assert intensity_band(FR) is INTENSITY_YEARLY
    live = Intensity(g_per_kwh=200.0, provider="electricitymaps", zone="DE", observed_at=0.0)
    assert intensity_band(live) is INTENSITY_LIVE
    direct = Intensity(g_per_kwh=200.0, provider="electricitymaps", zone="DE", observed_at=0.0, factor_type="direct")
    assert intensity_band(direct).rel == pytest.approx(rss(INTENSITY_LIVE.rel, 0.10))


@pytest.mark.asyncio
async def test_component_node_correlated_within_a_sensor_and_linear_in_time() -> None:
    mon, clock = await monitor()
    snap = await ticks(mon, clock, 3)
    per_tick = 0.05 * 400.0 + 0.15 * 60.0  # package and dram of one sensor: linear
    assert snap.node.energy_u_j_total == pytest.approx(3 * per_tick)
    assert snap.node.power_u_w == pytest.approx(per_tick / 10)
    assert device(snap, "package-0") == pytest.approx((2.0, 60.0))
    rel_g = emissions_rel(per_tick / 460.0, INTENSITY_YEARLY.rel, 1.0, 0.0)
    assert snap.node.emissions_u_g_total == pytest.approx(snap.node.emissions_g_total * rel_g)
    assert snap.node.uncertainty_dominant == "yearly-average intensity"


@pytest.mark.asyncio
async def test_at_the_wall_the_node_takes_the_meter_s_band_and_other_both() -> None:
    mon, clock = await monitor(wall_w=80.0)
    snap = await ticks(mon, clock, 2)
    assert snap.node.energy_u_j_total == pytest.approx(2 * 0.05 * 800.0)
    power_u, energy_u = device(snap, "other")
    components_u = 0.05 * 400.0 + 0.15 * 60.0
    assert energy_u == pytest.approx(2 * rss(0.05 * 800.0, components_u))
    assert power_u == pytest.approx(rss(0.05 * 800.0, components_u) / 10)


@pytest.mark.asyncio
async def test_pue_band_enters_the_emissions() -> None:
    exact, c1 = await monitor(pue=1.4)
    banded, c2 = await monitor(pue=1.4, pue_u=0.2)
    a, b = await ticks(exact, c1, 1), await ticks(banded, c2, 1)
    assert a.node.emissions_g_total == pytest.approx(b.node.emissions_g_total)
    rel_e = (0.05 * 400.0 + 0.15 * 60.0) / 460.0
    assert b.node.emissions_u_g_total == pytest.approx(
        b.node.emissions_g_total * emissions_rel(rel_e, INTENSITY_YEARLY.rel, 1.4, 0.2)
    )
    assert b.node.emissions_u_g_total > a.node.emissions_u_g_total


def test_report_states_value_uncertainty_and_dominant_term() -> None:
    r = Report("p", "r", 0.0, 1.0, scope="machine", emissions_g=12.3, emissions_u_g=2.1)
    r.uncertainty_dominant = "yearly-average intensity"
    assert plus_minus(r) == " +- 2.10 g (mostly: yearly-average intensity)"
    assert plus_minus(Report("p", "r", 0.0, 1.0)) == ""
