"""Fixture cgroup trees with real path shapes and CPU usage advancing at chosen rates (v2, v1 and hybrid).

v2: ``cgroup.controllers`` at the root, ``cpu.stat`` (``usage_usec``) and ``memory.current`` in every group; a
parent's usage includes its children's, as the kernel reports it. v1: ``cpu,cpuacct`` (with ``cpu`` and
``cpuacct`` symlinks to it) holding ``cpuacct.usage`` in ns, and ``memory`` holding ``memory.usage_in_bytes``.
Hybrid: v1 plus an empty ``unified`` v2 mount.

Slurm (:func:`add_slurm_step`): a job step laid out as Slurm's cgroup plugins lay it out, with its tasks (and on
v2 the step's ``slurm`` directory for its slurmstepd) below it, and processes in the tasks.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from carbond.testing.procfs import ProcTree


class CgroupTree:
    def __init__(self, root: Path, version: str = "v2") -> None:
        self.root = root
        self.version = version
        root.mkdir(parents=True, exist_ok=True)
        self.rate: dict[str, float] = {}  # path -> CPUs busy
        self.usage_usec: dict[str, float] = {}
        self.memory: dict[str, int] = {}
        self.lock = threading.RLock()  # add/remove from one thread while a CgroupWriter advances from another
        if version == "v2":
            (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        else:
            (root / "cpu,cpuacct").mkdir(exist_ok=True)
            (root / "memory").mkdir(exist_ok=True)
            for alias in ("cpu", "cpuacct"):
                if not (root / alias).exists():
                    (root / alias).symlink_to("cpu,cpuacct")
            if version == "hybrid":
                (root / "unified").mkdir(exist_ok=True)
        self._write_all()

    def _dirs(self, path: str) -> list[Path]:
        if self.version == "v2":
            return [self.root / path]
        return [self.root / "cpu,cpuacct" / path, self.root / "memory" / path]

    def add(self, path: str, cpus: float = 0.0, memory_bytes: int = 0, *, write: bool = True) -> None:
        """Create the group; ``write=False`` defers the counter files to the next add, remove or advance."""
        with self.lock:
            for d in self._dirs(path):
                d.mkdir(parents=True, exist_ok=True)
            self.rate[path] = cpus
            self.usage_usec.setdefault(path, 0.0)
            self.memory[path] = memory_bytes
            if write:
                self._write_all()

    def remove(self, path: str, *, write: bool = True) -> None:
        with self.lock:
            for d in self._dirs(path):
                shutil.rmtree(d, ignore_errors=True)
            for key in [k for k in self.rate if k == path or k.startswith(path + "/")]:
                del self.rate[key], self.usage_usec[key], self.memory[key]
            if write:
                self._write_all()

    def set_procs(self, path: str, pids: list[int]) -> None:
        """The ``cgroup.procs`` of a group in the CPU hierarchy (the processes in it, one per line)."""
        d = self.root / path if self.version == "v2" else self.root / "cpu,cpuacct" / path
        d.mkdir(parents=True, exist_ok=True)
        _atomic(d / "cgroup.procs", "".join(f"{pid}\n" for pid in pids))

    def advance(self, seconds: float) -> None:
        with self.lock:
            for path, cpus in self.rate.items():
                self.usage_usec[path] += cpus * seconds * 1e6
            self._write_all()

    def _write(self, path: str, usec: int, mem: int) -> None:
        if self.version == "v2":
            d = self.root / path
            _atomic(d / "cpu.stat", f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")
            if path:
                _atomic(d / "memory.current", f"{mem}\n")
        else:
            _atomic(self.root / "cpu,cpuacct" / path / "cpuacct.usage", f"{usec * 1000}\n")
            _atomic(self.root / "memory" / path / "memory.usage_in_bytes", f"{mem}\n")

    def _write_all(self) -> None:
        """Every group's counters: its own plus its descendants', as the kernel reports them."""
        usec: dict[str, float] = {"": 0.0}
        mem: dict[str, float] = {"": 0.0}
        for p in self.rate:
            parts = p.split("/")
            for ancestor in ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]:
                usec[ancestor] = usec.get(ancestor, 0.0) + self.usage_usec[p]
                mem[ancestor] = mem.get(ancestor, 0.0) + self.memory[p]
        for p in sorted(usec):
            if all(d.is_dir() for d in self._dirs(p)):
                self._write(p, int(usec[p]), int(mem[p]))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class KernfsLikeTree(CgroupTree):
    """A v2 tree whose counters are rewritten in place, as kernfs regenerates them, so a descriptor kept open
    (carbond.keptfiles) sees each new value; the plain tree replaces files, which a kept descriptor would
    not see."""

    def _write(self, path: str, usec: int, mem: int) -> None:
        d = self.root / path
        _in_place(d / "cpu.stat", f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")
        if path:
            _in_place(d / "memory.current", f"{mem}\n")


def _in_place(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class CgroupWriter:
    """Advances a cgroup tree and its /proc/stat in real time from a background thread (end-to-end tests)."""

    def __init__(self, tree: CgroupTree, proc: ProcTree, busy: float, period_s: float = 0.1) -> None:
        self._tree, self._proc, self._busy, self._period = tree, proc, busy, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cgroup-writer", daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._period):
            now = time.monotonic()
            self._tree.advance(now - last)
            self._proc.advance(now - last, self._busy)
            last = now

    def __enter__(self) -> CgroupWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def shown_path(path: str, ns_root: str = "") -> str:
    """``path`` as ``/proc/<pid>/cgroup`` shows it to a reader whose cgroup namespace root is ``ns_root``: as the
    kernel's ``kernfs_path_from_node`` writes it, one ``..`` per level from the root up to the common ancestor, then
    down to ``path``; ``/`` for the root itself."""
    target = [p for p in path.split("/") if p]
    base = [p for p in ns_root.split("/") if p]
    common = 0
    while common < min(len(target), len(base)) and target[common] == base[common]:
        common += 1
    return "/" + "/".join([".."] * (len(base) - common) + target[common:])


def write_pid_cgroup(
    procfs: Path,
    pid: int | str,
    path: str,
    *,
    ns_root: str = "",
    version: str = "v2",
    unified: str | None = None,
) -> None:
    """``/proc/<pid>/cgroup`` of a process in ``path``, as a reader in the cgroup namespace rooted at ``ns_root``
    sees it (``""``: the host's). ``pid`` may be ``"self"``. v1 hosts list ``cpu,cpuacct``, ``memory`` and systemd's
    named hierarchy, hybrid hosts the ``0::`` line of the unified hierarchy too (at ``unified``, else ``path``)."""
    d = procfs / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    shown = shown_path(path, ns_root)
    if version == "v2":
        text = f"0::{shown}\n"
    else:
        text = f"12:memory:{shown}\n4:cpu,cpuacct:{shown}\n1:name=systemd:{shown}\n"
        if version == "hybrid":
            text += f"0::{shown_path(unified if unified is not None else path, ns_root)}\n"
    (d / "cgroup").write_text(text)
    os.utime(d)


def slurm_job_cgroup(version: str, job_id: int | str, *, uid: int = 1000, node: str = "") -> str:
    """Where Slurm puts a job's cgroup: v1 ``slurm[_<node>]/uid_<uid>/job_<id>`` (relative to each controller's
    mount), v2 ``system.slice/[<node>_]slurmstepd.scope/job_<id>`` (``node``: slurmd built with multiple-slurmd)."""
    if version == "v2":
        scope = f"{node}_slurmstepd.scope" if node else "slurmstepd.scope"
        return f"system.slice/{scope}/job_{job_id}"
    return f"slurm{'_' + node if node else ''}/uid_{uid}/job_{job_id}"


def add_slurm_step(
    tree: CgroupTree,
    job_id: int | str,
    step: int | str,
    *,
    cpus: float = 0.0,
    memory_bytes: int = 0,
    uid: int = 1000,
    node: str = "",
    tasks: int = 1,
    pids: Sequence[int] = (),
    procfs: Path | None = None,
    write: bool = True,
) -> str:
    """Lay out job step ``step`` (a number, "batch", "extern" or "interactive") of ``job_id`` and return the step's
    cgroup path. Its ``cpus`` and memory are spread evenly over ``tasks`` task cgroups (``task_<k>``; on v2 under
    ``user/``); on v2 the step also gets its empty ``slurm`` directory. ``pids`` go round-robin into the tasks'
    ``cgroup.procs`` and, with ``procfs``, into ``/proc/<pid>/cgroup``. ``write=False`` defers the counter files, as
    :meth:`CgroupTree.add` does (laying out hundreds of steps)."""
    version = "v2" if tree.version == "v2" else "v1"
    path = f"{slurm_job_cgroup(version, job_id, uid=uid, node=node)}/step_{step}"
    with tree.lock:
        if version == "v2":
            tree.add(f"{path}/slurm", write=False)
        task_paths = [f"{path}/user/task_{k}" if version == "v2" else f"{path}/task_{k}" for k in range(tasks)]
        for task in task_paths:
            tree.add(task, cpus / tasks, memory_bytes // tasks, write=False)
        for k, task in enumerate(task_paths):
            mine = list(pids[k :: len(task_paths)])
            tree.set_procs(task, mine)
            if procfs is not None:
                for pid in mine:
                    write_pid_cgroup(procfs, pid, task, version=tree.version)
        if write:
            tree.advance(0)
    return path


def set_slurm_step_rate(tree: CgroupTree, step_path: str, cpus: float) -> None:
    """Spread ``cpus`` evenly over the tasks of a step made by :func:`add_slurm_step`."""
    with tree.lock:
        tasks = [p for p in tree.rate if p.startswith(step_path + "/") and p.rpartition("/")[2].startswith("task_")]
        for task in tasks:
            tree.rate[task] = cpus / len(tasks)


def remove_slurm_job(tree: CgroupTree, job_id: int | str, *, uid: int = 1000, node: str = "") -> None:
    """Remove a job's cgroup and everything below it, as slurmstepd does at the job's end."""
    version = "v2" if tree.version == "v2" else "v1"
    tree.remove(slurm_job_cgroup(version, job_id, uid=uid, node=node))
