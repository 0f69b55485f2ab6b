"""The cgroup of a process as a path of the walked hierarchy (IO), whatever cgroup namespace carbond runs in.

``/proc/<pid>/cgroup`` shows a process's cgroup relative to the *reader's* cgroup namespace root. On the host
that root is the hierarchy's, and the path reads as the walk names it. In a container with a cgroup namespace of
its own (what containerd, cri-o and docker give on cgroup v2 hosts, and so the DaemonSet), the root is carbond's
own container cgroup: another pod's process reads like ``0::/../../kubepods-burstable-pod<uid>.slice/
cri-containerd-<id>.scope`` (up to the common ancestor, then down) and carbond's own as ``0::/``, while the
hierarchy mounted at ``/host/sys/fs/cgroup`` is walked from the host's root. The same holds for v1 hierarchies.

:class:`PidCgroups` finds the namespace root once, in the walked hierarchy: it looks for carbond's own pid in
``cgroup.procs`` (first where ``<procfs>/self/cgroup`` says, then through the whole hierarchy). ``cgroup.procs``
numbers processes in the reader's PID namespace, so ``os.getpid()`` is right with or without ``hostPID``; and
``<procfs>/self`` is carbond in any procfs, the host's included. Where it was found, minus its shown path, is the
namespace root: a shown path is joined to it and normalised, and one climbing above the walked root is unknown.
Where carbond's pid is not found (``self`` unreadable, or a hierarchy that is not carbond's own), a shown path
without ``..`` is taken as it reads, unless carbond's own path is the namespace root ``/``; then, and for any path
with ``..``, the path after its ``..`` is matched against the end of the walked workloads' paths (a cgroup nested
below a workload included): exactly one match resolves it; none or several leave it unknown, so its GPU share
stays ``(unattributed)`` rather than going to a wrong pod. Resolved paths are cached (bounded).

Cost: the one walk that finds carbond's own cgroup is paid once; paths resolved by suffix are cached. Measured by
``python -m tests.attribution.pidcgroups_cost`` (figures in bench/results.md).

The line read is the walked hierarchy's: ``0::`` on cgroup v2, the one listing ``cpuacct`` on v1 and hybrid hosts
(where the ``0::`` line names the unified hierarchy, which need not match the v1 one).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from carbond.logs import get_logger

log = get_logger("carbond.attribution.pidcgroups")

MAX_CACHE = 4096
MAX_SCAN_DIRS = 200_000  # a bound on the one search for carbond's own pid


def shown_line(text: str, version: int) -> str | None:
    """The path of the hierarchy of ``version`` (2: the ``0::`` line; 1: the line listing ``cpuacct``) in the
    text of a ``/proc/<pid>/cgroup``, as shown (leading ``/``, maybe ``..``); None when absent."""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and hid == "0" and controllers == "":
            return path
        if version == 1 and "cpuacct" in controllers.split(","):
            return path
    return None


def read_shown(procfs: Path, pid: int | str, version: int) -> str | None:
    """:func:`shown_line` of ``<procfs>/<pid>/cgroup``; None when unreadable (the process is gone)."""
    try:
        text = (procfs / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    return shown_line(text, version)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def _join(base: Iterable[str], shown: Iterable[str]) -> str | None:
    """``shown`` below ``base``, normalised; None if it climbs above the root."""
    out = list(base)
    for p in shown:
        if p != "..":
            out.append(p)
        elif out:
            out.pop()
        else:
            return None
    return "/".join(out)


def _listed(procs: Path, pid: str) -> bool:
    try:
        return pid in procs.read_text().split()
    except OSError:
        return False


def find_pid(hierarchy: Path, pid: int, guess: str = "") -> str | None:
    """The cgroup (relative to ``hierarchy``) whose ``cgroup.procs`` lists ``pid``: ``guess`` first, then a walk."""
    wanted = str(pid)
    parts = _parts(guess)
    if ".." not in parts and _listed(hierarchy.joinpath(*parts, "cgroup.procs"), wanted):
        return "/".join(parts)
    for seen, (dirpath, dirnames, _files) in enumerate(os.walk(hierarchy)):
        if seen >= MAX_SCAN_DIRS:
            break
        if _listed(Path(dirpath, "cgroup.procs"), wanted):
            rel = os.path.relpath(dirpath, hierarchy)
            return "" if rel == "." else rel.replace(os.sep, "/")
        dirnames.sort()  # the same order every time
    return None


class PidCgroups:
    """Maps ``/proc/<pid>/cgroup`` to paths of ``hierarchy`` (v ``version``), as the module docstring says.
    ``own_pid`` is carbond's pid as its own PID namespace numbers it (tests give another)."""

    def __init__(self, procfs: Path, hierarchy: Path | None, version: int, own_pid: int | None = None) -> None:
        self._procfs = procfs
        self._hierarchy = hierarchy
        self.version = version
        self._own_pid = os.getpid() if own_pid is None else own_pid
        self._located = False
        self.root: list[str] | None = None  # the namespace root's components; None: unknown
        self._certain = False  # the root was located (not assumed)
        self._cache: dict[str, str] = {}
        self._indexed: Collection[str] | None = None
        self._index: dict[str, list[str]] = {}

    def _locate(self) -> None:
        self._located = True
        own = read_shown(self._procfs, "self", self.version)
        if own is None:  # no self in this procfs (a fixture): paths are taken as they read
            self.root = []
            return
        own_parts = _parts(own)
        found = None
        if self._hierarchy is not None and ".." not in own_parts:
            found = find_pid(self._hierarchy, self._own_pid, own)
        if found is not None:
            where = _parts(found)
            if where[len(where) - len(own_parts) :] == own_parts:
                self.root, self._certain = where[: len(where) - len(own_parts)], True
        elif own_parts and ".." not in own_parts:
            self.root = []  # not at a namespace root: most likely no cgroup namespace, or the walk is of its view
        if own_parts and ".." not in own_parts and self._certain and not self.root:
            return  # no cgroup namespace: nothing worth a log line
        log.info(
            "cgroup_namespace",
            own=own,
            found=found,
            root=None if self.root is None else "/" + "/".join(self.root),
            located=self._certain,
        )

    def resolve(self, shown: str, known: Collection[str] = ()) -> str | None:
        """The walked-hierarchy path of a shown cgroup path (no leading slash); None when unknown. ``known``: the
        walked workloads' paths, for the match by suffix."""
        if not self._located:
            self._locate()
        hit = self._cache.get(shown)
        if hit is not None:
            return hit
        parts = _parts(shown)
        path = None
        if self.root is not None:
            path = _join(self.root, parts)
        if path is None and not self._certain:
            if self._indexed is not known:  # the workloads by their last component, once per tick at most
                self._index = {}
                for p in known:
                    self._index.setdefault(p.rpartition("/")[2], []).append(p)
                self._indexed = known
            path = _ends(parts, self._index)
        if path is not None:
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
            self._cache[shown] = path
        return path

    def of_pid(self, pid: int | str, known: Collection[str] = ()) -> str | None:
        """The walked-hierarchy path of a process's cgroup; None when gone or unknown."""
        shown = read_shown(self._procfs, pid, self.version)
        return None if shown is None else self.resolve(shown, known)


def _ends(parts: list[str], index: Mapping[str, list[str]]) -> str | None:
    """The one indexed path ending with the shown path's components after its ``..`` (or with a leading part of
    them: a cgroup nested in a workload); None when none or several do."""
    up = 0
    while up < len(parts) and parts[up] == "..":
        up += 1
    rest = parts[up:]
    if not rest or ".." in rest:  # the kernel writes ``..`` only first
        return None
    for k in range(len(rest), 0, -1):
        tail = "/".join(rest[:k])
        found = [p for p in index.get(rest[k - 1], ()) if p == tail or p.endswith("/" + tail)]
        if len(found) == 1:
            return "/".join([found[0], *rest[k:]])
        if found:
            return None
    return None
