"""Which processes are the job, and how much CPU time and memory they use.

``auto`` tries, in order:

1. ``cgroup``: a child cgroup of our own cgroup v2 (``carbond-job-<run id>``), when this user may create it and
   move processes into it. The command starts under a tiny Python wrapper that waits on a pipe until the parent has
   moved it, then ``exec``s the command: nothing the job starts can escape the count, not even daemonised
   grandchildren. CPU time from ``cpu.stat`` ``usage_usec``, memory from ``memory.current`` (else the RSS of its
   processes). In a container with a cgroup namespace of its own (``/proc/self/cgroup`` reads ``0::/``) whose
   ``cgroupfs`` is the host's hierarchy, our own cgroup is found in it as the daemon finds it
   (:mod:`carbond.attribution.pidcgroups`), never taken as the host's root.
2. ``systemd``: a transient ``systemd-run --user --scope`` unit (``carbond-job-<run id>.scope``), when a user
   manager answers; the same counters, from the scope's cgroup.
3. ``proctree``: the process and its descendants through ``/proc/<pid>/stat``: user + system time including
   reaped children, RSS. Processes that daemonise (re-parent to init) are lost from then on.

``machine`` does no attribution: the report gives the whole machine's figures. At the job's exit its CPU time
from ``wait4()`` (the child and every descendant it reaped) tops up what the last sample missed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from carbond.attribution.pidcgroups import PidCgroups, read_shown
from carbond.procfs import USER_HZ, mem_used_bytes, parse_cpu_line

#: waits until the parent has moved it into the job's cgroup (a byte on the pipe), then becomes the command;
#: exits 127/126 as a shell does when the command is missing or not executable
_WRAPPER = (
    "import os,sys\n"
    "fd=int(sys.argv[1]);os.read(fd,1);os.close(fd)\n"
    "try:os.execvp(sys.argv[2],sys.argv[2:])\n"
    "except OSError as e:\n"
    " sys.stderr.write(f'carbond measure: {sys.argv[2]}: {e.strerror}\\n')\n"
    " sys.exit(127 if isinstance(e,FileNotFoundError) else 126)\n"
)


class MachineUsage(NamedTuple):
    busy_usec: float
    total_usec: float
    mem_used_bytes: float


class JobUsage(NamedTuple):
    cpu_usec: float
    rss_bytes: float
    pids: frozenset[int]


def read_machine(procfs: Path) -> MachineUsage:
    """Busy and total CPU time (``/proc/stat``, as the daemon counts it) and memory in use (``/proc/meminfo``)."""
    busy, total = parse_cpu_line((procfs / "stat").read_bytes().split(b"\n", 1)[0])
    used = mem_used_bytes((procfs / "meminfo").read_bytes())
    return MachineUsage(busy * 1e6 / USER_HZ, total * 1e6 / USER_HZ, used)


class JobProbe(Protocol):
    method: str
    detail: str

    def sample(self) -> JobUsage:
        """Cumulative CPU time of the job (never decreasing), its memory now, its processes now."""
        ...

    def finish(self, cpu_usec: float, peak_rss_bytes: float = 0.0) -> None:
        """The job's total CPU time and its peak memory at exit (from ``wait4``), where known: a job gone before
        the next sample is charged its peak memory for that last interval (else a job shorter than a tick would
        get no memory energy at all)."""
        ...


class ProcStat(NamedTuple):
    ppid: int
    cpu_s: float  # user + system, with the reaped children's
    rss_bytes: float


_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_procfs(procfs: Path) -> Path:
    """A procfs that numbers processes as this one does: ``procfs``, unless it is another PID namespace's (the host's
    ``/proc`` mounted at ``/host/proc`` in a container without ``hostPID``, where our children's PIDs name other
    processes or none); then our own ``/proc``. A fixture tree (no ``self`` symlink) is taken as given."""
    try:
        if os.readlink(procfs / "self") != str(os.getpid()):
            return Path("/proc")
    except OSError:
        pass
    return procfs


def proc_stat(procfs: Path, pid: int | str) -> ProcStat | None:
    """A process's parent, CPU time (self and reaped children) and RSS from ``/proc/<pid>/stat``; None if gone."""
    try:
        text = (procfs / str(pid) / "stat").read_text()
        f = text[text.rindex(")") + 2 :].split()
        ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        return ProcStat(int(f[1]), ticks / _TICK, float(int(f[21]) * _PAGE))
    except (OSError, ValueError, IndexError):
        return None


def process_tree(procfs: Path, root: int) -> dict[int, ProcStat]:
    """``root`` and its live descendants (one scan of /proc)."""
    stats: dict[int, ProcStat] = {}
    with contextlib.suppress(OSError), os.scandir(procfs) as it:
        for entry in it:
            if entry.name.isdigit():
                st = proc_stat(procfs, entry.name)
                if st is not None:
                    stats[int(entry.name)] = st
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid]
            stack.extend(children.get(pid, ()))
    return tree


class ProcTreeProbe:
    """A process and its descendants, through /proc."""

    method = "proctree"

    def __init__(
        self, pid: int, *, exclude_calling_thread: bool = False, detail: str = "", procfs: Path = Path("/proc")
    ) -> None:
        self.detail = detail or f"process {pid} and its descendants through /proc"
        self._pid = pid
        self._procfs = process_procfs(procfs)
        self._exclude = exclude_calling_thread
        self._last = 0.0  # so the first sample counts everything since the process started
        self._cpu = 0.0
        self._final = 0.0
        self._final_rss = 0.0

    def sample(self) -> JobUsage:
        tree = process_tree(self._procfs, self._pid)
        cpu_usec = sum(st.cpu_s for st in tree.values()) * 1e6
        if self._exclude:  # the measuring thread itself is not the job
            cpu_usec -= time.thread_time() * 1e6
        if tree:  # a descendant that vanished unreaped must not take its past time with it
            self._cpu += max(cpu_usec - self._last, 0.0)
            self._last = cpu_usec
        rss = sum(st.rss_bytes for st in tree.values()) if tree else self._final_rss
        return JobUsage(max(self._cpu, self._final), rss, frozenset(tree))

    def finish(self, cpu_usec: float, peak_rss_bytes: float = 0.0) -> None:
        self._final, self._final_rss = cpu_usec, peak_rss_bytes


def _cpu_stat_usec(path: Path) -> float | None:
    try:
        text = (path / "cpu.stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("usage_usec "):
            return float(line.split()[1])
    return None


class CgroupProbe:
    """Every process in a cgroup v2 (and its sub-cgroups); ``resolve`` finds the cgroup lazily (systemd scopes)."""

    def __init__(
        self,
        method: str,
        detail: str,
        path: Path | None,
        resolve: Callable[[], Path | None] | None = None,
        procfs: Path = Path("/proc"),
    ) -> None:
        self.method, self.detail = method, detail
        self._procfs = process_procfs(procfs)
        self.path = path
        self._resolve = resolve
        self._last = JobUsage(0.0, 0.0, frozenset())
        self._final = 0.0
        self._final_rss = 0.0

    def sample(self) -> JobUsage:
        if self.path is None and self._resolve is not None:
            self.path = self._resolve()
        cpu = _cpu_stat_usec(self.path) if self.path is not None else None
        if cpu is None or self.path is None:  # not there yet, or gone with its last process
            return self._last._replace(cpu_usec=max(self._last.cpu_usec, self._final), rss_bytes=self._final_rss)
        pids: set[int] = set()
        for dirpath, _dirs, _files in os.walk(self.path):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
        try:
            rss = float((self.path / "memory.current").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            rss = sum(st.rss_bytes for st in map(lambda p: proc_stat(self._procfs, p), pids) if st is not None)
        if not pids and self._final_rss:  # the job has exited: what is left is page cache, not the job's use
            rss = self._final_rss
        self._last = JobUsage(max(cpu, self._last.cpu_usec, self._final), rss, frozenset(pids))
        return self._last

    def finish(self, cpu_usec: float, peak_rss_bytes: float = 0.0) -> None:
        self._final, self._final_rss = cpu_usec, peak_rss_bytes


def unified_root(cgroupfs: Path) -> Path | None:
    """The cgroup v2 hierarchy: the root on a v2 host, ``unified/`` on a hybrid one; None on pure v1."""
    if (cgroupfs / "cgroup.controllers").exists():
        return cgroupfs
    if (cgroupfs / "unified" / "cgroup.procs").exists():
        return cgroupfs / "unified"
    return None


@dataclass
class Placement:
    """How the job is started and observed: ``prefix`` goes before the command; ``spawned(pid)`` gives the probe."""

    method: str
    detail: str
    prefix: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    _spawned: Callable[[int], JobProbe | None] | None = None
    _cleanup: Callable[[], None] | None = None
    procfs: Path = Path("/proc")

    def spawned(self, pid: int) -> JobProbe | None:
        if self._spawned is None:
            return ProcTreeProbe(pid, procfs=self.procfs) if self.method == "proctree" else None
        return self._spawned(pid)

    def cleanup(self) -> None:
        if self._cleanup is not None:
            with contextlib.suppress(OSError):
                self._cleanup()


def _own_cgroup(cgroupfs: Path, procfs: Path, run_id: str) -> Placement | str:
    root = unified_root(cgroupfs)
    if root is None:
        return "no cgroup v2 hierarchy"
    shown = read_shown(procfs, "self", 2)
    if shown is None:
        return "no cgroup v2 line in /proc/self/cgroup"
    own = PidCgroups(procfs, root, 2).resolve(shown)  # in a cgroup namespace, shown from its root
    if own is None:
        return f"own cgroup {shown} (in a cgroup namespace) not found under {root}"
    parent = root / own
    if not os.access(parent / "cgroup.procs", os.W_OK):
        return f"cgroup {'/' + own} is not writable by this user"
    job = parent / f"carbond-job-{run_id}"
    try:
        job.mkdir()
    except OSError as exc:
        return f"cannot create {job}: {exc.strerror}"
    read_fd, write_fd = os.pipe()
    open_fds = {read_fd, write_fd}
    rel = "/" + str(job.relative_to(root))

    def close(fd: int) -> None:
        if fd in open_fds:
            open_fds.discard(fd)
            os.close(fd)

    def spawned(pid: int) -> JobProbe:
        close(read_fd)
        try:
            (job / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            placement.method = "proctree"
            reason = f"could not move the job into {rel} ({exc.strerror}); "
            detail = reason + f"process {pid} and its descendants through /proc"
            return ProcTreeProbe(pid, detail=detail, procfs=procfs)
        finally:
            with contextlib.suppress(OSError):
                os.write(write_fd, b"go\n")
            close(write_fd)
        return CgroupProbe("cgroup", f"own cgroup v2 {rel}", job, procfs=procfs)

    def cleanup() -> None:
        close(read_fd)
        close(write_fd)
        job.rmdir()  # fails (and stays) while a daemonised process of the job lives on

    placement = Placement(
        "cgroup",
        f"own cgroup v2 {rel}",
        [sys.executable, "-I", "-S", "-c", _WRAPPER, str(read_fd)],
        (read_fd,),
        _spawned=spawned,
        _cleanup=cleanup,
    )
    return placement


def _systemd_scope(cgroupfs: Path, procfs: Path, run_id: str) -> Placement | str:
    binary = shutil.which("systemd-run")
    if binary is None:
        return "systemd-run not found"
    root = unified_root(cgroupfs)
    if root is None:
        return "no cgroup v2 hierarchy"
    base = [binary, "--user", "--scope", "--quiet", "--collect"]
    try:
        check = subprocess.run([*base, "--", "true"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemd-run --user failed: {exc}"
    if check.returncode != 0:
        return "systemd-run --user failed: " + (check.stderr.decode(errors="replace").strip() or "no user manager")
    unit = f"carbond-job-{run_id}.scope"
    cgroups = PidCgroups(process_procfs(procfs), root, 2)  # the job's pid is ours

    def spawned(pid: int) -> JobProbe:
        def resolve() -> Path | None:
            path = cgroups.of_pid(pid)
            return root / path if path is not None and path.endswith("/" + unit) else None

        return CgroupProbe("systemd", f"transient systemd user scope {unit}", None, resolve, procfs)

    return Placement(
        "systemd", f"transient systemd user scope {unit}", [*base, f"--unit={unit}", "--"], (), [], spawned
    )


def place(method: str, cgroupfs: Path, procfs: Path, run_id: str) -> Placement:
    """The attribution method to use; in ``auto`` the first that works, with each earlier one's reason in notes."""
    if method == "machine":
        return Placement("machine", "no attribution: the whole machine's figures")
    notes: list[str] = []
    tries: list[tuple[str, Callable[[Path, Path, str], Placement | str]]] = [
        ("cgroup", _own_cgroup),
        ("systemd", _systemd_scope),
    ]
    for name, attempt in tries:
        if method not in ("auto", name):
            continue
        got = attempt(cgroupfs, procfs, run_id)
        if isinstance(got, Placement):
            got.notes = notes
            return got
        notes.append(f"{name}: {got}")
    return Placement("proctree", "the command's process tree through /proc", notes=notes, procfs=procfs)
