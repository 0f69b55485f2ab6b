"""Reading cgroups (IO): workload cgroups and their CPU time and memory, on cgroup v2, v1 and hybrid hosts.

v2 (``cgroup.controllers`` at the root): CPU from ``cpu.stat`` ``usage_usec``, memory from ``memory.current``.
v1 and hybrid: CPU from the ``cpuacct`` hierarchy's ``cpuacct.usage`` (ns), memory from the ``memory``
hierarchy's ``memory.usage_in_bytes``. The walk descends from the root and stops at each workload (a unit,
container or pod container: see :mod:`carbond.attribution.paths`), whose counters include its children's, so
nothing is counted twice.

The walked tree is kept between ticks, one node per live directory, so a path is classified once: a tick lists
each non-workload directory (one ``listdir``; a ``scandir`` and the classification of new names only when the
listing changed) and reads two counter files per workload, through kept descriptors
(:mod:`carbond.keptfiles`). A directory that vanished from its parent's listing is dropped with
everything below it, and its workloads' descriptors are closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from carbond.attribution.paths import Identity, identify
from carbond.keptfiles import CounterFile, KeptFiles, generated_on_read


def _first_int(data: bytes) -> int | None:
    try:
        return int(data)  # the usual content: one number and a newline
    except ValueError:
        pass
    try:
        return int(data.split(None, 1)[0])
    except (ValueError, IndexError):
        return None


def _usage_usec(data: bytes) -> int | None:
    """``usage_usec`` from the bytes of a v2 ``cpu.stat`` (its first line, on every kernel so far)."""
    if data.startswith(b"usage_usec "):
        start = 11
    else:
        start = data.find(b"\nusage_usec ") + 12
        if start == 11:
            return None
    end = data.find(b"\n", start)
    try:
        return int(data[start:end] if end >= 0 else data[start:])
    except ValueError:
        return None


class Group:
    """A workload cgroup: its identity and its two counter files."""

    __slots__ = ("cpu", "ident", "key", "mem")

    def __init__(self, ident: Identity, cpu: str, mem: str) -> None:
        self.ident = ident
        self.key = ident.cgroup
        self.cpu = CounterFile(cpu)
        self.mem = CounterFile(mem)


class _Dir:
    """A directory the walk descends into, with what its last listing held."""

    __slots__ = ("dirs", "groups", "listing", "nodes", "path", "rel")

    def __init__(self, path: str, rel: str) -> None:
        self.path = path
        self.rel = rel
        self.listing: list[str] | None = None
        self.nodes: dict[str, Group | _Dir] = {}
        self.groups: list[Group] = []
        self.dirs: list[_Dir] = []


class CgroupReader:
    """Walks the CPU hierarchy and reads its workloads' counters; ``close()`` closes the kept descriptors.

    ``max_fds`` caps the descriptors kept open between ticks (None: :func:`carbond.keptfiles.fd_cap`).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_fds: int | None = None,
        keep: Callable[[os.stat_result], bool] = generated_on_read,
    ) -> None:
        self.root = root
        self.files = KeptFiles(max_fds, keep)
        self.version = 2 if (root / "cgroup.controllers").exists() else 1
        cpu_v1 = next((root / n for n in ("cpu,cpuacct", "cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
        self._cpu_root = root if self.version == 2 else cpu_v1
        self._mem_root = root if self.version == 2 else (root / "memory")
        names = ("cpu.stat", "memory.current") if self.version == 2 else ("cpuacct.usage", "memory.usage_in_bytes")
        self._cpu_file = (f"{self._cpu_root}/", f"/{names[0]}")
        self._mem_file = (f"{self._mem_root}/", f"/{names[1]}")
        self._tree = _Dir(str(self._cpu_root), "") if self._cpu_root is not None else None

    @property
    def hierarchy(self) -> Path | None:
        """The walked (CPU) hierarchy: the root on v2, the ``cpuacct`` one on v1 and hybrid hosts."""
        return self._cpu_root

    @property
    def available(self) -> bool:
        return self._cpu_root is not None and self._cpu_root.is_dir()

    def _walk(self) -> list[Group]:
        """Every workload cgroup under the CPU hierarchy, without descending into them."""
        found: list[Group] = []
        stack = [self._tree] if self._tree is not None else []
        while stack:
            d = stack.pop()
            try:
                listing = os.listdir(d.path)
                if listing != d.listing:
                    self._rescan(d, listing)
            except OSError:  # vanished since its parent was listed: its parent's next listing drops it
                continue
            found += d.groups
            stack += d.dirs
        return found

    def _rescan(self, d: _Dir, listing: list[str]) -> None:
        with os.scandir(d.path) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        old, nodes = d.nodes, {}
        for name in names:
            node = old.pop(name, None)
            if node is None:
                rel = f"{d.rel}/{name}" if d.rel else name
                ident = identify(rel)
                if ident.is_workload:
                    (cpu_a, cpu_b), (mem_a, mem_b) = self._cpu_file, self._mem_file
                    node = Group(ident, cpu_a + rel + cpu_b, mem_a + rel + mem_b)
                else:
                    node = _Dir(f"{d.path}/{name}", rel)
            nodes[name] = node
        for gone in old.values():
            self._drop(gone)
        d.listing, d.nodes = listing, nodes
        d.groups = [n for n in nodes.values() if isinstance(n, Group)]
        d.dirs = [n for n in nodes.values() if isinstance(n, _Dir)]

    def _drop(self, node: Group | _Dir) -> None:
        if isinstance(node, Group):
            self.files.release(node.cpu)
            self.files.release(node.mem)
            return
        for child in node.nodes.values():
            self._drop(child)
        node.nodes, node.groups, node.dirs, node.listing = {}, [], [], None

    def workloads(self) -> list[Identity]:
        """Every workload cgroup under the CPU hierarchy (the bench measures the system-call floor on them)."""
        return [g.ident for g in self._walk()]

    def read_all(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU time (µs) and memory in use (bytes) of every workload whose CPU time could be read, by path."""
        cpu: dict[str, float] = {}
        mem: dict[str, float] = {}
        read = self.files.read
        v2 = self.version == 2
        for g in self._walk():
            data = read(g.cpu)
            if data is None:
                continue
            if v2:
                usec = _usage_usec(data)
            else:
                ns = _first_int(data)
                usec = None if ns is None else ns // 1000
            if usec is None:
                continue
            data = read(g.mem)
            used = None if data is None else _first_int(data)
            cpu[g.key] = float(usec)
            mem[g.key] = float(used or 0)
        return cpu, mem

    def close(self) -> None:
        """Close the kept descriptors (reading again afterwards works, and keeps some again)."""
        self.files.close()
