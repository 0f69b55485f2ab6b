"""``carbond measure``'s own-cgroup placement when it runs in a container with a cgroup namespace of its own and
``paths.cgroupfs`` is the host's hierarchy (``kubectl exec`` into the DaemonSet): ``/proc/self/cgroup`` reads
``0::/``, which is carbond's container, not the host's root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from carbond.job.cgroup import place, process_procfs
from carbond.testing.cgroupfs import CgroupTree, write_pid_cgroup

OURS = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{'1' * 8}_2222_3333_4444_{'5' * 12}.slice"
OURS += f"/cri-containerd-{'a' * 64}.scope"


def host(tmp_path: Path, *, listed: bool, shown_from: str = OURS) -> tuple[Path, Path]:
    tree = CgroupTree(tmp_path / "cgroup")
    tree.add(OURS)
    tree.add("system.slice/other.service")
    tree.set_procs("", [1])
    tree.set_procs(OURS, [os.getpid()] if listed else [])
    write_pid_cgroup(tmp_path / "proc", "self", OURS, ns_root=shown_from)
    return tmp_path / "cgroup", tmp_path / "proc"


def test_the_job_cgroup_is_made_below_our_own_container_not_the_hosts_root(tmp_path: Path) -> None:
    cgroupfs, procfs = host(tmp_path, listed=True)
    assert (procfs / "self/cgroup").read_text() == "0::/\n"
    placement = place("cgroup", cgroupfs, procfs, "abc")
    try:
        assert placement.method == "cgroup", placement.notes
        assert placement.detail == f"own cgroup v2 /{OURS}/carbond-job-abc"
        assert (cgroupfs / OURS / "carbond-job-abc").is_dir()
        assert not (cgroupfs / "carbond-job-abc").exists()
    finally:
        placement.cleanup()


def test_an_own_cgroup_that_cannot_be_found_is_a_reason_not_the_root(tmp_path: Path) -> None:
    cgroupfs, procfs = host(tmp_path, listed=False)
    placement = place("cgroup", cgroupfs, procfs, "abc")
    assert placement.method == "proctree"
    assert placement.notes == [f"cgroup: own cgroup / (in a cgroup namespace) not found under {cgroupfs}"]
    assert not (cgroupfs / "carbond-job-abc").exists()


def test_a_path_climbing_out_of_the_namespace_never_leaves_the_hierarchy(tmp_path: Path) -> None:
    cgroupfs, procfs = host(tmp_path, listed=False, shown_from=OURS + "/sub/deeper")  # moved above its root
    assert (procfs / "self/cgroup").read_text() == "0::/../..\n"
    placement = place("cgroup", cgroupfs, procfs, "abc")
    assert placement.method == "proctree"
    assert "not found" in placement.notes[0]
    assert not (tmp_path / "carbond-job-abc").exists()


def test_a_host_procfs_of_another_pid_namespace_is_not_used_for_the_jobs_processes(tmp_path: Path) -> None:
    """Without ``hostPID`` the host's /proc numbers processes differently: our child's PID there is another process
    or none, so the process tree is read from our own /proc."""
    host_proc = tmp_path / "host-proc"
    host_proc.mkdir()
    (host_proc / "self").symlink_to("424242")  # what /host/proc/self reads in a container: our PID on the host
    placement = place("proctree", tmp_path / "cgroup", host_proc, "abc")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        probe = placement.spawned(child.pid)
        assert probe is not None
        seen = probe.sample()
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.pid in seen.pids
    assert seen.rss_bytes > 0
    fixture = tmp_path / "fixture-proc"
    (fixture / "self").mkdir(parents=True)  # a fixture tree (no symlink) is used as given
    assert process_procfs(fixture) == fixture
    assert process_procfs(host_proc) == Path("/proc")
