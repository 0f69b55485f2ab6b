"""Kept descriptors for cgroup counter files: bounded, closed with their cgroup, never stale, never raising.

The fixture trees write regular files; kernfs behaves differently in two ways, both modelled here (and checked on
the real cgroupfs by the last test, where the host lets us create cgroups): a file's content is regenerated in
place (``KernfsLikeTree`` rewrites the same inode), and reading a descriptor of a removed cgroup's file fails with
ENODEV, also once a new cgroup exists at the same path (``kernfs_pread``: a read of an unlinked file fails).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carbond import keptfiles as files
from carbond.attribution.attributor import Attributor
from carbond.attribution.cgroupfs import CgroupReader
from carbond.attribution.split import IDLE, OTHER, UNATTRIBUTED
from carbond.keptfiles import KeptFiles, fd_cap
from carbond.model import Snapshot
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree, KernfsLikeTree
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from tests.harness.monitors import build_monitor
from tests.harness.skips import host_lacks


def keep_all(st: os.stat_result) -> bool:
    return True  # regular files kept as kernfs files are: only right with KernfsLikeTree and kernfs_pread


@pytest.fixture
def kernfs_pread(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.fstat(fd).st_nlink == 0:  # the file of a removed cgroup
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def svc(i: int) -> str:
    return f"system.slice/s{i}.service"


def test_regular_files_are_not_kept_so_a_replaced_file_is_never_stale(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path)  # writes by rename: a new inode each time, as a kept descriptor would never see
    tree.add(svc(0), cpus=1.0, memory_bytes=1 << 20)
    reader = CgroupReader(tmp_path)
    before = open_fds()
    cpu, mem = reader.read_all()
    tree.advance(2)
    cpu2, _ = reader.read_all()
    assert (cpu[svc(0)], cpu2[svc(0)], mem[svc(0)]) == (0.0, 2e6, float(1 << 20))
    assert reader.files.kept == 0
    assert open_fds() == before


@pytest.mark.usefixtures("kernfs_pread")
def test_kept_descriptors_read_the_current_values(tmp_path: Path) -> None:
    tree = KernfsLikeTree(tmp_path)
    for i in range(3):
        tree.add(svc(i), cpus=0.5 * (i + 1), memory_bytes=(i + 1) << 20)
    reader = CgroupReader(tmp_path, keep=keep_all)
    before = open_fds()
    reader.read_all()
    assert reader.files.kept == 6
    assert open_fds() == before + 6
    tree.advance(10)
    cpu, mem = reader.read_all()
    assert cpu == {svc(i): 5e6 * (i + 1) for i in range(3)}
    assert mem == {svc(i): float((i + 1) << 20) for i in range(3)}
    assert open_fds() == before + 6  # read again through the same descriptors
    reader.close()
    assert reader.files.kept == 0
    assert open_fds() == before


@pytest.mark.usefixtures("kernfs_pread")
def test_the_cap_bounds_kept_descriptors_and_the_rest_are_still_read(tmp_path: Path) -> None:
    tree = KernfsLikeTree(tmp_path)
    for i in range(10):
        tree.add(svc(i), cpus=0.1 * (i + 1), memory_bytes=1 << 20)
    reader = CgroupReader(tmp_path, max_fds=5, keep=keep_all)
    before = open_fds()
    for step in range(1, 4):
        tree.advance(10)
        cpu, mem = reader.read_all()
        assert cpu == pytest.approx({svc(i): step * 1e6 * (i + 1) for i in range(10)})
        assert set(mem) == set(cpu)
        assert reader.files.kept == 5
        assert open_fds() == before + 5
    for i in range(6):
        tree.remove(svc(i))
    cpu, _ = reader.read_all()
    assert set(cpu) == {svc(i) for i in range(6, 10)}
    assert reader.files.kept == 5
    assert open_fds() == before + 5
    reader.close()
    assert open_fds() == before


@pytest.mark.usefixtures("kernfs_pread")
def test_a_cgroup_removed_and_recreated_at_the_same_path_is_read_fresh(tmp_path: Path) -> None:
    tree = KernfsLikeTree(tmp_path)
    tree.add(svc(0), cpus=2.0, memory_bytes=8 << 30)
    tree.add(svc(1), cpus=1.0)
    reader = CgroupReader(tmp_path, keep=keep_all)
    tree.advance(100)
    cpu, mem = reader.read_all()
    assert (cpu[svc(0)], mem[svc(0)]) == (200e6, float(8 << 30))
    before = open_fds()
    tree.remove(svc(0))  # between two ticks: the walk lists the same names as before
    tree.add(svc(0), cpus=0.5, memory_bytes=1 << 20)
    tree.advance(2)
    cpu, mem = reader.read_all()
    assert (cpu[svc(0)], mem[svc(0)]) == (1e6, float(1 << 20))  # the new cgroup's counters, not the old ones
    assert cpu[svc(1)] == 102e6
    assert open_fds() == before  # the dead descriptors were closed, the new files kept in their place
    tree.advance(2)
    assert reader.read_all()[0][svc(0)] == 2e6
    reader.close()


@pytest.mark.usefixtures("kernfs_pread")
def test_vanished_cgroups_close_their_descriptors(tmp_path: Path) -> None:
    tree = KernfsLikeTree(tmp_path)
    pod = "kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    for i in range(20):
        tree.add(svc(i), cpus=0.1, memory_bytes=1 << 20)
    tree.add(f"{pod}/{'ab' * 32}", cpus=0.1)
    tree.add(f"{pod}/{'cd' * 32}", cpus=0.1)
    reader = CgroupReader(tmp_path, keep=keep_all)
    before = open_fds()
    assert len(reader.read_all()[0]) == 22
    assert open_fds() == before + 44
    for i in range(10):
        tree.remove(svc(i))
    assert len(reader.read_all()[0]) == 12
    assert open_fds() == before + 24
    tree.remove(pod)  # a whole subtree: both containers' descriptors close
    assert len(reader.read_all()[0]) == 10
    assert open_fds() == before + 20
    assert reader.files.kept == 20
    reader.close()
    assert open_fds() == before


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENOENT, errno.ESTALE, errno.EBADF, errno.EIO])
def test_a_failing_kept_descriptor_is_reopened_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    tree = KernfsLikeTree(tmp_path)
    tree.add(svc(0), cpus=1.0, memory_bytes=1 << 20)
    reader = CgroupReader(tmp_path, keep=keep_all)
    reader.read_all()
    failing = {f.fd for f in reader.files._held}
    assert len(failing) == 2
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if fd in failing:  # each of the kept descriptors fails once (its number may be reused after)
            failing.discard(fd)
            raise OSError(code, os.strerror(code))
        if os.fstat(fd).st_nlink == 0:  # and kernfs's ENODEV for a removed cgroup's file, as kernfs_pread
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return real(fd, n, offset)

    real_open, opened = os.open, []

    def open_(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if not flags & (os.O_WRONLY | os.O_RDWR | os.O_DIRECTORY):  # the reader's, not the tree's (or rmtree's)
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "open", open_)
    before = open_fds()
    tree.advance(3)
    cpu, mem = reader.read_all()
    assert (cpu[svc(0)], mem[svc(0)]) == (3e6, float(1 << 20))  # read afresh by path
    assert sorted(opened) == sorted(f"{tmp_path}/{svc(0)}/{n}" for n in ("cpu.stat", "memory.current"))
    assert not failing
    assert reader.files.kept == 2
    assert open_fds() == before
    tree.remove(svc(0))
    tree.add(svc(0), cpus=1.0)
    (tmp_path / svc(0) / "cpu.stat").unlink()  # listed, but its counters cannot be read: left out, no error
    assert reader.read_all() == ({}, {})
    tree.remove(svc(0))
    assert reader.read_all() == ({}, {})
    assert reader.files.kept == 0
    assert open_fds() == before - 2
    reader.close()


def test_without_the_right_to_noatime_files_are_opened_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = CgroupTree(tmp_path)
    tree.add(svc(0), cpus=1.0, memory_bytes=1 << 20)
    real_open, refused = os.open, []

    def open_(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & files.NOATIME:  # as the kernel answers a caller who neither owns the file nor has CAP_FOWNER
            refused.append(path)
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    reader = CgroupReader(tmp_path)
    tree.advance(1)
    assert reader.read_all() == ({svc(0): 1e6}, {svc(0): float(1 << 20)})
    tree.advance(1)
    assert reader.read_all()[0] == {svc(0): 2e6}
    assert len(refused) == (1 if files.NOATIME else 0)  # asked once, then never again


def test_fd_cap_leaves_headroom_below_the_soft_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for soft, expected in ((1024, 512), (100_000, 4096), (600, 88), (300, 0), (resource.RLIM_INFINITY, 4096)):
        monkeypatch.setattr(resource, "getrlimit", lambda _r, soft=soft: (soft, resource.RLIM_INFINITY))
        assert fd_cap() == expected
    assert KeptFiles(cap=-3).cap == 0


@pytest.mark.asyncio
@pytest.mark.usefixtures("kernfs_pread")
async def test_every_tick_conserves_with_kept_descriptors_and_churn(tmp_path: Path) -> None:
    clock = ManualClock()
    proc = ProcTree(tmp_path / "proc", sockets=1, cpus_per_socket=2)
    tree = KernfsLikeTree(tmp_path / "cg")
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 50.0), FakeDevice("dram-0", "dram", 10.0)], clock)
    att = Attributor(tmp_path / "cg", tmp_path / "proc", max_cgroups=6, retention_s=1000, clock=clock)
    att.reader = CgroupReader(tmp_path / "cg", max_fds=9, keep=keep_all)
    mon = build_monitor(sensor, clock=clock, attributor=att, host_reader=HostReader(tmp_path / "proc"))  # fmt: skip
    for i in range(8):
        tree.add(svc(i), cpus=0.05 * (i + 1), memory_bytes=(i + 1) << 24)
    await sensor.start()
    await mon.tick()
    snap: Snapshot | None = None
    for t in range(12):
        if t % 3 == 0:  # the same path recreated, counters from 0 again
            tree.remove(svc(t % 8))
            tree.add(svc(t % 8), cpus=0.3, memory_bytes=1 << 26)
        if t == 5:
            tree.remove(svc(7))
        clock.advance(10)
        proc.advance(10, 0.6)
        tree.advance(10)
        snap = await mon.tick()
        assert att.reader.files.kept <= 9
        for kind, watts in (("cpu", 50.0), ("dram", 10.0)):  # every tick's energy, split without loss
            assert math.fsum(w for cg in snap.cgroups for k, w, _ in cg.kinds if k == kind and w) == pytest.approx(
                watts, rel=1e-9
            )
    assert snap is not None
    assert {cg.cgroup for cg in snap.cgroups} >= {OTHER, UNATTRIBUTED, IDLE}  # 7 cgroups, at most 6 series
    att.close()
    assert att.reader.files.kept == 0


@contextlib.contextmanager
def real_cgroup() -> Iterator[Path]:
    """A new cgroup v2 directory on this host's cgroupfs, removed afterwards; skips where that is not allowed."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if " cgroup2 " in line]
    for mount in mounts:
        d = Path(mount) / f"carbond-test-{uuid.uuid4().hex[:8]}"
        try:
            d.mkdir()
        except OSError:
            continue
        try:
            yield d
        finally:
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            d.rmdir()
        return
    host_lacks("writable-cgroup2", f"none of {mounts} let a cgroup be created")


def test_on_the_real_cgroupfs_a_recreated_cgroup_is_reopened_and_a_removed_one_closed() -> None:
    with real_cgroup() as root:
        unit = root / "system.slice" / "probe.service"
        unit.mkdir(parents=True)
        reader = CgroupReader(root)  # the default rule: kernfs files report a size of 0, so they are kept
        before = open_fds()
        cpu, _ = reader.read_all()
        assert cpu == {"system.slice/probe.service": 0.0}
        assert reader.files.kept >= 1
        assert open_fds() == before + reader.files.kept
        kept = reader.files.kept
        unit.rmdir()
        unit.mkdir()
        assert reader.read_all()[0] == {"system.slice/probe.service": 0.0}  # the old descriptor fails: reopened
        assert reader.files.kept == kept
        assert open_fds() == before + kept
        unit.rmdir()
        assert reader.read_all()[0] == {}
        assert reader.files.kept == 0
        assert open_fds() == before
        reader.close()


def test_kept_file_module_reads_nothing_from_a_missing_file(tmp_path: Path) -> None:
    f = files.CounterFile(str(tmp_path / "absent"))
    assert KeptFiles(cap=4).read(f) is None
