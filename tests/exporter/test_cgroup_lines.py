"""The scrape path renders the cgroup families itself, from their declarations: its bytes must be
prometheus_client's rendering of the same declarations, in both formats."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.utils import floatToGoString

from carbond.exporter.cgroup_lines import CgroupLines, value
from carbond.exporter.collector import SnapshotCollector
from carbond.exporter.server import MetricsCache
from carbond.model import CgroupLabels, CgroupState, Snapshot
from tests.harness.snapshots import frozen_snapshot

AWKWARD = ['a"b', "back\\slash", "line\nfeed", "ünïcode ✓", "", 'all\\"of\nthem"']


def library(snap: Snapshot, openmetrics: bool) -> bytes:
    """Every family rendered by prometheus_client alone: the reference."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    return (om_format if openmetrics else text_format).generate_latest(registry)


def cgroups(rng: random.Random, n: int, valid: bool = False, extra: tuple[str, ...] = ()) -> tuple[CgroupState, ...]:
    """Awkward labels; awkward values too unless ``valid`` (counters a strict parser accepts). ``extra``: copied
    label_* names (sorted), every cgroup carrying them all, as the attributor publishes them."""

    def number() -> float:
        if valid:
            return rng.uniform(0, 10) * 10 ** rng.randint(-12, 12)
        return rng.choice(
            [0.0, -0.0, 1e-300, 123456.7, 1234567.0, 1e16, 2.5e22, math.inf, -math.inf, math.nan, -3.25]
            + [rng.uniform(0, 10) * 10 ** rng.randint(-12, 12) for _ in range(4)]
        )

    out = []
    for i in range(n):
        kinds = tuple(
            (kind, None if rng.random() < 0.2 else number(), number()) for kind in ("cpu", "dram", 'g"pu')[: i % 3 + 1]
        )
        out.append(
            CgroupState(
                cgroup=f"system.slice/{rng.choice(AWKWARD)}-{i}.service",
                kinds=kinds,
                emissions_g_total=number(),
                labels=CgroupLabels(
                    unit=rng.choice(AWKWARD),
                    pod_uid=rng.choice(AWKWARD),
                    pod_namespace=rng.choice(AWKWARD),
                    pod_name=rng.choice(AWKWARD),
                    container_id=rng.choice(AWKWARD),
                    container_name=rng.choice(AWKWARD),
                    team=rng.choice(AWKWARD),
                    project=rng.choice(AWKWARD),
                    extra=tuple((name, rng.choice(AWKWARD)) for name in extra),
                ),
            )
        )
    return tuple(out)


@pytest.mark.asyncio
@pytest.mark.parametrize("openmetrics", [False, True])
async def test_whole_body_is_prometheus_clients_byte_for_byte(openmetrics: bool) -> None:
    base = await frozen_snapshot()
    rng = random.Random(8)
    current = [dataclasses.replace(base, host='node "a"', cgroups=cgroups(rng, 60))]
    cache = MetricsCache(lambda: current[0])
    for _ in range(3):  # again with new values and some cgroups gone or new: the kept labels must not leak
        assert cache.body(openmetrics, False) == library(current[0], openmetrics)
        kept = current[0].cgroups[20:] + cgroups(rng, 10)
        current[0] = dataclasses.replace(current[0], cgroups=kept)


@pytest.mark.asyncio
@pytest.mark.parametrize("openmetrics", [False, True])
async def test_copied_kubernetes_labels_render_as_prometheus_client_does(openmetrics: bool) -> None:
    """label_* names (attribution.labels) sort between kind and pod_name, as prometheus_client sorts them."""
    base = await frozen_snapshot()
    names = ("label_app_kubernetes_io_part_of", "label_cost_center", "label_z")
    snap = dataclasses.replace(base, cgroups=cgroups(random.Random(3), 30, extra=names))
    body = MetricsCache(lambda: snap).body(openmetrics, False)
    assert body == library(snap, openmetrics)
    assert b'kind="cpu",label_app_kubernetes_io_part_of="' in body


@pytest.mark.asyncio
@pytest.mark.parametrize("openmetrics", [False, True])
async def test_copied_labels_sort_wherever_their_names_fall(openmetrics: bool) -> None:
    """Copied labels by any name (Slurm's, say) are placed where prometheus_client's sort puts them: before host,
    between kind and pod_name, between project and team, after unit."""
    base = await frozen_snapshot()
    names = ("account", "label_app", "slurm_job_id", "slurm_user", "zone")
    snap = dataclasses.replace(base, cgroups=cgroups(random.Random(4), 30, extra=names))
    body = MetricsCache(lambda: snap).body(openmetrics, False)
    assert body == library(snap, openmetrics)
    assert b'{account="' in body
    assert b'",slurm_job_id="' in body
    assert b'",zone="' in body


@pytest.mark.asyncio
async def test_without_cgroups_the_body_is_unchanged() -> None:
    snap = await frozen_snapshot()
    assert not snap.cgroups
    for om in (False, True):
        assert MetricsCache(lambda: snap).body(om, False) == library(snap, om)


@pytest.mark.asyncio
async def test_openmetrics_body_parses_strictly_and_ends_once() -> None:
    snap = dataclasses.replace(await frozen_snapshot(), cgroups=cgroups(random.Random(3), 20, valid=True))
    body = (MetricsCache(lambda: snap).body(True, False) or b"").decode()
    assert body.endswith("# EOF\n")
    assert body.count("# EOF") == 1
    fams = {f.name: f for f in om_parse(body)}
    energy = fams["carbond_cgroup_energy_joules"]
    assert energy.type == "counter"
    assert len(energy.samples) == sum(len(cg.kinds) for cg in snap.cgroups)


def test_value_spells_floats_as_prometheus_client_does() -> None:
    rng = random.Random(1)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e16, 1e22, 999999.9, 1000000.0, 123456.0, -1234567.0]
    for v in [0, 3, -7, 10**7] + specials + [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(5000)]:
        assert value(v) == floatToGoString(v), v


@pytest.mark.asyncio
async def test_labels_of_gone_cgroups_are_forgotten_and_changed_labels_are_new() -> None:
    base = await frozen_snapshot()
    a = CgroupState("kubepods.slice/pod-a.slice", (("cpu", 1.0, 2.0),), 0.5, CgroupLabels(pod_uid="a"))
    lines = CgroupLines()
    lines.samples(dataclasses.replace(base, cgroups=(a,)))
    named = a._replace(labels=a.labels._replace(pod_name="web-0", pod_namespace="shop"))  # its pod's name is known
    power, _, _ = lines.samples(dataclasses.replace(base, cgroups=(named,)))
    assert 'pod_name="web-0"' in power
    assert 'pod_namespace="shop"' in power
    assert len(lines._labels) == 1  # the unnamed labels were dropped with the cgroup state they belonged to
    lines.samples(dataclasses.replace(base, cgroups=()))
    assert lines._labels == {}


@pytest.mark.asyncio
async def test_both_formats_of_one_snapshot_share_its_lines() -> None:
    snap = dataclasses.replace(await frozen_snapshot(), cgroups=cgroups(random.Random(5), 10, valid=True))
    lines = CgroupLines()
    first = lines.samples(snap)
    assert lines.samples(snap) is first  # the OpenMetrics render after the text one formats nothing again
    later = dataclasses.replace(snap, node=dataclasses.replace(snap.node, pue=2.0))  # the next tick's: formatted afresh
    assert lines.samples(later) is not first
    assert lines.samples(later) == first
