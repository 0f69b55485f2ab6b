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
from dataclasses import dataclass
from pathlib import Path

from carbond.attribution.paths import Identity, identify


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_usec: float
    memory_bytes: float


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_stat_usec(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.startswith(b"usage_usec "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class CgroupReader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 2 if (root / "cgroup.controllers").exists() else 1
        cpu_v1 = next((root / n for n in ("cpu,cpuacct", "cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
        self._cpu_root = root if self.version == 2 else cpu_v1
        self._mem_root = root if self.version == 2 else (root / "memory")
        self._ids: dict[str, Identity] = {}

    @property
    def available(self) -> bool:
        return self._cpu_root is not None and self._cpu_root.is_dir()

    def _identity(self, rel: str) -> Identity:
        ident = self._ids.get(rel)
        if ident is None:
            ident = self._ids[rel] = identify(rel)
        return ident

    def workloads(self) -> list[Identity]:
        """Every workload cgroup under the CPU hierarchy, without descending into them."""
        assert self._cpu_root is not None
        found: list[Identity] = []
        stack = [("", str(self._cpu_root))]
        seen: set[str] = set()
        while stack:
            rel, path = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                child = f"{rel}/{e.name}" if rel else e.name
                ident = self._identity(child)
                seen.add(child)
                if ident.is_workload:
                    found.append(ident)
                else:
                    stack.append((child, e.path))
        if len(self._ids) > 4 * max(len(seen), 1000):  # forget vanished paths, bounded under churn
            self._ids = {k: v for k, v in self._ids.items() if k in seen}
        return found

    def usage(self, ident: Identity) -> Usage | None:
        assert self._cpu_root is not None
        if self.version == 2:
            cpu = _cpu_stat_usec(f"{self._cpu_root}/{ident.cgroup}/cpu.stat")
            mem = _read_int(f"{self._mem_root}/{ident.cgroup}/memory.current")
        else:
            ns = _read_int(f"{self._cpu_root}/{ident.cgroup}/cpuacct.usage")
            cpu = None if ns is None else ns // 1000
            mem = _read_int(f"{self._mem_root}/{ident.cgroup}/memory.usage_in_bytes")
        if cpu is None:
            return None
        return Usage(float(cpu), float(mem or 0))

    def read_all(self) -> dict[Identity, Usage]:
        out = {}
        for ident in self.workloads():
            u = self.usage(ident)
            if u is not None:
                out[ident] = u
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
