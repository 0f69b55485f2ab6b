"""Reading cgroups (IO): workload cgroups and their CPU time and memory, on cgroup v2, v1 and hybrid hosts.

v2 (``cgroup.controllers`` at the root): CPU from ``cpu.stat`` ``usage_usec``, memory from ``memory.current``.
v1 and hybrid: CPU from the ``cpuacct`` hierarchy's ``cpuacct.usage`` (ns), memory from the ``memory``
hierarchy's ``memory.usage_in_bytes``. The walk descends from the root and stops at each workload (a unit,
container or pod container: see :mod:`carbond.attribution.paths`), whose counters include its children's, so
nothing is counted twice. Identities are cached by path: a walk costs one scandir per non-workload directory and
two small reads per workload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from carbond.attribution.paths import Identity, identify


class Usage(NamedTuple):  # a named tuple: one per cgroup per tick, cheaper than a frozen dataclass
    cpu_usec: float
    memory_bytes: float


def _read(path: str) -> bytes | None:
    """A small file's bytes, with raw syscalls (a buffered open costs several times more, 2,000 times a tick)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    data = _read(path)
    try:
        return None if data is None else int(data.split(None, 1)[0])
    except (ValueError, IndexError):
        return None


def _cpu_stat_usec(path: str) -> int | None:
    data = _read(path)
    if data is None:
        return None
    start = 0 if data.startswith(b"usage_usec ") else data.find(b"\nusage_usec ") + 1
    if start == 0 and not data.startswith(b"usage_usec "):
        return None
    try:
        return int(data[start + 11 : data.find(b"\n", start) if b"\n" in data[start:] else None])
    except ValueError:
        return None


class CgroupReader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 2 if (root / "cgroup.controllers").exists() else 1
        cpu_v1 = next((root / n for n in ("cpu,cpuacct", "cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
        self._cpu_root = root if self.version == 2 else cpu_v1
        self._mem_root = root if self.version == 2 else (root / "memory")
        self._ids: dict[str, Identity] = {}
        self._cpu_s = f"{self._cpu_root}/"
        self._mem_s = f"{self._mem_root}/"

    @property
    def available(self) -> bool:
        return self._cpu_root is not None and self._cpu_root.is_dir()

    def workloads(self) -> list[Identity]:
        """Every workload cgroup under the CPU hierarchy, without descending into them."""
        assert self._cpu_root is not None
        found: list[Identity] = []
        stack = [("", str(self._cpu_root))]
        ids = self._ids
        visited = 0
        while stack:
            rel, path = stack.pop()
            try:
                with os.scandir(path) as it:
                    dirs = [(e.name, e.path) for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            prefix = rel + "/" if rel else ""
            for name, full in dirs:
                child = prefix + name
                ident = ids.get(child)
                if ident is None:
                    ident = ids[child] = identify(child)
                visited += 1
                if ident.is_workload:
                    found.append(ident)
                else:
                    stack.append((child, full))
        if len(ids) > 4 * max(visited, 1000):  # forget vanished paths, bounded under churn
            live = {i.cgroup for i in found}
            self._ids = {k: v for k, v in ids.items() if k in live or not v.is_workload}
        return found

    def usage(self, ident: Identity) -> Usage | None:
        if self.version == 2:
            cpu = _cpu_stat_usec(self._cpu_s + ident.cgroup + "/cpu.stat")
            mem = _read_int(self._mem_s + ident.cgroup + "/memory.current")
        else:
            ns = _read_int(self._cpu_s + ident.cgroup + "/cpuacct.usage")
            cpu = None if ns is None else ns // 1000
            mem = _read_int(self._mem_s + ident.cgroup + "/memory.usage_in_bytes")
        if cpu is None:
            return None
        return Usage(float(cpu), float(mem or 0))

    def read_all(self) -> dict[Identity, Usage]:
        if self.version != 2:
            return {i: u for i in self.workloads() if (u := self.usage(i)) is not None}
        out = {}  # the v2 path of usage(), inlined: it runs for every workload every tick
        cpu_s, mem_s = self._cpu_s, self._mem_s
        for ident in self.workloads():
            cpu = _cpu_stat_usec(cpu_s + ident.cgroup + "/cpu.stat")
            if cpu is not None:
                out[ident] = Usage(float(cpu), float(_read_int(mem_s + ident.cgroup + "/memory.current") or 0))
        return out


def pid_cgroup(procfs: Path, pid: int) -> str | None:
    """The cgroup path of a process (the v2 line, else the cpuacct line of v1)."""
    try:
        text = (procfs / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    v1 = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            return path.lstrip("/")
        if "cpuacct" in controllers.split(","):
            v1 = path.lstrip("/")
    return v1
