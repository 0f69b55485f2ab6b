"""A node's energy over Slurm jobs and steps on fake v1 and v2 trees: the parts sum exactly to the node's, the
series carry the spool's labels (whether the metadata comes before or after the cgroup), GPU energy follows the
processes into their steps, steps add up per job at ``pod`` granularity, and the series stay within the budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.parser import text_string_to_metric_families

from carbond.attribution.attributor import MAX_CGROUPS, Attributor
from carbond.attribution.labels import Granularity, LabelPolicy, SlurmLabel
from carbond.attribution.split import IDLE, UNATTRIBUTED
from carbond.exporter.collector import SnapshotCollector
from carbond.exporter.server import MetricsCache
from carbond.intensity import FixedIntensity
from carbond.model import CgroupState, Intensity, ProcessShares, Snapshot
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.slurm.spool import SlurmSpool
from carbond.testing.cgroupfs import CgroupTree, add_slurm_step, remove_slurm_job, slurm_job_cgroup
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from tests.slurm.spoolfiles import spool_dir, write_meta

FR = Intensity(g_per_kwh=50.0, provider="static", zone="FR", observed_at=0.0)
SLURM = ("slurm_account", "slurm_job_id", "slurm_partition", "slurm_step", "slurm_user")


class Rig:
    """A monitor over a fixture /proc (4 CPUs) and cgroup tree, a 60 W package and 10 W of DRAM (or one 200 W GPU),
    and a spool."""

    def __init__(
        self,
        root: Path,
        version: str = "v2",
        *,
        slurm: tuple[SlurmLabel, ...] | None = ("account", "partition"),
        granularity: Granularity = "container",
        max_cgroups: int = MAX_CGROUPS,
        gpu_shares: ProcessShares | None = None,
    ) -> None:
        self.clock = ManualClock()
        self.proc = ProcTree(root / "proc", sockets=1, cpus_per_socket=4)
        self.tree = CgroupTree(root / "cg", version)
        self.spool_dir = spool_dir(root)
        self.spool = SlurmSpool(self.spool_dir)
        devices = [FakeDevice("package-0", "cpu", 60.0), FakeDevice("dram-0", "dram", 10.0)]
        if gpu_shares is not None:
            devices = [FakeDevice("gpu-0", "gpu", 200.0)]
        self.sensor = FakeSensor(devices, self.clock, gpu_shares or {})
        self.attributor = Attributor(
            root / "cg", root / "proc", clock=self.clock, granularity=granularity, max_cgroups=max_cgroups,
            policy=LabelPolicy(slurm=slurm), slurm=self.spool if slurm is not None else None,
        )  # fmt: skip
        self.mon = Monitor(
            [self.sensor], host="n1", interval_s=10, pue=1.5, intensity=FixedIntensity(FR), sensor_timeout_s=1,
            clock=self.clock, attributor=self.attributor, host_reader=HostReader(root / "proc"),
        )  # fmt: skip

    async def start(self) -> None:
        await self.sensor.start()
        await self.mon.tick()

    async def tick(self, busy: float = 0.5) -> Snapshot:
        self.clock.advance(10)
        self.proc.advance(10, busy)
        self.tree.advance(10)
        return await self.mon.tick()


def by_cgroup(snap: Snapshot) -> dict[str, CgroupState]:
    return {cg.cgroup: cg for cg in snap.cgroups}


def joules(cg: CgroupState, kind: str) -> float:
    return next((e for k, _, e in cg.kinds if k == kind), 0.0)


def node_joules(snap: Snapshot, kind: str) -> float:
    return math.fsum(d.energy_j_total for d in snap.devices.states if d.kind == kind)


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2", "hybrid"])
async def test_a_nodes_energy_splits_over_jobs_and_steps_exactly(tmp_path: Path, version: str) -> None:
    rig = Rig(tmp_path, version)
    write_meta(rig.spool_dir, 42, user="ada", account="physics", partition="gpu")  # the Prolog ran first
    write_meta(rig.spool_dir, 43, user="grace", uid="1001", account="chem", partition="cpu")
    rig.tree.add("system.slice/ssh.service", cpus=0.25)
    s0 = add_slurm_step(rig.tree, 42, 0, cpus=1.0, tasks=2, memory_bytes=4 << 30)
    sb = add_slurm_step(rig.tree, 42, "batch", cpus=0.5, memory_bytes=1 << 30)
    s43 = add_slurm_step(rig.tree, 43, 0, cpus=0.25, uid=1001, memory_bytes=1 << 30)
    await rig.start()
    for _ in range(3):
        snap = await rig.tick(busy=0.5)  # 2 of 4 CPUs busy: 30 W idle, 30 W shared by CPU time
    cgs = by_cgroup(snap)
    assert {s0, sb, s43} <= cgs.keys()
    for kind in ("cpu", "dram"):
        assert math.fsum(joules(cg, kind) for cg in snap.cgroups) == pytest.approx(node_joules(snap, kind), rel=1e-12)
    span = 30.0  # three ticks of 10 s measured
    assert joules(cgs[s0], "cpu") == pytest.approx(15.0 * span, rel=1e-6)  # 1.0 of the 2.0 busy CPUs
    assert joules(cgs[sb], "cpu") == pytest.approx(7.5 * span, rel=1e-6)
    assert joules(cgs[s43], "cpu") == pytest.approx(3.75 * span, rel=1e-6)
    assert joules(cgs[IDLE], "cpu") == pytest.approx(30.0 * span, rel=1e-6)
    job42 = math.fsum(joules(cgs[p], "cpu") for p in (s0, sb))
    assert job42 == pytest.approx(22.5 * span, rel=1e-6)
    assert dict(cgs[s0].labels.extra) == {
        "slurm_account": "physics",
        "slurm_job_id": "42",
        "slurm_partition": "gpu",
        "slurm_step": "0",
        "slurm_user": "ada",
    }
    assert dict(cgs[sb].labels.extra)["slurm_step"] == "batch"
    assert dict(cgs[s43].labels.extra)["slurm_user"] == "grace"
    for cg in snap.cgroups:  # one name set on every series, the pseudo-cgroups' and the unit's too
        assert tuple(n for n, _ in cg.labels.extra) == SLURM
    assert dict(cgs["system.slice/ssh.service"].labels.extra) == dict.fromkeys(SLURM, "")
    em = math.fsum(cg.emissions_g_total for cg in snap.cgroups)
    assert em == pytest.approx(math.fsum(node_joules(snap, k) for k in ("cpu", "dram")) / 3.6e6 * 1.5 * 50, rel=1e-9)


@pytest.mark.asyncio
async def test_metadata_after_the_cgroup_relabels_and_counters_continue(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "v2")
    step = add_slurm_step(rig.tree, 7, 0, cpus=1.0)
    await rig.start()
    snap = await rig.tick()
    before = by_cgroup(snap)[step]
    assert dict(before.labels.extra) == {**dict.fromkeys(SLURM, ""), "slurm_job_id": "7", "slurm_step": "0"}
    write_meta(rig.spool_dir, 7, user="ada", account="physics", partition="gpu")
    snap = await rig.tick()
    after = by_cgroup(snap)[step]
    assert dict(after.labels.extra)["slurm_user"] == "ada"
    assert dict(after.labels.extra)["slurm_account"] == "physics"
    assert joules(after, "cpu") > joules(before, "cpu") > 0  # the same counters, relabelled: never backwards
    for cg in snap.cgroups:
        assert tuple(n for n, _ in cg.labels.extra) == SLURM


@pytest.mark.asyncio
async def test_v1_labels_the_user_from_the_path_before_any_metadata(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "v1", slurm=())
    step = add_slurm_step(rig.tree, 8, "extern", cpus=0.5, uid=0)
    await rig.start()
    snap = await rig.tick()
    assert dict(by_cgroup(snap)[step].labels.extra) == {
        "slurm_job_id": "8",
        "slurm_step": "extern",
        "slurm_user": "root",
    }


@pytest.mark.asyncio
async def test_without_slurm_labels_the_series_keep_their_names(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "v2", slurm=None)
    write_meta(rig.spool_dir, 9)
    step = add_slurm_step(rig.tree, 9, 0, cpus=1.0)
    rig.tree.add("system.slice/slurmstepd.scope/system", cpus=0.01)
    await rig.start()
    snap = await rig.tick()
    cgs = by_cgroup(snap)
    assert step in cgs
    assert cgs[step].labels.extra == ()
    assert cgs["system.slice/slurmstepd.scope/system"].labels.unit == "slurmstepd.scope"
    assert all(cg.labels.extra == () for cg in snap.cgroups)
    body = MetricsCache(lambda: snap).body(False, False)
    assert body is not None
    assert b"slurm_" not in body.replace(b"slurmstepd", b"")


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_gpu_energy_follows_processes_into_their_steps(tmp_path: Path, version: str) -> None:
    rig = Rig(tmp_path, version, gpu_shares={"gpu-0": {4242: 0.6, 4243: 0.2, 999: 0.2}})
    write_meta(rig.spool_dir, 50)
    a = add_slurm_step(rig.tree, 50, 0, cpus=0.5, tasks=2, pids=[4242, 4243], procfs=tmp_path / "proc")
    b = add_slurm_step(rig.tree, 51, "batch", cpus=0.5, pids=[4300], procfs=tmp_path / "proc")
    await rig.start()
    snap = await rig.tick()
    cgs = by_cgroup(snap)
    gpu = {p: next(w for k, w, _ in cg.kinds if k == "gpu") for p, cg in cgs.items() if joules(cg, "gpu")}
    assert gpu[a] == pytest.approx(160.0)  # both tasks' processes fold into the step
    assert gpu[UNATTRIBUTED] == pytest.approx(40.0)  # pid 999 is in no cgroup carbond knows
    assert b not in gpu
    assert math.fsum(joules(cg, "gpu") for cg in snap.cgroups) == pytest.approx(node_joules(snap, "gpu"), rel=1e-12)


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_pod_granularity_adds_a_jobs_steps_up(tmp_path: Path, version: str) -> None:
    rig = Rig(tmp_path, version, granularity="pod")
    write_meta(rig.spool_dir, 60, account="physics")
    add_slurm_step(rig.tree, 60, 0, cpus=1.0)
    add_slurm_step(rig.tree, 60, 1, cpus=0.5, tasks=3)
    add_slurm_step(rig.tree, 60, "batch", cpus=0.25)
    add_slurm_step(rig.tree, 61, 0, cpus=0.25)
    await rig.start()
    for _ in range(2):
        snap = await rig.tick()
    cgs = by_cgroup(snap)
    v = "v2" if version == "v2" else "v1"
    job60, job61 = slurm_job_cgroup(v, 60), slurm_job_cgroup(v, 61)
    assert {job60, job61} <= cgs.keys()
    assert not [p for p in cgs if "/step_" in p]
    assert joules(cgs[job60], "cpu") == pytest.approx(7 * joules(cgs[job61], "cpu"), rel=1e-6)  # 1.75 vs 0.25 CPUs
    labels = dict(cgs[job60].labels.extra)
    assert (labels["slurm_job_id"], labels["slurm_step"], labels["slurm_account"]) == ("60", "", "physics")
    assert math.fsum(joules(cg, "cpu") for cg in snap.cgroups) == pytest.approx(node_joules(snap, "cpu"), rel=1e-12)


@pytest.mark.asyncio
async def test_an_ended_job_keeps_its_labels_while_retained(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "v2")
    write_meta(rig.spool_dir, 70, user="ada")
    step = add_slurm_step(rig.tree, 70, 0, cpus=1.0)
    await rig.start()
    await rig.tick()
    remove_slurm_job(rig.tree, 70)
    rig.spool.forget("70")  # the ledger has the job
    write_meta(rig.spool_dir, 71)  # another job's metadata: a relabelling pass
    snap = await rig.tick()
    cg = by_cgroup(snap)[step]  # kept for retention_s so its last value is scraped
    assert dict(cg.labels.extra)["slurm_user"] == "ada"


@pytest.mark.asyncio
async def test_series_stay_within_the_budget_with_slurm_labels(tmp_path: Path) -> None:
    """80 steps of 20 jobs and the optional labels beside max_cgroups 40: the cap still bounds the series (labels
    add none); every cgroup series has the five slurm_* labels, and the scrape says what prometheus_client would."""
    cap = 40
    rig = Rig(tmp_path, "v2", max_cgroups=cap)
    for job in range(1000, 1020):
        write_meta(rig.spool_dir, job, user=f"u{job % 7}", account=f"acct{job % 5}", partition="gpu")
        for step in (0, 1, "batch", "extern"):
            add_slurm_step(rig.tree, job, step, cpus=0.004 if step != "extern" else 0.0005, write=False)
    rig.tree.advance(0)
    await rig.start()
    for _ in range(3):
        snap = await rig.tick()
    body = MetricsCache(lambda: snap).body(False, False)
    assert body is not None
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    cgroup_samples = [s for n, f in families.items() if n.startswith("carbond_cgroup_") for s in f.samples]
    assert len(cgroup_samples) <= (cap + 3) * 5  # power and energy per kind, emissions
    assert len({s.labels["cgroup"] for s in cgroup_samples}) <= cap + 3
    assert all(set(SLURM) <= s.labels.keys() for s in cgroup_samples)
    steps = [s for s in cgroup_samples if s.labels["slurm_job_id"]]
    assert len({s.labels["cgroup"] for s in steps}) == cap  # the rest folded into (other)
    assert all(s.labels["slurm_account"] == f"acct{int(s.labels['slurm_job_id']) % 5}" for s in steps)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    reference = text_format.generate_latest(registry).decode()
    assert [line for line in body.decode().splitlines() if line.startswith("carbond_cgroup_")] == [
        line for line in reference.splitlines() if line.startswith("carbond_cgroup_")
    ]  # byte for byte: slurm_* sort between project and team
