"""Per-tick attribution of the node's energy to cgroups, with bounded series and retention.

Each tick: CPU-like energy (cpu, psys, soc) is split into ``(idle)`` by the node's idle share (``/proc/stat``) and
active energy shared by the cgroups' CPU-time deltas; DRAM/RAM energy by memory in use; GPU energy by the GPU
sensors' per-process shares mapped to cgroups through ``/proc/<pid>/cgroup``. What no cgroup accounts for is
``(unattributed)``. For every kind and tick the parts sum to the node's delta. Only node-counted devices are split
(core inside its package is not split again).

Cardinality: the ``max_cgroups`` cgroups with the most energy keep their own series; the energy of the others in
that tick goes to ``(other)``. A cgroup that vanishes keeps its series for ``retention_s`` so its final value is
scraped, then is forgotten; while remembered, its counters continue where they were.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from carbond.attribution.cgroupfs import CgroupReader, Usage, pid_cgroup
from carbond.attribution.kubernetes import PodDirectory
from carbond.attribution.paths import Identity, identify
from carbond.attribution.split import IDLE, OTHER, UNATTRIBUTED, split, split_cpu
from carbond.model import CgroupState
from carbond.procread import ProcFile, shared
from carbond.sensors.base import Clock
from carbond.units import emissions_g

CPU_KINDS = ("cpu", "psys", "soc")
MEM_KINDS = ("dram", "ram")
USER_HZ = 100


@dataclass(slots=True)
class Sample:
    at: float
    busy_jiffies: int
    total_jiffies: int
    mem_used_bytes: float
    usage: dict[Identity, Usage]
    pid_groups: dict[int, Identity]


@dataclass(slots=True)
class _Cg:
    ident: Identity
    energy: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)
    emissions: float = 0.0
    rank: float = 0.0  # all energy attributed to it, exported or folded into (other): the ranking key
    seen_at: float = 0.0
    last: Usage | None = None


def _proc_stat(stat: ProcFile) -> tuple[int, int]:
    """Busy and total jiffies of all CPUs, from the first line of /proc/stat."""
    fields = [int(x) for x in stat.read().split(b"\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _mem_used(meminfo: ProcFile) -> float:
    """MemTotal - MemAvailable (else MemFree), in bytes, from the head of /proc/meminfo."""
    info = {}
    for line in meminfo.read().split(b"\n")[:3]:
        key, _, rest = line.partition(b":")
        if rest.strip():
            info[key] = int(rest.split()[0]) * 1024
    return float(info.get(b"MemTotal", 0) - info.get(b"MemAvailable", info.get(b"MemFree", 0)))


class Attributor:
    def __init__(
        self,
        cgroupfs: Path,
        procfs: Path,
        *,
        max_cgroups: int = 200,
        retention_s: float = 300.0,
        clock: Clock = time.monotonic,
        pods: PodDirectory | None = None,
    ) -> None:
        self.reader = CgroupReader(cgroupfs)
        self.pods = pods
        self._procfs = procfs
        self._stat = shared(procfs / "stat", 512)  # read once per tick with the TDP model's
        self._meminfo = ProcFile(procfs / "meminfo", 256)
        self._max = max_cgroups
        self._retention = retention_s
        self._clock = clock
        self._cgroups: dict[str, _Cg] = {}
        self._pseudo = {name: _Cg(Identity(name)) for name in (IDLE, UNATTRIBUTED, OTHER)}
        self._prev: Sample | None = None
        self._top: set[str] = set()

    def sample(self, gpu_pids: Sequence[int] = ()) -> Sample:
        """Read everything one tick needs (blocking IO: run it in a thread)."""
        busy, total = _proc_stat(self._stat)
        pid_groups = {}
        for pid in gpu_pids:
            path = pid_cgroup(self._procfs, pid)
            if path is not None:
                pid_groups[pid] = identify(path)
        usage = self.reader.read_all()
        mem_used = _mem_used(self._meminfo) if usage else 0.0  # the capacity memory shares need; none without cgroups
        return Sample(self._clock(), busy, total, mem_used, usage, pid_groups)

    def _workload_of(self, ident: Identity, known: Mapping[str, Identity]) -> Identity | None:
        """The tracked workload a process's cgroup belongs to (itself or an ancestor)."""
        path = ident.cgroup
        while path:
            if path in known:
                return known[path]
            path = path.rpartition("/")[0]
        return None

    def account(
        self,
        now: Sample,
        deltas: Mapping[str, float],
        interval_s: float,
        pue: float,
        g_per_kwh: float | None,
        gpu_shares: Mapping[str, Mapping[int, float]] | None = None,
        gpu_deltas: Mapping[str, float] | None = None,
    ) -> tuple[CgroupState, ...]:
        """Split this tick's per-kind energy ``deltas`` (node-counted devices only) and publish the states."""
        prev, self._prev = self._prev, now
        parts_by_kind: dict[str, dict[str, float]] = {}
        if prev is not None:
            elapsed = max(now.at - prev.at, 1e-9)
            d_busy = max(now.busy_jiffies - prev.busy_jiffies, 0)
            d_total = max(now.total_jiffies - prev.total_jiffies, 0)
            busy_share = d_busy / d_total if d_total else 0.0
            cpu_usec = {}
            for ident, u in now.usage.items():
                before = prev.usage.get(ident)
                if before is not None and u.cpu_usec >= before.cpu_usec:
                    cpu_usec[ident.cgroup] = u.cpu_usec - before.cpu_usec
            mem = {ident.cgroup: u.memory_bytes for ident, u in now.usage.items()}
            for kind, delta in deltas.items():
                if kind in CPU_KINDS:
                    parts_by_kind[kind] = split_cpu(delta, busy_share, cpu_usec, d_busy * 1e6 / USER_HZ)
                elif kind in MEM_KINDS:
                    parts_by_kind[kind] = split(delta, mem, now.mem_used_bytes)
            known = {ident.cgroup: ident for ident in now.usage}
            gpu_parts: dict[str, float] = {}
            for device, delta in (gpu_deltas or {}).items():
                weights: dict[str, float] = {}
                for pid, share in (gpu_shares or {}).get(device, {}).items():
                    proc_group = now.pid_groups.get(pid)
                    owner = self._workload_of(proc_group, known) if proc_group else None
                    if owner is not None:
                        weights[owner.cgroup] = weights.get(owner.cgroup, 0.0) + share
                for key, j in split(delta, weights, 1.0).items():
                    gpu_parts[key] = gpu_parts.get(key, 0.0) + j
            if gpu_deltas:
                parts_by_kind["gpu"] = gpu_parts
            self._fold(now, parts_by_kind, elapsed, pue, g_per_kwh)
        return self._publish(now.at)

    def account_unread(
        self,
        deltas: Mapping[str, float],
        interval_s: float,
        pue: float,
        g_per_kwh: float | None,
        gpu_deltas: Mapping[str, float] | None = None,
    ) -> tuple[CgroupState, ...]:
        """A tick whose cgroups could not be read: its energy goes to ``(unattributed)``, so the cgroup series still
        sum to the node's energy; the next good sample measures CPU time from the last good one."""
        parts: dict[str, dict[str, float]] = {
            kind: {UNATTRIBUTED: delta} for kind, delta in deltas.items() if kind in CPU_KINDS + MEM_KINDS
        }
        if gpu_deltas:
            parts["gpu"] = {UNATTRIBUTED: sum(gpu_deltas.values())}
        at = self._clock()
        self._fold(Sample(at, 0, 0, 0.0, {}, {}), parts, interval_s, pue, g_per_kwh)
        return self._publish(at)

    def _fold(
        self,
        now: Sample,
        parts_by_kind: Mapping[str, Mapping[str, float]],
        elapsed: float,
        pue: float,
        g_per_kwh: float | None,
    ) -> None:
        cgroups, pseudo = self._cgroups, self._pseudo
        at = now.at
        for ident in now.usage:
            cg = cgroups.get(ident.cgroup)
            if cg is None:
                cg = cgroups[ident.cgroup] = _Cg(ident)
            cg.seen_at = at
        ranked = sorted(cgroups.values(), key=lambda c: c.rank, reverse=True)
        top = {c.ident.cgroup for c in ranked[: self._max]}
        for cg in (*cgroups.values(), *pseudo.values()):
            if cg.power:
                cg.power = {}
        other = pseudo[OTHER]
        g_per_j = emissions_g(1.0, pue, g_per_kwh) if g_per_kwh is not None else 0.0
        for kind, parts in parts_by_kind.items():
            for key, joules in parts.items():
                target = pseudo.get(key)
                if target is None:
                    cg = cgroups.get(key)
                    if cg is not None:
                        cg.rank += joules
                    # outside the top its own counters pause (and continue, never backwards, if it comes back)
                    target = cg if cg is not None and key in top else other
                energy, power = target.energy, target.power
                energy[kind] = energy.get(kind, 0.0) + joules
                power[kind] = power.get(kind, 0.0) + joules / elapsed
                target.emissions += joules * g_per_j
        expired = [k for k, c in self._cgroups.items() if now.at - c.seen_at > self._retention]
        for key in expired:
            del self._cgroups[key]
        self._top = top

    def _publish(self, at: float) -> tuple[CgroupState, ...]:
        out = []
        top = self._top
        for cg in (*(self._cgroups[k] for k in sorted(top) if k in self._cgroups), *self._pseudo.values()):
            if not cg.energy:
                continue
            live = cg.seen_at == at or cg.ident.cgroup in self._pseudo
            ns = name = cname = ""
            if self.pods is not None and cg.ident.pod_uid:
                ns, name, cname = self.pods.lookup(cg.ident.pod_uid, cg.ident.container_id)
            out.append(
                CgroupState(
                    cgroup=cg.ident.cgroup,
                    unit=cg.ident.unit,
                    pod_uid=cg.ident.pod_uid,
                    container_id=cg.ident.container_id,
                    pod_namespace=ns,
                    pod_name=name,
                    container_name=cname,
                    kinds=tuple((k, cg.power.get(k) if live else None, e) for k, e in sorted(cg.energy.items())),
                    emissions_g_total=cg.emissions,
                )
            )
        return tuple(out)
