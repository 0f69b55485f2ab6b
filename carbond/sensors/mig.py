"""NVIDIA MIG (Multi-Instance GPU): the physical GPU's measured energy apportioned over its MIG devices.

What is measured: NVML reports energy and power for the physical GPU only (a MIG device handle answers
NotSupported), so the parent ``gpu-<N>`` stays the measured device, counted in the node. What is apportioned: each
tick the parent's energy delta is split over its MIG devices (compute instances), published as devices of kind
``gpu_mig`` named ``gpu-<N>-mig-gi<G>-ci<C>``, plus ``gpu-<N>-mig-unallocated`` for slices no MIG device holds.
They are not node-counted (``in_node_total`` False) and not measured (``measured`` False): a sum by kind never
counts a joule twice, and embodied emissions stay on the parent (kind ``gpu``) alone.

Weights: by utilisation where NVML gives it per instance, which is GPM on Hopper and later
(``nvmlGpmMigSampleGet`` per GPU instance, ``NVML_GPM_METRIC_SM_UTIL`` between two ticks' samples, relative to the
instance's own SMs): a MIG device weighs its compute slices x its GPU instance's SM utilisation, and unallocated
slices weigh nothing. Otherwise (Ampere has no per-instance utilisation: ``nvmlDeviceGetUtilizationRates`` and
``nvmlDeviceGetProcessUtilization`` answer NotSupported in MIG mode; or GPM fails) and in a tick where every
instance was idle, by slices: each MIG device's compute slices out of the GPU's (``nvmlDeviceGetMaxMigDeviceCount``,
7 on A100/H100), the rest to ``unallocated``. A GPM failure logs one line when weights fall back to slices and one
when utilisation returns.

Exactness across reconfiguration: a tick's delta goes only to the MIG devices published in the previous tick and
still present (a device's first reading is its baseline, and a destroyed one publishes nothing more), and to
``unallocated``; so the parts sum to the parent's delta in every tick. Each device's joules only grow, for the life
of the sensor, also when an instance is destroyed and created again under the same ids.

Processes: a MIG device handle lists its own processes (``nvmlDeviceGetComputeRunningProcesses``); each gets its
device's share of the tick times its share within the device, keyed by the parent GPU as attribution expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from carbond.logs import get_logger
from carbond.model import DeviceInfo, Kind, Reading

log = get_logger("carbond.sensors.mig")


#: The kind of apportioned MIG devices: a kind of their own, never node-counted.
MIG_KIND: Kind = "gpu_mig"
UNALLOCATED = "unallocated"
SLICES, UTILISATION = "slices", "utilisation"


class MetricUnavailable(Exception):
    """GPM computed no value for a metric (its ``nvmlReturn``), though the samples were taken."""


@dataclass(slots=True)
class MigDevice:
    """One MIG device (a compute instance inside a GPU instance)."""

    name: str  # gpu-<N>-mig-gi<G>-ci<C>
    gi: int
    ci: int
    uuid: str  # MIG-...
    profile: str  # 1g.10gb
    model: str  # NVML's name of the MIG device: "<parent model> MIG <profile>"
    slices: int  # compute slices
    handle: Any


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def apportion(delta_j: float, weights: Mapping[str, float], rest: str) -> dict[str, float]:
    """``delta_j`` in proportion to ``weights``; parts sum to ``delta_j`` (the rounding goes to the largest part);
    with no positive weight, all of it to ``rest``."""
    positive = {k: w for k, w in weights.items() if w > 0}
    total = math.fsum(positive.values())
    if total <= 0:
        return {rest: delta_j}
    largest = max(positive, key=positive.__getitem__)
    parts = {k: delta_j * w / total for k, w in positive.items() if k != largest}
    parts[largest] = delta_j - math.fsum(parts.values())
    return parts


def weights(
    devices: list[MigDevice], total_slices: int, util: Mapping[int, float] | None, rest: str
) -> tuple[dict[str, float], str]:
    """Each device's weight and how they were found: utilisation x slices where every device's GPU instance has a
    utilisation and one is busy, else slices (the GPU's slices no device holds to ``rest``)."""
    if util is not None and all(d.gi in util for d in devices):
        busy = {d.name: d.slices * max(util[d.gi], 0.0) for d in devices}
        if math.fsum(busy.values()) > 0:
            return busy, UTILISATION
    out = {d.name: float(d.slices) for d in devices}
    out[rest] = float(max(total_slices - sum(d.slices for d in devices), 0))
    return out, SLICES


class MigGpu:
    """The MIG devices of one physical GPU, their apportioned energy, and their processes."""

    def __init__(self, parent: str, parent_model: str) -> None:
        self.parent = parent
        self.parent_model = parent_model
        self.rest = f"{parent}-mig-{UNALLOCATED}"
        self.enabled = False
        self.devices: dict[str, MigDevice] = {}
        self.total_slices = 0
        self.joules: dict[str, float] = {}  # by device name, for the life of the sensor: only ever grows
        self.emitted: set[str] = set()  # published in the previous tick
        self.last_parent_j: float | None = None
        self.fractions: dict[str, float] = {}  # this tick's share of each device
        self.method = SLICES
        self._gpm: bool | None = None  # None: not asked yet; False: the GPU has no GPM
        self._samples: dict[int, Any] = {}  # GPU instance id -> its last GPM sample
        self._gpm_reason = ""  # why utilisation is unavailable ("" while it works)
        self._scan_reason = ""

    # ---- NVML ----------------------------------------------------------------------------------------------------

    def _scan(self, nv: ModuleType, handle: Any) -> None:
        """The MIG devices now; on an NVML error the previous ones are kept (one log line until it works again)."""
        try:
            count = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
            found: dict[str, MigDevice] = {}
            for index in range(count):
                try:
                    h = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
                except nv.NVMLError_NotFound:  # an empty slot
                    continue
                found_dev = self._describe(nv, h)
                found[found_dev.name] = found_dev
        except nv.NVMLError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self._scan_reason:
                log.warning("mig_devices_unreadable", device=self.parent, error=reason, kept=len(self.devices))
            self._scan_reason = reason
            return
        if self._scan_reason:
            log.info("mig_devices_readable", device=self.parent)
            self._scan_reason = ""
        for name in found.keys() - self.devices.keys():
            d = found[name]
            log.info("mig_device_found", device=name, parent=self.parent, profile=d.profile, uuid=d.uuid)
        for name in self.devices.keys() - found.keys():
            log.info("mig_device_gone", device=name, parent=self.parent)
        self.devices = found
        self.total_slices = max(count, sum(d.slices for d in found.values()))

    def _describe(self, nv: ModuleType, h: Any) -> MigDevice:
        gi = int(nv.nvmlDeviceGetGpuInstanceId(h))
        ci = int(nv.nvmlDeviceGetComputeInstanceId(h))
        uuid = _text(nv.nvmlDeviceGetUUID(h))
        name = f"{self.parent}-mig-gi{gi}-ci{ci}"
        known = self.devices.get(name)
        if known is not None and known.uuid == uuid:
            known.handle = h
            return known
        model = _text(nv.nvmlDeviceGetName(h))
        attrs = nv.nvmlDeviceGetAttributes_v2(h)
        slices = max(int(attrs.computeInstanceSliceCount), 1)
        if " MIG " in model:
            profile = model.rpartition(" MIG ")[2]
        else:  # nvidia-smi's naming: <GI slices>g.<GB>gb, prefixed by <CI slices>c. for a partial compute instance
            gb = round(int(attrs.memorySizeMB) / 1024)
            gi_slices = int(attrs.gpuInstanceSliceCount)
            profile = (f"{slices}c." if slices < gi_slices else "") + f"{gi_slices}g.{gb}gb"
        return MigDevice(name, gi, ci, uuid, profile, model, slices, h)

    def _sm_util(self, nv: ModuleType, handle: Any, gi: int) -> float | None:
        """The GPU instance's SM utilisation (0..1) since its previous sample; None at its first sample."""
        sample = nv.nvmlGpmSampleAlloc()
        try:
            nv.nvmlGpmMigSampleGet(handle, gi, sample)
        except nv.NVMLError:
            nv.nvmlGpmSampleFree(sample)
            raise
        prev, self._samples[gi] = self._samples.get(gi), sample
        if prev is None:
            return None
        try:
            get = nv.c_nvmlGpmMetricsGet_t()
            get.version = nv.NVML_GPM_METRICS_GET_VERSION
            get.numMetrics = 1
            get.sample1, get.sample2 = prev, sample
            get.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            nv.nvmlGpmMetricsGet(get)
            metric = get.metrics[0]
            if metric.nvmlReturn != nv.NVML_SUCCESS:
                raise MetricUnavailable(f"SM utilisation of GPU instance {gi}: {nv.NVMLError(metric.nvmlReturn)}")
            return min(max(float(metric.value) / 100.0, 0.0), 1.0)
        finally:
            nv.nvmlGpmSampleFree(prev)

    def _utilisation(self, nv: ModuleType, handle: Any) -> dict[int, float] | None:
        """SM utilisation by GPU instance through GPM; None (weights by slices) where NVML gives none."""
        if self._gpm is False:
            return None
        out: dict[int, float] = {}
        try:
            if self._gpm is None:
                self._gpm = bool(nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
                if not self._gpm:
                    self._util_unavailable("GPM not supported (before Hopper): no per-instance utilisation", False)
                    return None
            for gi in sorted({d.gi for d in self.devices.values()}):
                value = self._sm_util(nv, handle, gi)
                if value is not None:
                    out[gi] = value
        except MetricUnavailable as exc:  # this metric, this time: asked again next tick
            self._util_unavailable(str(exc), True)
            return None
        except nv.NVMLError as exc:
            if isinstance(exc, nv.NVMLError_NotSupported):  # the GPU cannot: not asked again
                self._gpm = False
            self._util_unavailable(f"{type(exc).__name__}: {exc}", True)
            return None
        for gi in self._samples.keys() - {d.gi for d in self.devices.values()}:  # instances gone: free theirs
            nv.nvmlGpmSampleFree(self._samples.pop(gi))
        if self._gpm_reason:
            log.info("mig_weights_by_utilisation", device=self.parent)
            self._gpm_reason = ""
        return out

    def _util_unavailable(self, reason: str, failed: bool) -> None:
        """One log line when the weights fall back to slices: a warning for a failing call, info for a GPU that
        has no GPM at all (every Ampere MIG GPU)."""
        if reason != self._gpm_reason:
            (log.warning if failed else log.info)("mig_weights_by_slices", device=self.parent, reason=reason)
        self._gpm_reason = reason

    # ---- per tick ------------------------------------------------------------------------------------------------

    def advance(
        self, nv: ModuleType, handle: Any, parent_j: float, at: float, baseline: bool, enabled: bool
    ) -> list[Reading]:
        """Split the parent's energy since the previous call over the MIG devices; their readings (none while MIG
        is disabled)."""
        last, self.last_parent_j = self.last_parent_j, parent_j
        delta = parent_j - last if last is not None and not baseline else 0.0
        self.enabled = enabled
        if not enabled:
            self.devices, self.emitted, self.fractions = {}, set(), {}
            return []
        self._scan(nv, handle)
        util = self._utilisation(nv, handle)
        stable = [d for name, d in sorted(self.devices.items()) if name in self.emitted]
        w, self.method = weights(stable, self.total_slices, util, self.rest)
        parts = apportion(max(delta, 0.0), w, self.rest)
        total_w = math.fsum(v for v in w.values() if v > 0)
        if delta > 0:
            self.fractions = {k: j / delta for k, j in parts.items()}
        else:
            self.fractions = {k: v / total_w for k, v in w.items() if v > 0} if total_w > 0 else {self.rest: 1.0}
        for name, j in parts.items():
            self.joules[name] = self.joules.get(name, 0.0) + j
        names = [*sorted(self.devices), self.rest]
        self.emitted = set(names)
        return [Reading(n, MIG_KIND, self.joules.get(n, 0.0), at, measured=False, in_node_total=False) for n in names]

    def device_info(self, sensor: str) -> list[DeviceInfo]:
        if not self.enabled:
            return []
        method = f"apportioned by {self.method}"
        out = [
            DeviceInfo(
                d.name,
                d.model,
                d.uuid,
                sensor,
                method,
                f"parent={self.parent} gi={d.gi} ci={d.ci} profile={d.profile} slices={d.slices}/{self.total_slices}",
            )
            for _, d in sorted(self.devices.items())
        ]
        free = max(self.total_slices - sum(d.slices for d in self.devices.values()), 0)
        detail = f"parent={self.parent} slices={free}/{self.total_slices}"
        out.append(DeviceInfo(self.rest, f"{self.parent_model} MIG unallocated", "", sensor, method, detail))
        return out

    def process_shares(self, nv: ModuleType, split: Callable[[Any], dict[int, float]]) -> dict[int, float]:
        """Each process's share of the parent's energy this tick: its device's share x its share within it
        (``split``: a device handle -> its processes' shares). A device whose processes cannot be listed leaves
        its share unattributed."""
        out: dict[int, float] = {}
        for name, fraction in self.fractions.items():
            d = self.devices.get(name)
            if d is None or fraction <= 0:
                continue
            try:
                within = split(d.handle)
            except nv.NVMLError as exc:
                log.debug("mig_processes_unreadable", device=name, error=f"{type(exc).__name__}: {exc}")
                continue
            for pid, share in within.items():
                out[pid] = out.get(pid, 0.0) + fraction * share
        return out
