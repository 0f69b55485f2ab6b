"""The documented cardinality budget holds: at the defaults a node measuring CPU and DRAM sends at most
(max_cgroups + 3 pseudo-cgroups) x 5 cgroup series (power and energy per kind, emissions) and about 1,050 in all,
however many cgroups it runs (README "Fleet scale", deploy/prometheus/fleet.md; bench/cardinality.py measures it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.cardinality import node_scrape
from carbond.attribution.attributor import MAX_CGROUPS

BUDGET = 1_100  # documented series per node at the defaults, CPU + DRAM


@pytest.mark.parametrize(("granularity", "most"), [("container", 1_015), ("pod", 1_015), ("namespace", 5 * (31 + 3))])
def test_default_series_per_node_stay_within_the_budget(tmp_path: Path, granularity: str, most: int) -> None:
    series, cgroup, _, _ = asyncio.run(node_scrape(tmp_path, 400, granularity, MAX_CGROUPS))
    assert cgroup <= (MAX_CGROUPS + 3) * 5 == 1_015
    assert cgroup <= most  # namespace: 10 namespaces x 3 projects + system.slice, and the pseudo-cgroups
    assert series <= BUDGET
    if granularity == "container":
        assert cgroup > 900  # 400 workloads: the cap is what bounds it
