"""Per-tick attribution of the node's energy to cgroups, with bounded series and retention.

Each tick: CPU-like energy (cpu, psys, soc) is split into ``(idle)`` by the node's idle share (``/proc/stat``) and
active energy shared by the cgroups' CPU-time deltas; DRAM/RAM energy by memory in use; GPU energy by the GPU
sensors' per-process shares mapped to cgroups through ``/proc/<pid>/cgroup``, also from inside a cgroup namespace
(:mod:`carbond.attribution.pidcgroups`). What no cgroup accounts for is ``(unattributed)``. For every kind and tick
the parts sum to the node's delta. ``other`` (platform minus components, :mod:`carbond.accounting`) follows each
cgroup's share of the components' energy in the tick. Only node-counted devices are split (core inside its package
is not split again).

Slurm: a job step is a workload like a container (:mod:`carbond.attribution.paths`); with a spool
(:class:`carbond.slurm.spool.SlurmSpool`, re-read in :meth:`Attributor.sample`) its series carry the job's user,
account and partition. Metadata arriving after a step's cgroup relabels the step's series once.

Cardinality: at ``pod`` or ``namespace`` granularity the workloads' parts are first added up into one key per pod,
or per namespace and copied labels (:mod:`carbond.attribution.labels`); what follows holds for those keys as for
cgroups. The ``max_cgroups`` cgroups with the most energy keep their own series; the energy of the others in
that tick goes to ``(other)``. A cgroup that vanishes keeps its series for ``retention_s`` so its final value is
scraped, then is forgotten; while remembered, its counters continue where they were.

Cost: the cgroup counter files are re-read through kept descriptors (bounded: :mod:`carbond.keptfiles`),
closed by :meth:`Attributor.close`. Per cgroup and tick the work is a few dict operations and one CgroupState; what
does not change (identities, labels, the sorted order of the published cgroups) is kept from tick to tick.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from carbond.accounting import TickEnergy
from carbond.attribution.cgroupfs import CgroupReader
from carbond.attribution.kubernetes import PodDirectory
from carbond.attribution.labels import DEFAULT_POLICY, Granularity, LabelPolicy, pod_cgroup, top_slice
from carbond.attribution.paths import Identity, identify, job_cgroup
from carbond.attribution.pidcgroups import PidCgroups
from carbond.attribution.split import IDLE, OTHER, UNATTRIBUTED, split, split_cpu
from carbond.model import NO_LABELS, CgroupLabels, CgroupState, ProcessShares
from carbond.procfs import USER_HZ, HostSample
from carbond.sensors.base import Clock
from carbond.slurm.spool import SlurmSpool
from carbond.units import emissions_g

MAX_CGROUPS = 200  # defaults of attribution.max_cgroups and attribution.retention_secs
RETENTION_S = 300.0
CPU_KINDS = ("cpu", "psys", "soc")
MEM_KINDS = ("dram", "ram")
_NONE: Mapping[str, float] = MappingProxyType({})


@dataclass(slots=True)
class Sample:
    at: float
    busy_jiffies: int
    total_jiffies: int
    mem_used_bytes: float
    cpu_usec: dict[str, float]  # by cgroup path: every workload read this tick
    memory: dict[str, float]  # bytes in use, by cgroup path
    pid_groups: dict[int, str]  # a GPU process's cgroup path


@dataclass(slots=True)
class _Cg:
    ident: Identity  # its cgroup is the published one (for an aggregate: the pod's cgroup, "namespace/<ns>" ...)
    labels: CgroupLabels = NO_LABELS
    energy: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)  # pseudo-cgroups only: a cgroup's power is its parts
    emissions: float = 0.0
    rank: float = 0.0  # all energy attributed to it, exported or folded into (other): the ranking key
    kinds: tuple[str, ...] = ()  # the kinds of ``energy``, sorted: the order they are published in


def _split_other(
    other_j: float,
    parts_by_kind: Mapping[str, Mapping[str, float]],
    busy_share: float,
    cpu_usec: Mapping[str, float],
    d_busy: int,
) -> dict[str, float]:
    """``other`` (platform minus components) in proportion to each cgroup's share of the components' energy this
    tick, ``(idle)`` and ``(unattributed)`` included; with no component energy, by the CPU rule."""
    weights: dict[str, float] = {}
    for parts in parts_by_kind.values():
        for key, j in parts.items():
            weights[key] = weights.get(key, 0.0) + j
    total = sum(weights.values())
    if total > 0:
        return split(other_j, weights, total)
    return split_cpu(other_j, busy_share, cpu_usec, d_busy * 1e6 / USER_HZ)


def _rank(item: tuple[str, _Cg]) -> float:
    """(key, cgroup) by the cgroup's rank."""
    return item[1].rank


def _workload_of(path: str, known: Mapping[str, float]) -> str | None:
    """The tracked workload a process's cgroup belongs to (itself or an ancestor)."""
    while path:
        if path in known:
            return path
        path = path.rpartition("/")[0]
    return None


class Attributor:
    """``max_fds`` caps the cgroup file descriptors kept open between ticks (see :mod:`carbond.keptfiles`);
    ``close()`` closes them."""

    def __init__(
        self,
        cgroupfs: Path,
        procfs: Path,
        *,
        max_cgroups: int = MAX_CGROUPS,
        retention_s: float = RETENTION_S,
        clock: Clock = time.monotonic,
        pods: PodDirectory | None = None,
        max_fds: int | None = None,
        granularity: Granularity = "container",
        policy: LabelPolicy = DEFAULT_POLICY,
        slurm: SlurmSpool | None = None,
    ) -> None:
        self.reader = CgroupReader(cgroupfs, max_fds=max_fds)
        self.pods = pods
        self.pid_cgroups = PidCgroups(procfs, self.reader.hierarchy, self.reader.version)
        self._max = max_cgroups
        self._retention = retention_s
        self._clock = clock
        self._cgroups: dict[str, _Cg] = {}
        self._gone: dict[str, float] = {}  # cgroups missing from the samples since: when last seen, oldest first
        self._last_at = 0.0
        self._granularity = granularity
        self._policy = policy
        self.slurm = slurm
        self._slurm_generation = 0
        self._keys: dict[str, tuple[str, Identity, CgroupLabels]] = {}  # path -> its series key (pod, namespace)
        self._keys_generation = -1
        self._described: Mapping[str, tuple[Identity, CgroupLabels]] = {}  # this tick's keys (pod, namespace)
        self._pseudo = {name: _Cg(Identity(name), policy.empty()) for name in (IDLE, UNATTRIBUTED, OTHER)}
        self._prev: Sample | None = None
        self._top: set[str] | None = None  # None: every cgroup
        self._order: list[str] | None = None  # the published cgroups, sorted; None when to be sorted again
        self._parts: Mapping[str, Mapping[str, float]] = {}
        self._elapsed = 1.0

    def close(self) -> None:
        """Close the kept cgroup descriptors (on shutdown)."""
        self.reader.close()

    def sample(self, host: HostSample, gpu_pids: Sequence[int] = ()) -> Sample:
        """Read everything one tick needs besides ``host`` (blocking IO for thousands of cgroups: run it in a
        thread then)."""
        busy, total = host.cpu
        if self.slurm is not None:
            self.slurm.refresh()
        cpu, memory = self.reader.read_all()
        pid_groups = {}
        for pid in gpu_pids:
            path = self.pid_cgroups.of_pid(pid, cpu)
            if path is not None:
                pid_groups[pid] = path
        mem_used = host.mem_used_bytes if cpu else 0.0  # the capacity memory shares need; none without cgroups
        return Sample(self._clock(), busy, total, mem_used, cpu, memory, pid_groups)

    def account(
        self,
        now: Sample,
        energy: TickEnergy,
        pue: float,
        g_per_kwh: float | None,
        gpu_shares: ProcessShares | None = None,
    ) -> tuple[CgroupState, ...]:
        """Split this tick's energy (node-counted devices only) and publish the states."""
        deltas, gpu_deltas = energy.by_kind, energy.by_gpu
        prev, self._prev = self._prev, now
        parts_by_kind: dict[str, dict[str, float]] = {}
        if self.slurm is not None and self.slurm.generation != self._slurm_generation:
            self._relabel_slurm(self.slurm)
        if prev is not None:
            elapsed = max(now.at - prev.at, 1e-9)
            d_busy = max(now.busy_jiffies - prev.busy_jiffies, 0)
            d_total = max(now.total_jiffies - prev.total_jiffies, 0)
            busy_share = d_busy / d_total if d_total else 0.0
            before = prev.cpu_usec
            cpu_usec = {k: c - b for k, c in now.cpu_usec.items() if (b := before.get(k)) is not None and c >= b}
            for kind, delta in deltas.items():
                if kind in CPU_KINDS:
                    parts_by_kind[kind] = split_cpu(delta, busy_share, cpu_usec, d_busy * 1e6 / USER_HZ)
                elif kind in MEM_KINDS:
                    parts_by_kind[kind] = split(delta, now.memory, now.mem_used_bytes)
            gpu_parts: dict[str, float] = {}
            for device, delta in gpu_deltas.items():
                weights: dict[str, float] = {}
                for pid, share in (gpu_shares or {}).get(device, {}).items():
                    proc_group = now.pid_groups.get(pid)
                    owner = _workload_of(proc_group, now.cpu_usec) if proc_group else None
                    if owner is not None:
                        weights[owner] = weights.get(owner, 0.0) + share
                for key, j in split(delta, weights, 1.0).items():
                    gpu_parts[key] = gpu_parts.get(key, 0.0) + j
            if gpu_deltas:
                parts_by_kind["gpu"] = gpu_parts
            if (other := deltas.get("other")) is not None:
                parts_by_kind["other"] = _split_other(other, parts_by_kind, busy_share, cpu_usec, d_busy)
            present = self._present(now, parts_by_kind)
            self._fold(now, present, parts_by_kind, elapsed, pue, g_per_kwh)
        return self._publish()

    def account_unread(
        self, energy: TickEnergy, interval_s: float, pue: float, g_per_kwh: float | None
    ) -> tuple[CgroupState, ...]:
        """A tick whose cgroups could not be read: its energy goes to ``(unattributed)``, so the cgroup series still
        sum to the node's energy; the next good sample measures CPU time from the last good one."""
        parts: dict[str, dict[str, float]] = {
            kind: {UNATTRIBUTED: delta}
            for kind, delta in energy.by_kind.items()
            if kind in CPU_KINDS + MEM_KINDS or kind == "other"
        }
        if energy.by_gpu:
            parts["gpu"] = {UNATTRIBUTED: sum(energy.by_gpu.values())}
        self._fold(Sample(self._clock(), 0, 0, 0.0, {}, {}, {}), {}, parts, interval_s, pue, g_per_kwh)
        return self._publish()

    def _present(self, now: Sample, parts_by_kind: dict[str, dict[str, float]]) -> Mapping[str, object]:
        """The keys read this tick (at container granularity the cgroups' paths). At pod or namespace granularity
        the parts are added up by key in place, and each key's identity and labels noted for :meth:`_track`."""
        if self._granularity == "container":
            return now.cpu_usec
        keys = self._keys
        generation = self.pods.generation if self.pods is not None else 0
        if generation != self._keys_generation or len(keys) > 4 * len(now.cpu_usec) + 1024:
            keys.clear()  # names or labels changed (or churn left paths behind): every key is worked out again
            self._keys_generation = generation
        present: dict[str, tuple[Identity, CgroupLabels]] = {}
        for path in now.cpu_usec:
            found = keys.get(path)
            if found is None:
                found = keys[path] = self._key_of(path)
            present[found[0]] = found[1:]
        for kind, parts in parts_by_kind.items():
            merged: dict[str, float] = {}
            for path, joules in parts.items():
                k = keys[path][0] if path in keys else path
                merged[k] = merged.get(k, 0.0) + joules
            parts_by_kind[kind] = merged
        self._described = present
        return present

    def _labels(self, ident: Identity) -> CgroupLabels:
        """A workload's labels before any Kubernetes lookup, with its Slurm job's metadata where the spool has it."""
        job = self.slurm.meta(ident.slurm_job_id) if self.slurm is not None and ident.slurm_job_id else None
        return self._policy.labels(ident, job)

    def _relabel_slurm(self, spool: SlurmSpool) -> None:
        """Jobs' metadata arrived or changed: their tracked series take it (a job forgotten keeps its labels)."""
        self._slurm_generation = spool.generation
        self._keys.clear()
        for cg in self._cgroups.values():
            if cg.ident.slurm_job_id and spool.meta(cg.ident.slurm_job_id) is not None:
                cg.labels = self._labels(cg.ident)

    def _key_of(self, path: str) -> tuple[str, Identity, CgroupLabels]:
        """A workload's series key at pod or namespace granularity, with the identity and labels it publishes."""
        ident, policy = identify(path), self._policy
        if ident.slurm_job_id and self._granularity == "pod":  # a job's steps add up, as a pod's containers do
            job = Identity(job_cgroup(ident), slurm_job_id=ident.slurm_job_id, slurm_uid=ident.slurm_uid)
            return job.cgroup, job, self._labels(job)
        if ident.pod_uid:
            if self._granularity == "pod":
                pod = Identity(pod_cgroup(path, ident), pod_uid=ident.pod_uid)
                return pod.cgroup, pod, policy.labels(pod)
            meta = self.pods.meta(ident.pod_uid) if self.pods is not None else None
            if meta is None:
                return "\0kubepods", Identity("kubepods"), policy.empty()
            labels = policy.empty()._replace(
                pod_namespace=meta.namespace, team=meta.team, project=meta.project, extra=meta.extra
            )
            key = "\0".join(("\0ns", meta.namespace, meta.team, meta.project, *(v for _, v in meta.extra)))
            return key, Identity(f"namespace/{meta.namespace}"), labels
        if self._granularity == "pod":
            return path, ident, self._labels(ident)
        team, project = policy.for_unit(ident.unit)
        top = top_slice(path)
        labels = policy.empty()._replace(team=team, project=project)
        return "\0".join(("\0slice", top, team, project)), Identity(top), labels

    def _track(self, now: Sample, present: Mapping[str, object]) -> bool:
        """Register new cgroups and note the vanished; True when the set of cgroups changed."""
        cgroups, gone, described_by = self._cgroups, self._gone, self._described
        new = present.keys() - cgroups.keys()
        for key in new:
            described = described_by.get(key)
            if described is None:
                ident = identify(key)
                cgroups[key] = _Cg(ident, self._labels(ident))
            else:
                cgroups[key] = _Cg(*described)
        if gone:
            for key in gone.keys() & present.keys():  # back before being forgotten
                del gone[key]
        if len(cgroups) != len(present) + len(gone):  # every other cgroup was in the previous sample
            for key in cgroups.keys() - present.keys() - gone.keys():
                gone[key] = self._last_at
        self._last_at = now.at
        return bool(new)

    def _fold(
        self,
        now: Sample,
        present: Mapping[str, object],
        parts_by_kind: Mapping[str, Mapping[str, float]],
        elapsed: float,
        pue: float,
        g_per_kwh: float | None,
    ) -> None:
        cgroups, pseudo = self._cgroups, self._pseudo
        changed = self._track(now, present)
        top: set[str] | None = None
        if len(cgroups) > self._max:
            ranked = sorted(cgroups.items(), key=_rank, reverse=True)[: self._max]
            top = {key for key, _ in ranked}  # keys, not cgroups: an aggregate's key is not its cgroup label
        for p in pseudo.values():
            p.power = {}
        other = pseudo[OTHER]
        g_per_j = emissions_g(1.0, pue, g_per_kwh) if g_per_kwh is not None else 0.0
        for kind, parts in parts_by_kind.items():
            for key, joules in parts.items():
                cg = cgroups.get(key)
                if cg is not None:
                    cg.rank += joules
                    if top is None or key in top:
                        energy = cg.energy
                        if kind in energy:
                            energy[kind] += joules
                        else:
                            energy[kind] = joules
                            cg.kinds = tuple(sorted(energy))
                        cg.emissions += joules * g_per_j
                        continue
                    # outside the top its own counters pause (and continue, never backwards, if it comes back)
                    target = other
                else:
                    target = pseudo.get(key, other)
                energy, power = target.energy, target.power
                energy[kind] = energy.get(kind, 0.0) + joules
                power[kind] = power.get(kind, 0.0) + joules / elapsed
                target.emissions += joules * g_per_j
        gone, expired = self._gone, []
        for key, seen in gone.items():  # oldest first
            if now.at - seen <= self._retention:
                break
            expired.append(key)
        for key in expired:
            del gone[key], cgroups[key]
        if changed or expired or top != self._top:
            self._order = None
        self._top, self._parts, self._elapsed = top, parts_by_kind, elapsed

    def _publish(self) -> tuple[CgroupState, ...]:
        cgroups, parts, elapsed, pods = self._cgroups, self._parts, self._elapsed, self.pods
        order = self._order
        if order is None:
            top = self._top
            order = self._order = sorted(cgroups if top is None else (k for k in top if k in cgroups))
        out = []
        for key in order:
            cg = cgroups[key]
            if not cg.kinds:
                continue
            energy = cg.energy
            kinds = tuple(
                [(k, None if (j := parts.get(k, _NONE).get(key)) is None else j / elapsed, energy[k]) for k in cg.kinds]
            )
            labels = cg.labels
            if pods is not None and labels.pod_uid and (meta := pods.meta(labels.pod_uid)) is not None:
                labels = labels._replace(
                    pod_namespace=meta.namespace,
                    pod_name=meta.name,
                    container_name=meta.containers.get(labels.container_id, ""),
                    team=meta.team,
                    project=meta.project,
                    extra=meta.extra,
                )
            out.append(CgroupState(cg.ident.cgroup, kinds, cg.emissions, labels))
        for cg in self._pseudo.values():
            if cg.energy:
                kinds = tuple((k, cg.power.get(k), e) for k, e in sorted(cg.energy.items()))
                out.append(CgroupState(cg.ident.cgroup, kinds, cg.emissions, cg.labels))
        return tuple(out)
