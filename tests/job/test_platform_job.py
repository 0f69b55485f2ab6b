"""A job on a machine with a wall meter: its share of ``other`` follows its share of the components' energy, as the
daemon splits it, and its report says the figures are at the wall."""

from __future__ import annotations

import pytest

from carbond.job.ledger import Ledger, Shares
from carbond.job.report import Report
from tests.test_platform_node import rig, step

pytestmark = pytest.mark.asyncio


async def test_job_share_of_other_follows_its_component_share() -> None:
    mon, _, _, clock = await rig(80.0)  # package 40 W, dram 6 W, wall 80 W: other 34 W
    first = await step(mon, clock)
    ledger = Ledger(first.taken_at, first.wall_time)
    start = ledger.add(first, Shares(cpu=0.5, mem=0.25))
    cp = ledger.add(await step(mon, clock), Shares(cpu=0.5, mem=0.25)).since(start)
    figures = {d.kind: d for d in cp.devices}
    component_job = 400.0 * 0.5 + 60.0 * 0.25  # one 10 s tick
    assert figures["other"].machine_energy_j == pytest.approx(340.0)
    assert figures["other"].energy_j == pytest.approx(340.0 * component_job / 460.0)
    job_j, _, machine_j, _ = cp.node_totals()
    assert machine_j == pytest.approx(800.0)  # the wall's figure, platform itself not counted twice
    assert job_j == pytest.approx(component_job * 800.0 / 460.0)


async def test_report_names_where_the_energy_was_measured() -> None:
    mon, _, _, clock = await rig(80.0)
    ledger = Ledger(0.0, 0.0)
    snap = await step(mon, clock)
    cp = ledger.add(snap, None)
    kinds: dict[str, float] = {}
    for d in cp.devices:
        if d.in_node_total:
            kinds[d.kind] = kinds.get(d.kind, 0.0) + d.energy_j
    wall = Report("p", "r", 0.0, 10.0, scope="machine", energy_by_kind_j=kinds, devices=list(cp.devices))
    assert wall.power_scope == "at the wall"
    assert wall.to_dict()["power_scope"] == "at the wall"
    parts = Report("p", "r", 0.0, 10.0, scope="machine", energy_by_kind_j={"cpu": 1.0})
    assert parts.power_scope == "components only"
