from __future__ import annotations

import math
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution.attributor import Attributor
from carbond.attribution.split import IDLE, OTHER, UNATTRIBUTED, split, split_cpu
from carbond.exporter.server import MetricsCache
from carbond.model import ProcessShares, Snapshot
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree, write_pid_cgroup
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from tests.harness.monitors import build_monitor
from tests.harness.tools import require_tool

C = "ab" * 32


@given(
    st.floats(min_value=0, max_value=1e9),
    st.dictionaries(st.text(max_size=8), st.floats(0, 1e12), max_size=30),
    st.floats(min_value=0, max_value=1e13),
)
def test_split_conserves_the_delta(delta: float, weights: dict[str, float], capacity: float) -> None:
    parts = split(delta, weights, capacity)
    assert math.fsum(parts.values()) == pytest.approx(delta, rel=1e-9, abs=1e-9)
    assert all(v >= -1e-9 * max(delta, 1) for v in parts.values())


@given(
    st.floats(0, 1e6),
    st.floats(0, 1),
    st.dictionaries(st.text(max_size=4), st.floats(0, 1e9), max_size=10),
    st.floats(0, 1e10),
)
def test_split_cpu_conserves(delta: float, busy: float, usage: dict[str, float], capacity: float) -> None:
    parts = split_cpu(delta, busy, usage, capacity)
    assert math.fsum(parts.values()) == pytest.approx(delta, rel=1e-9, abs=1e-9)
    assert parts[IDLE] == pytest.approx(delta * (1 - busy), abs=1e-6)


def rig(
    tmp_path: Path,
    version: str = "v2",
    watts: float = 50.0,
    max_cgroups: int = 200,
    retention_s: float = 300.0,
    gpu_shares: ProcessShares | None = None,
) -> tuple[Monitor, ManualClock, ProcTree, CgroupTree, FakeSensor]:
    """A monitor on a fixture /proc and cgroup tree: a CPU package and DRAM, or with ``gpu_shares`` one 200 W GPU
    (``gpu-0``) whose processes have those shares."""
    clock = ManualClock()
    proc = ProcTree(tmp_path / "proc", sockets=1, cpus_per_socket=2)
    tree = CgroupTree(tmp_path / "cg", version)
    if gpu_shares is None:
        sensor = FakeSensor([FakeDevice("package-0", "cpu", watts), FakeDevice("dram-0", "dram", 10.0)], clock)
    else:
        sensor = FakeSensor([FakeDevice("gpu-0", "gpu", 200.0)], clock, gpu_shares)
    att = Attributor(tmp_path / "cg", tmp_path / "proc", max_cgroups=max_cgroups, retention_s=retention_s, clock=clock)
    mon = build_monitor(sensor, pue=1.5, clock=clock, attributor=att, host_reader=HostReader(tmp_path / "proc"))
    return mon, clock, proc, tree, sensor


async def step(mon: Monitor, clock: ManualClock, proc: ProcTree, tree: CgroupTree, busy: float) -> Snapshot:
    clock.advance(10)
    proc.advance(10, busy)
    tree.advance(10)
    return await mon.tick()


def power(snap: Snapshot, kind: str = "cpu") -> dict[str, float]:
    return {cg.cgroup: w for cg in snap.cgroups for k, w, _ in cg.kinds if k == kind and w is not None}


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v2", "v1", "hybrid"])
async def test_cgroups_get_their_share_of_active_power(tmp_path: Path, version: str) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, version)
    tree.add("system.slice/ssh.service", cpus=0.6, memory_bytes=4 << 30)
    tree.add(f"system.slice/docker-{C}.scope", cpus=0.3, memory_bytes=2 << 30)
    tree.add("user.slice/user-1000.slice/session-3.scope", cpus=0.3)
    await sensor.start()
    await mon.tick()
    for _ in range(3):
        snap = await step(mon, clock, proc, tree, busy=0.6)  # 1.2 of 2 CPUs busy
    cpu = power(snap)
    assert cpu["system.slice/ssh.service"] == pytest.approx(50 * 0.6 * 0.5, rel=0.01)
    assert cpu[f"system.slice/docker-{C}.scope"] == pytest.approx(50 * 0.6 * 0.25, rel=0.01)
    assert cpu[IDLE] == pytest.approx(20.0, rel=0.01)
    assert math.fsum(cpu.values()) == pytest.approx(50.0, rel=1e-9)
    energy = {cg.cgroup: e for cg in snap.cgroups for k, _, e in cg.kinds if k == "cpu"}
    assert math.fsum(energy.values()) == pytest.approx(snap.devices.states[0].energy_j_total, rel=1e-9)
    dram = power(snap, "dram")
    assert math.fsum(dram.values()) == pytest.approx(10.0, rel=1e-9)
    ssh = next(cg for cg in snap.cgroups if cg.cgroup == "system.slice/ssh.service")
    assert ssh.labels.unit == "ssh.service"
    ssh_j = sum(e for _, _, e in ssh.kinds)
    assert ssh.emissions_g_total == pytest.approx(ssh_j / 3.6e6 * 1.5 * 50.0, rel=1e-9)


@pytest.mark.asyncio
async def test_max_cgroups_fold_into_other_and_conserve(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, max_cgroups=2)
    for i, cpus in enumerate([0.5, 0.3, 0.2, 0.1]):
        tree.add(f"system.slice/s{i}.service", cpus=cpus)
    await sensor.start()
    await mon.tick()
    for _ in range(3):
        snap = await step(mon, clock, proc, tree, busy=0.55)
    cpu = power(snap)
    assert set(cpu) == {"system.slice/s0.service", "system.slice/s1.service", OTHER, IDLE, UNATTRIBUTED}
    assert math.fsum(cpu.values()) == pytest.approx(50.0, rel=1e-9)


def _pipeline_memory(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still held that the measurement pipeline allocated: tracemalloc sees every thread of the process, and
    what others allocate meanwhile (a tracker or server an earlier test left running, pytest's captured output)
    is not this test's."""
    kept = snapshot.filter_traces(
        [
            tracemalloc.Filter(True, "*/carbond/*"),
            tracemalloc.Filter(False, "*/carbond/job/*"),
            tracemalloc.Filter(False, "*/carbond/codecarbon/*"),
            tracemalloc.Filter(False, "*/carbond/logs.py"),
        ]
    )
    return sum(stat.size for stat in kept.statistics("filename"))


@pytest.mark.asyncio
async def test_churn_keeps_series_and_memory_bounded(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, max_cgroups=50, retention_s=20)
    await sensor.start()
    await mon.tick()
    tracemalloc.start()
    sizes = []
    for t in range(100):  # 10,000 cgroups come and go, 100 per tick
        for i in range(100):
            tree.add(f"system.slice/churn-{t}-{i}.service", cpus=0.01, write=False)
        snap = await step(mon, clock, proc, tree, busy=0.6)
        for i in range(100):
            tree.remove(f"system.slice/churn-{t}-{i}.service", write=False)
        if t in (30, 99):
            sizes.append(_pipeline_memory(tracemalloc.take_snapshot()))
        assert len(snap.cgroups) <= 50 + 3
    tracemalloc.stop()
    assert sizes[-1] < sizes[0] * 1.5, sizes  # flat after warm-up, not growing with every cgroup ever seen
    assert len(mon._attributor._cgroups) <= 300  # type: ignore[union-attr]  # retention forgets the vanished


@pytest.mark.asyncio
async def test_gpu_energy_follows_processes(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, gpu_shares={"gpu-0": {4242: 0.75, 777: 0.25}})
    tree.add(f"kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{C}", cpus=0.1)
    tree.add("system.slice/train.service", cpus=0.1)
    write_pid_cgroup(tmp_path / "proc", 4242, f"kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{C}")
    write_pid_cgroup(tmp_path / "proc", 777, "system.slice/train.service")
    await sensor.start()
    await mon.tick()
    snap = await step(mon, clock, proc, tree, busy=0.1)
    gpu = power(snap, "gpu")
    assert gpu[f"kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{C}"] == pytest.approx(150.0)
    assert gpu["system.slice/train.service"] == pytest.approx(50.0)
    pod = next(cg for cg in snap.cgroups if cg.labels.container_id == C)
    assert pod.labels.pod_uid == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.mark.asyncio
async def test_hostile_cgroup_names_keep_the_exposition_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    mon, clock, proc, tree, sensor = rig(tmp_path)
    for name in ['q"uote.service', "back\\slash.service", "new\nline.service", "ünï€ode.service"]:
        tree.add(f"system.slice/{name}", cpus=0.2)
    await sensor.start()
    await mon.tick()
    snap = await step(mon, clock, proc, tree, busy=0.5)
    assert len([cg for cg in snap.cgroups if cg.labels.unit]) == 4
    body = MetricsCache(lambda: snap).body(False, False)
    out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.asyncio
async def test_a_thousand_cgroups_expose_valid_series(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    mon, clock, proc, tree, sensor = rig(tmp_path, max_cgroups=1000)
    uid = "0f1e2d3c-4b5a-6978-8796-{:012x}"
    for i in range(1000):
        if i % 2:
            u = uid.format(i)
            tree.add(f"kubepods/burstable/pod{u}/{i:064x}", cpus=0.001, write=False)
        else:
            tree.add(f"system.slice/svc-{i}.service", cpus=0.001, memory_bytes=1 << 20, write=False)
    tree.advance(0)  # write the deferred counter files
    await sensor.start()
    await mon.tick()
    snap = await step(mon, clock, proc, tree, busy=0.6)
    assert len({cg.cgroup for cg in snap.cgroups}) == 1000 + 2  # every cgroup, plus (idle) and (unattributed)
    cpu = power(snap)
    assert math.fsum(cpu.values()) == pytest.approx(50.0, rel=1e-9)
    assert cpu["system.slice/svc-0.service"] == pytest.approx(
        cpu["kubepods/burstable/pod" + uid.format(1) + f"/{1:064x}"]
    )
    body = MetricsCache(lambda: snap).body(False, False)
    # services: cpu and dram; pods (no memory): cpu; (idle): cpu; (unattributed): cpu and dram
    assert body.count(b"carbond_cgroup_energy_joules_total{") == 500 * 2 + 500 + 1 + 2
    out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.asyncio
async def test_unreadable_proc_stat_keeps_conservation(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path)
    tree.add("system.slice/ssh.service", cpus=0.5, memory_bytes=1 << 30)
    await sensor.start()
    await mon.tick()
    await step(mon, clock, proc, tree, busy=0.5)
    (tmp_path / "proc" / "stat").write_text("cpu  x y z\n")  # garbage from a hostile or broken procfs
    for _ in range(2):
        clock.advance(10)
        tree.advance(10)
        snap = await mon.tick()
    proc.advance(10, 0.5)  # readable again
    tree.advance(10)
    clock.advance(10)
    snap = await mon.tick()
    for kind, device in (("cpu", "package-0"), ("dram", "dram-0")):
        energy = {cg.cgroup: e for cg in snap.cgroups for k, _, e in cg.kinds if k == kind}
        total = next(d.energy_j_total for d in snap.devices.states if d.device == device)
        assert math.fsum(energy.values()) == pytest.approx(total, rel=1e-9)
    unattributed = {k: e for cg in snap.cgroups if cg.cgroup == UNATTRIBUTED for k, _, e in cg.kinds}
    assert unattributed["cpu"] >= 2 * 10 * 50.0 * 0.999  # the two unread ticks, whole
    assert power(snap)["system.slice/ssh.service"] > 0  # and attribution resumed
