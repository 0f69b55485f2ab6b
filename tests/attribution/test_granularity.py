"""attribution.granularity (container, pod, namespace), copied Kubernetes labels, and systemd units -> team/project."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carbond import config
from carbond.attribution.attributor import Attributor
from carbond.attribution.kubernetes import PodDirectory, endpoint, parse_pod_list
from carbond.attribution.labels import LabelPolicy, LabelsConfig, UnitRule, sanitise
from carbond.errors import ConfigError
from carbond.model import CgroupState, Snapshot
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree
from carbond.testing.clock import ManualClock
from carbond.testing.kube_fake import FakeKubernetes, FakePod
from carbond.testing.procfs import ProcTree
from tests.harness.monitors import build_monitor

POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{c}.scope"
UIDS = [
    "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    "11111111-2222-3333-4444-555555555555",
    "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
]
POLICY = LabelPolicy.of(
    LabelsConfig(pods=["team", "project", "app.kubernetes.io/part-of"], namespaces=["team", "cost-center"]),
    [UnitRule(match="postgresql*.service", team="data", project="warehouse"), UnitRule(match="*.service", team="ops")],
)


def container(uid_index: int, c: int) -> str:
    return POD.format(u=UIDS[uid_index].replace("-", "_"), c=f"{c:064x}")


def kube() -> FakeKubernetes:
    k = FakeKubernetes()
    k.pods = [
        FakePod(UIDS[0], "trainer-0", "ml", "n", {"t": f"containerd://{1:064x}"}, labels={"project": "bert"}),
        FakePod(UIDS[1], "eval-0", "ml", "n", {"e": f"containerd://{3:064x}"}, labels={"team": "research"}),
        FakePod(UIDS[2], "web-0", "shop", "n", labels={"team": "web", "app.kubernetes.io/part-of": "checkout"}),
    ]
    k.namespaces = {"ml": {"team": "ml-platform", "cost-center": "42"}, "shop": {"team": "ignored-pod-wins"}}
    return k


def directory(policy: LabelPolicy = POLICY) -> PodDirectory:
    """Loaded without the network, from the fake's own documents."""
    k = kube()
    d = PodDirectory(endpoint("apiserver", "n", api_url="http://127.0.0.1:1", token_file=None), policy=policy)
    d.load(parse_pod_list(k._pod_list(k.pods)), k.namespaces)
    return d


Rig = tuple[Monitor, ManualClock, ProcTree, CgroupTree, FakeSensor]


def rig(tmp_path: Path, granularity: str, pods: PodDirectory | None, max_cgroups: int = 200) -> Rig:
    clock = ManualClock()
    proc = ProcTree(tmp_path / "proc", sockets=1, cpus_per_socket=2)
    tree = CgroupTree(tmp_path / "cg")
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 50.0), FakeDevice("dram-0", "dram", 10.0)], clock)
    att = Attributor(
        tmp_path / "cg",
        tmp_path / "proc",
        clock=clock,
        max_cgroups=max_cgroups,
        pods=pods,
        granularity=granularity,
        policy=POLICY,  # type: ignore[arg-type]
    )
    mon = build_monitor(sensor, clock=clock, attributor=att, host_reader=HostReader(tmp_path / "proc"))  # fmt: skip
    return mon, clock, proc, tree, sensor


def populate(tree: CgroupTree) -> None:
    tree.add(container(0, 1), cpus=0.2, memory_bytes=1 << 30)  # pod 0: two containers
    tree.add(container(0, 2), cpus=0.1, memory_bytes=1 << 30)
    tree.add(container(1, 3), cpus=0.1, memory_bytes=1 << 29)
    tree.add(container(2, 4), cpus=0.1, memory_bytes=1 << 29)
    tree.add("system.slice/postgresql@15-main.service", cpus=0.1, memory_bytes=1 << 29)
    tree.add("system.slice/ssh.service", cpus=0.05)
    tree.add("user.slice/user-1000.slice/session-3.scope", cpus=0.05)


async def run(
    tmp_path: Path, granularity: str, pods: PodDirectory | None, ticks: int = 3, max_cgroups: int = 200
) -> list[Snapshot]:
    mon, clock, proc, tree, sensor = rig(tmp_path, granularity, pods, max_cgroups)
    populate(tree)
    await sensor.start()
    await mon.tick()
    out = []
    for _ in range(ticks):
        clock.advance(10)
        proc.advance(10, 0.5)
        tree.advance(10)
        out.append(await mon.tick())
    return out


def by_cgroup(snap: Snapshot) -> dict[str, CgroupState]:
    return {cg.cgroup: cg for cg in snap.cgroups}


def conserved(snap: Snapshot) -> None:
    for kind, device in (("cpu", 0), ("dram", 1)):
        total = math.fsum(e for cg in snap.cgroups for k, _, e in cg.kinds if k == kind)
        assert total == pytest.approx(snap.devices.states[device].energy_j_total, rel=1e-9)


def test_policy_pod_label_wins_and_names_follow_kube_state_metrics() -> None:
    assert sanitise("app.kubernetes.io/part-of") == "label_app_kubernetes_io_part_of"
    assert POLICY.extra_names == ("label_app_kubernetes_io_part_of", "label_cost_center")
    team, project, extra = POLICY.for_pod({"team": "web", "project": "p", "x": "y"}, {"team": "ns", "cost-center": "7"})
    assert (team, project) == ("web", "p")
    assert extra == (("label_app_kubernetes_io_part_of", ""), ("label_cost_center", "7"))
    assert POLICY.for_pod({}, {"team": "ns"})[0] == "ns"  # the namespace's when the pod has none
    assert POLICY.for_unit("postgresql@15-main.service") == ("data", "warehouse")  # first match wins
    assert POLICY.for_unit("ssh.service") == ("ops", "")
    assert POLICY.for_unit("session-3.scope") == ("", "")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"granularity": "node"}, "attribution.granularity"),
        ({"labels": {"pods": ["bad key!"]}}, "attribution.labels.pods"),
        ({"labels": {"pods": ["a.b", "a_b"]}}, "attribution.labels"),  # both would be label_a_b
        ({"units": [{"team": "x"}]}, "attribution.units.0.match"),
        ({"labels": {"team": "owner"}}, "attribution.labels"),  # not allowlisted: it could never fill `team`
        ({"units": [{"match": "*.service", "owner": "x"}]}, "attribution.units.0.owner"),
    ],
)
def test_bad_attribution_config_names_the_key(section: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse({"attribution": section}, "c.yaml")
    assert key in [k for k, _ in err.value.problems], err.value.problems


@pytest.mark.asyncio
async def test_container_granularity_carries_team_project_and_copied_labels(tmp_path: Path) -> None:
    snap = (await run(tmp_path, "container", directory()))[-1]
    cg = by_cgroup(snap)
    trainer = cg[container(0, 1)].labels
    assert (trainer.pod_namespace, trainer.pod_name, trainer.container_name) == ("ml", "trainer-0", "t")
    assert (trainer.team, trainer.project) == ("ml-platform", "bert")  # team from the namespace, project its own
    assert dict(trainer.extra) == {"label_app_kubernetes_io_part_of": "", "label_cost_center": "42"}
    assert cg[container(1, 3)].labels.team == "research"
    web = cg[container(2, 4)].labels
    assert (web.team, dict(web.extra)["label_app_kubernetes_io_part_of"]) == ("web", "checkout")
    pg = cg["system.slice/postgresql@15-main.service"].labels
    assert (pg.team, pg.project, pg.unit) == ("data", "warehouse", "postgresql@15-main.service")
    assert cg["(idle)"].labels.extra == (("label_app_kubernetes_io_part_of", ""), ("label_cost_center", ""))
    assert len([c for c in snap.cgroups if not c.cgroup.startswith("(")]) == 7
    conserved(snap)


@pytest.mark.asyncio
async def test_pod_granularity_adds_up_a_pods_containers(tmp_path: Path) -> None:
    container_snap = (await run(tmp_path / "c", "container", directory()))[-1]
    snap = (await run(tmp_path / "p", "pod", directory()))[-1]
    cg = by_cgroup(snap)
    pod0 = container(0, 1).rpartition("/")[0]
    assert pod0 in cg
    assert container(0, 1) not in cg
    labels = cg[pod0].labels
    assert (labels.pod_uid, labels.pod_name, labels.container_id, labels.container_name) == (
        UIDS[0],
        "trainer-0",
        "",
        "",
    )
    assert labels.team == "ml-platform"
    assert "system.slice/ssh.service" in cg  # other workloads stay as they are
    assert len([c for c in snap.cgroups if not c.cgroup.startswith("(")]) == 6
    # the pod's power is its two containers' (0.3 of the 0.7 CPUs the workloads use, both runs alike)
    w = {c.cgroup: dict((k, p) for k, p, _ in c.kinds) for c in (*snap.cgroups, *container_snap.cgroups)}
    assert w[pod0]["cpu"] == pytest.approx(w[container(0, 1)]["cpu"] + w[container(0, 2)]["cpu"], rel=1e-6)
    conserved(snap)


@pytest.mark.asyncio
async def test_namespace_granularity_keeps_team_splits_and_units_by_slice(tmp_path: Path) -> None:
    snap = (await run(tmp_path, "namespace", directory()))[-1]
    series = {(c.cgroup, c.labels.team, c.labels.project) for c in snap.cgroups if not c.cgroup.startswith("(")}
    assert series == {
        ("namespace/ml", "ml-platform", "bert"),  # pod 0
        ("namespace/ml", "research", ""),  # pod 1: its own team label splits the namespace
        ("namespace/shop", "web", ""),
        ("system.slice", "data", "warehouse"),
        ("system.slice", "ops", ""),
        ("user.slice", "", ""),
    }
    ml = [c for c in snap.cgroups if c.cgroup == "namespace/ml"]
    assert all(c.labels.pod_namespace == "ml" and c.labels.pod_uid == "" for c in ml)
    conserved(snap)


@pytest.mark.asyncio
async def test_max_cgroups_counts_namespace_series_not_cgroups(tmp_path: Path) -> None:
    snap = (await run(tmp_path, "namespace", directory(), max_cgroups=2))[-1]
    named = [c for c in snap.cgroups if not c.cgroup.startswith("(")]
    assert len(named) == 2  # the two aggregates with the most energy; the other four go to (other)
    assert ("namespace/ml", "ml-platform") in {(c.cgroup, c.labels.team) for c in named}  # 0.3 CPUs: the biggest
    assert "(other)" in by_cgroup(snap)
    # this tick's power adds up (energy need not: an aggregate that left the top keeps its series no longer)
    cpu = math.fsum(w for c in snap.cgroups for k, w, _ in c.kinds if k == "cpu" and w is not None)
    assert cpu == pytest.approx(50.0, rel=1e-9)


@pytest.mark.asyncio
async def test_namespace_counters_never_go_backwards_when_members_come_and_go(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, "namespace", directory())
    populate(tree)
    await sensor.start()
    await mon.tick()
    last: dict[tuple[str, str, str], float] = {}
    for i in range(6):
        if i == 2:
            tree.remove(container(0, 2))  # one of pod 0's containers ends
        if i == 4:
            tree.add(container(0, 5), cpus=0.3)  # and another starts
        clock.advance(10)
        proc.advance(10, 0.5)
        tree.advance(10)
        snap = await mon.tick()
        for c in snap.cgroups:
            key = (c.cgroup, c.labels.team, c.labels.project)
            joules = sum(e for _, _, e in c.kinds)
            assert joules >= last.get(key, 0.0), key
            last[key] = joules
        conserved(snap)


@pytest.mark.asyncio
async def test_namespace_granularity_without_names_adds_pods_up_as_kubepods(tmp_path: Path) -> None:
    snap = (await run(tmp_path, "namespace", None))[-1]
    assert {c.cgroup for c in snap.cgroups if not c.cgroup.startswith("(")} == {
        "kubepods",
        "system.slice",
        "user.slice",
    }


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[FakeKubernetes, str, Path]]:
    """The fake on loopback, its URL and a file with its token."""
    k = kube()
    url = await k.start()
    token = tmp_path / "token"
    token.write_text(k.token)
    try:
        yield k, url, token
    finally:
        await k.stop()


@pytest.mark.asyncio
async def test_directory_fetches_namespace_labels_and_survives_their_failure(tmp_path: Path) -> None:
    async with served(tmp_path) as (k, url, token):
        d = PodDirectory(endpoint("kubelet", "n", api_url=url, kubelet_url=url, token_file=token), policy=POLICY)
        assert await d.refresh()
        assert k.requests[-2:] == ["/pods", "/api/v1/namespaces"]
        meta = d.meta(UIDS[0])
        assert meta is not None
        assert (meta.team, dict(meta.extra)["label_cost_center"]) == ("ml-platform", "42")
        k.namespaces_status = 403  # RBAC without list on namespaces
        k.pods = k.pods[:1]
        generation = d.generation
        assert not await d.refresh()  # counted as a failure ...
        assert d.errors_total == 1
        assert d.generation == generation + 1
        assert d.meta(UIDS[1]) is None
        meta = d.meta(UIDS[0])
        assert meta is not None
        assert meta.team == "ml-platform"


@pytest.mark.asyncio
async def test_without_namespace_labels_no_namespace_request_is_made(tmp_path: Path) -> None:
    async with served(tmp_path) as (k, url, token):
        d = PodDirectory(endpoint("apiserver", "n", api_url=url, token_file=token), policy=LabelPolicy())
        assert await d.refresh()
        assert len(k.requests) == 1
        assert "namespaces" not in k.requests[0]
