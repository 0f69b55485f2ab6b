"""Pure accounting of a job: the daemon's per-device totals, tick by tick, and the job's share of each.

The monitor publishes cumulative per-device energy and emissions (IT energy; emissions = energy x PUE x the
intensity in force at each tick). Each tick the ledger takes the deltas since the previous snapshot and gives the
job its share of each device's delta: CPU-like kinds (cpu, psys, soc) by CPU time, memory kinds (dram, ram) by
memory in use, each GPU by the GPU sensors' per-process shares. The shares are computed by the daemon's own
:func:`carbond.attribution.split.split` / :func:`~carbond.attribution.split.split_cpu`, so a job's figures are
what the daemon would attribute to a cgroup holding exactly the job. Energy and emissions are scaled by the same
share, so their ratio is always the intensity x PUE in force.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from carbond.attribution.attributor import CPU_KINDS, MEM_KINDS
from carbond.attribution.split import split, split_cpu
from carbond.model import DeviceState, Intensity, Snapshot

JOB = "job"


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    """One device's figures over a span: the job's share and the whole machine's (joules of IT energy, grams)."""

    sensor: str
    device: str
    kind: str
    measured: bool
    in_node_total: bool
    energy_j: float
    emissions_g: float
    machine_energy_j: float
    machine_emissions_g: float

    def minus(self, other: DeviceFigures | None) -> DeviceFigures:
        if other is None:
            return self
        return replace(
            self,
            energy_j=self.energy_j - other.energy_j,
            emissions_g=self.emissions_g - other.emissions_g,
            machine_energy_j=self.machine_energy_j - other.machine_energy_j,
            machine_emissions_g=self.machine_emissions_g - other.machine_emissions_g,
        )

    def scaled_by(self, factor: float) -> DeviceFigures:
        return replace(
            self,
            energy_j=self.energy_j * factor,
            emissions_g=self.emissions_g * factor,
            machine_energy_j=self.machine_energy_j * factor,
            machine_emissions_g=self.machine_emissions_g * factor,
        )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Cumulative figures since the measurement started, at one instant."""

    monotonic: float
    wall: float
    devices: tuple[DeviceFigures, ...] = ()
    intensity: Intensity | None = None
    intensity_age_s: float = math.nan
    pue: float = 1.0
    #: node totals where the source gives them directly (a daemon); else the sum of node-counted devices
    node: tuple[float, float, float, float] | None = None  # job J, job g, machine J, machine g
    #: (device, model) of described devices (GPUs)
    device_models: tuple[tuple[str, str], ...] = ()
    #: the whole machine's embodied grams, where the source counts them (a daemon)
    embodied_g: float = 0.0
    #: relative standard uncertainties of energy and emissions (a job's share carries its node's), and the term
    #: that dominates; NaN / "" where the source does not say
    energy_rel_u: float = math.nan
    emissions_rel_u: float = math.nan
    dominant: str = ""

    def node_totals(self) -> tuple[float, float, float, float]:
        if self.node is not None:
            return self.node
        counted = [d for d in self.devices if d.in_node_total]
        return (
            math.fsum(d.energy_j for d in counted),
            math.fsum(d.emissions_g for d in counted),
            math.fsum(d.machine_energy_j for d in counted),
            math.fsum(d.machine_emissions_g for d in counted),
        )

    def since(self, start: Checkpoint) -> Checkpoint:
        """The figures between ``start`` and this checkpoint (a span, as a checkpoint)."""
        before = {(d.sensor, d.device): d for d in start.devices}
        devices = tuple(d.minus(before.get((d.sensor, d.device))) for d in self.devices)
        node = None
        if self.node is not None:
            a, b = self.node, start.node_totals()
            node = (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])
        return replace(self, devices=devices, node=node, embodied_g=self.embodied_g - start.embodied_g)

    def scaled(self, factor: float) -> Checkpoint:
        """Every figure of a span times ``factor`` (a part of a tick interval, when prorating)."""
        devices = tuple(d.scaled_by(factor) for d in self.devices)
        n = self.node
        node = None if n is None else (n[0] * factor, n[1] * factor, n[2] * factor, n[3] * factor)
        return replace(self, devices=devices, node=node, embodied_g=self.embodied_g * factor)

    def plus(self, other: Checkpoint) -> Checkpoint:
        """Two spans added (``other``'s time, intensity and PUE are kept: it is the later one)."""
        mine = {(d.sensor, d.device): d for d in self.devices}
        devices = []
        for d in other.devices:
            same = mine.pop((d.sensor, d.device), None)
            devices.append(d if same is None else d.minus(same.scaled_by(-1.0)))
        devices += mine.values()
        node = None
        if self.node is not None or other.node is not None:
            x, y = self.node_totals(), other.node_totals()
            node = (x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3])
        return replace(other, devices=tuple(devices), node=node, embodied_g=self.embodied_g + other.embodied_g)


@dataclass(frozen=True, slots=True)
class Shares:
    """The job's fraction of each kind's energy over one interval (0..1)."""

    cpu: float = 0.0
    mem: float = 0.0
    gpu: Mapping[str, float] = field(default_factory=dict)

    def of(self, kind: str, device: str) -> float:
        if kind in CPU_KINDS:
            return self.cpu
        if kind in MEM_KINDS:
            return self.mem
        if kind == "gpu":
            return self.gpu.get(device, 0.0)
        return 0.0


NOTHING = Shares()


def shares(
    cpu_usec: float,
    busy_usec: float,
    total_usec: float,
    rss_bytes: float,
    mem_used_bytes: float,
    gpu_process_shares: Mapping[str, Mapping[int, float]],
    pids: frozenset[int],
) -> Shares:
    """The job's shares over one interval, from its CPU time and memory and the machine's, as the daemon splits."""
    busy_share = busy_usec / total_usec if total_usec > 0 else 0.0
    cpu = split_cpu(1.0, busy_share, {JOB: max(cpu_usec, 0.0)}, busy_usec).get(JOB, 0.0)
    mem = split(1.0, {JOB: rss_bytes}, mem_used_bytes).get(JOB, 0.0)
    gpu = {
        device: split(1.0, {JOB: math.fsum(s for pid, s in by_pid.items() if pid in pids)}, 1.0).get(JOB, 0.0)
        for device, by_pid in gpu_process_shares.items()
    }
    return Shares(cpu, mem, gpu)


@dataclass(slots=True)
class _Acc:
    sensor: str
    device: str
    kind: str
    measured: bool
    in_node_total: bool
    last_j: float = 0.0
    last_g: float = 0.0
    job_j: float = 0.0
    job_g: float = 0.0
    machine_j: float = 0.0
    machine_g: float = 0.0


class Ledger:
    """Folds snapshots into cumulative machine and job figures; ``shares=None`` gives the job the whole machine."""

    def __init__(self, started_monotonic: float, started_wall: float, gpus: frozenset[str] | None = None) -> None:
        self._gpus = gpus  # only these GPU devices count (CodeCarbon's gpu_ids); None: all
        self._devices: dict[tuple[str, str], _Acc] = {}
        self._last = Checkpoint(started_monotonic, started_wall)
        self._models: dict[str, str] = {}

    def add(self, snap: Snapshot, job_shares: Shares | None) -> Checkpoint:
        """Fold one snapshot. ``other`` (platform minus components) is shared as the daemon splits it: the job's
        share of the components' energy in this interval."""
        parts_job = parts_machine = 0.0
        others = []
        for dev in snap.devices.states:
            if dev.kind == "gpu" and self._gpus is not None and dev.device not in self._gpus:
                continue
            if dev.kind == "other":
                others.append(dev)
                continue
            share = 1.0 if job_shares is None else min(max(job_shares.of(dev.kind, dev.device), 0.0), 1.0)
            d_j = self._fold(dev, share)
            if dev.in_node_total:
                parts_job += d_j * share
                parts_machine += d_j
        if others:
            other_share = 1.0 if job_shares is None else (parts_job / parts_machine if parts_machine > 0 else 0.0)
            for dev in others:
                self._fold(dev, min(max(other_share, 0.0), 1.0))
        for info in snap.devices.info:
            self._models[info.device] = info.model
        self._last = Checkpoint(
            monotonic=snap.taken_at,
            wall=snap.wall_time,
            devices=tuple(
                DeviceFigures(
                    a.sensor, a.device, a.kind, a.measured, a.in_node_total, a.job_j, a.job_g, a.machine_j, a.machine_g
                )
                for a in self._devices.values()
            ),
            intensity=snap.intensity.value,
            intensity_age_s=snap.intensity.age_s,
            pue=snap.node.pue,
            device_models=tuple(sorted(self._models.items())),
            energy_rel_u=_ratio(snap.node.energy_u_j_total, snap.node.energy_j_total),
            emissions_rel_u=_ratio(snap.node.emissions_u_g_total, snap.node.emissions_g_total),
            dominant=snap.node.uncertainty_dominant,
        )
        return self._last

    def _fold(self, dev: DeviceState, share: float) -> float:
        """Add one device's energy since the last snapshot, ``share`` of it to the job; returns that energy."""
        key = (dev.sensor, dev.device)
        acc = self._devices.get(key)
        if acc is None:  # the monitor starts every device at 0 (no persistence in a job)
            acc = self._devices[key] = _Acc(dev.sensor, dev.device, dev.kind, dev.measured, dev.in_node_total)
        d_j = max(dev.energy_j_total - acc.last_j, 0.0)
        d_g = max(dev.emissions_g_total - acc.last_g, 0.0)
        acc.last_j, acc.last_g = dev.energy_j_total, dev.emissions_g_total
        acc.in_node_total = dev.in_node_total
        acc.machine_j += d_j
        acc.machine_g += d_g
        acc.job_j += d_j * share
        acc.job_g += d_g * share
        return d_j

    @property
    def last(self) -> Checkpoint:
        return self._last


def _ratio(u: float, value: float) -> float:
    return u / value if value > 0 and not math.isnan(u) else math.nan
