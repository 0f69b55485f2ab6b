"""GPU processes mapped to cgroups when carbond runs in a container with a cgroup namespace of its own (the
DaemonSet on cgroup v2 hosts): ``/host/proc/<pid>/cgroup`` is shown relative to carbond's own cgroup
(``0::/../../kubepods-pod<uid>.slice/cri-containerd-<id>.scope``) while the walk reads the host's hierarchy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution.attributor import Attributor
from carbond.attribution.pidcgroups import PidCgroups, shown_line
from carbond.attribution.split import UNATTRIBUTED
from carbond.monitor import Monitor
from carbond.testing.cgroupfs import CgroupTree, shown_path, write_pid_cgroup
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from tests.attribution.test_attribution import power, rig, step

OURS_UID, GPU_UID, BE_UID = (f"{n}f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" for n in "012")
OURS_ID, GPU_ID, BE_ID, DOCKER_ID = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def systemd(qos: str, uid: str, cid: str) -> str:
    """A container's cgroup under the kubelet's systemd driver."""
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{cid}.scope"
    return f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/cri-containerd-{cid}.scope"


def cgroupfs(qos: str, uid: str, cid: str) -> str:
    """The same under the cgroupfs driver (v1 hosts, mostly)."""
    return f"kubepods/pod{uid}/{cid}" if qos == "guaranteed" else f"kubepods/{qos}/pod{uid}/{cid}"


OURS = systemd("burstable", OURS_UID, OURS_ID)  # carbond's own container
GPU_POD = systemd("guaranteed", GPU_UID, GPU_ID)
BE_POD = systemd("besteffort", BE_UID, BE_ID)
DOCKER = f"system.slice/docker-{DOCKER_ID}.scope"
SHARES = {"gpu-0": {4242: 0.5, 4343: 0.25, 4444: 0.125}}


def att_of(mon: Monitor) -> Attributor:
    att = mon._attributor
    assert att is not None
    return att


async def gpu_power(mon: Monitor, clock: ManualClock, proc: ProcTree, tree: CgroupTree) -> dict[str, float]:
    await mon.tick()
    gpu = power(await step(mon, clock, proc, tree, busy=0.5), "gpu")
    assert math.fsum(gpu.values()) == pytest.approx(200.0, rel=1e-9)
    return gpu


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v2", "v1", "hybrid"])
@pytest.mark.parametrize("own_pid_listed", [True, False], ids=["own-pid-found", "suffix-match"])
async def test_gpu_energy_reaches_pods_from_inside_a_cgroup_namespace(
    tmp_path: Path, version: str, own_pid_listed: bool
) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, version, gpu_shares=SHARES)
    seen_by = {"self": OURS, 4242: GPU_POD, 4343: BE_POD, 4444: DOCKER}  # pid -> its cgroup (self: carbond)
    for pid, path in seen_by.items():
        tree.add(path, cpus=0.1)
        write_pid_cgroup(tmp_path / "proc", pid, path, ns_root=OURS, version=version)
    if own_pid_listed:
        tree.set_procs(OURS, [1, os.getpid()])
    assert "/../" in (tmp_path / "proc/4242/cgroup").read_text()  # what the reviewer saw
    await sensor.start()
    gpu = await gpu_power(mon, clock, proc, tree)
    assert gpu[GPU_POD] == pytest.approx(100.0)
    assert gpu[BE_POD] == pytest.approx(50.0)
    assert gpu[DOCKER] == pytest.approx(25.0)
    assert gpu[UNATTRIBUTED] == pytest.approx(25.0)
    assert att_of(mon).pid_cgroups._certain is own_pid_listed  # found by its pid, else by suffix


@pytest.mark.asyncio
async def test_cgroupfs_driver_paths_from_inside_a_namespace(tmp_path: Path) -> None:
    mon, clock, proc, tree, sensor = rig(tmp_path, "v1", gpu_shares=SHARES)
    ours, gpu = cgroupfs("burstable", OURS_UID, OURS_ID), cgroupfs("guaranteed", GPU_UID, GPU_ID)
    for path in (ours, gpu):
        tree.add(path, cpus=0.1)
    write_pid_cgroup(tmp_path / "proc", "self", ours, ns_root=ours, version="v1")
    write_pid_cgroup(tmp_path / "proc", 4242, gpu, ns_root=ours, version="v1")
    tree.set_procs(ours, [os.getpid()])
    await sensor.start()
    assert (await gpu_power(mon, clock, proc, tree))[gpu] == pytest.approx(100.0)


def resolver(tmp_path: Path, version: str = "v2", own_pid: int = 31337) -> tuple[PidCgroups, CgroupTree, Path]:
    tree = CgroupTree(tmp_path / "cg", version)
    hierarchy = tmp_path / "cg" if version == "v2" else tmp_path / "cg" / "cpu,cpuacct"
    return PidCgroups(tmp_path / "proc", hierarchy, 2 if version == "v2" else 1, own_pid), tree, tmp_path / "proc"


_NAME = st.sampled_from(["a", "b", "kubepods.slice", "x.scope", "system.slice"])


@given(st.lists(_NAME, max_size=5), st.lists(_NAME, max_size=5))
def test_a_located_namespace_root_resolves_every_shown_path(ns_root: list[str], target: list[str]) -> None:
    pc = PidCgroups(Path("/nonexistent"), None, 2)
    pc._located, pc.root, pc._certain = True, ns_root, True
    assert pc.resolve(shown_path("/".join(target), "/".join(ns_root))) == "/".join(target)


def test_own_pid_locates_the_namespace_root(tmp_path: Path) -> None:
    pc, tree, proc = resolver(tmp_path)
    for path in (OURS, GPU_POD):
        tree.add(path)
    tree.set_procs(OURS, [31337])
    write_pid_cgroup(proc, "self", OURS, ns_root=OURS)
    write_pid_cgroup(proc, 4242, GPU_POD, ns_root=OURS)
    assert pc.of_pid(4242) == GPU_POD  # no workload list needed: the root is known
    assert pc.root == OURS.split("/")
    assert pc.resolve("/") == OURS  # ``0::/``: a process of carbond's own container
    assert pc.resolve("/../../../../../elsewhere") is None  # above the walked root
    assert pc.of_pid(999) is None  # gone


def test_suffix_match_needs_exactly_one_workload(tmp_path: Path) -> None:
    pc, _, proc = resolver(tmp_path)  # carbond's pid is nowhere in cgroup.procs
    write_pid_cgroup(proc, "self", OURS, ns_root=OURS)
    known = [GPU_POD, BE_POD, "system.slice/app.service", "user.slice/app.service"]
    assert pc.resolve(shown_path(GPU_POD, OURS), known) == GPU_POD
    assert pc.resolve(shown_path(GPU_POD + "/nested/deeper", OURS), known) == GPU_POD + "/nested/deeper"
    assert pc.resolve("/../../../app.service", known) is None  # two workloads end so: neither is guessed
    assert pc.resolve("/../../../system.slice/app.service", known) == "system.slice/app.service"
    assert pc.resolve("/../../kubepods-burstable-podnowhere.slice/x.scope", known) is None


def test_no_namespace_takes_paths_as_they_read(tmp_path: Path) -> None:
    pc, _, proc = resolver(tmp_path)
    write_pid_cgroup(proc, "self", "system.slice/carbond.service")  # a systemd service on the host
    write_pid_cgroup(proc, 4242, GPU_POD)
    assert pc.of_pid(4242) == GPU_POD
    pc2, _, proc2 = resolver(tmp_path / "fixture")  # a fixture procfs without self
    write_pid_cgroup(proc2, 4242, GPU_POD)
    assert pc2.of_pid(4242) == GPU_POD


def test_hybrid_hosts_read_the_cpuacct_line(tmp_path: Path) -> None:
    """On a hybrid host the ``0::`` line names the unified hierarchy, where a cgroupfs-driver container need not be;
    the walk is of the v1 ``cpuacct`` one."""
    pc, tree, proc = resolver(tmp_path, "hybrid")
    pod = cgroupfs("burstable", GPU_UID, GPU_ID)
    tree.add(pod)
    write_pid_cgroup(proc, 4242, pod, version="hybrid", unified="system.slice/containerd.service")
    assert shown_line((proc / "4242/cgroup").read_text(), 2) == "/system.slice/containerd.service"
    assert pc.of_pid(4242, [pod]) == pod
