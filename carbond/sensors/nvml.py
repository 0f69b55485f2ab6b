"""NVIDIA GPUs through NVML (``pynvml`` from the ``nvidia-ml-py`` package, imported only in :meth:`start`).

- Devices are NVML's physical GPUs (``device="gpu-<NVML index>"``). NVML indices follow PCI order and ignore
  ``CUDA_VISIBLE_DEVICES``, which only renumbers devices inside CUDA programs; select with ``nvml.devices`` by NVML
  index or UUID (``GPU-...``; a ``MIG-...`` UUID selects its parent GPU, reported once).
- MIG: the physical GPU stays the measured device (NVML has no energy or power per MIG instance); its energy is
  apportioned over its MIG devices as devices of kind ``gpu_mig`` (``gpu-<N>-mig-gi<G>-ci<C>``), outside the node
  total, and their processes get their instance's share (:mod:`carbond.sensors.mig`). GPUs without MIG, or with
  it disabled, are read as before.
- Energy from ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta and later). Where it is
  not supported (Pascal and older, many vGPUs) ``nvmlDeviceGetPowerUsage`` (mW) is sampled at
  ``nvml.power_sample_hz`` in the background and integrated (trapezoids), so a GPU without a counter is never
  reported at 0 W.
- A lost GPU (GpuIsLost, Unknown) gives no reading and counts an error while the others go on; it is retried after
  ``nvml.retry_secs``, doubling up to 10 minutes. A missing library or driver makes the sensor unavailable with
  the reason. NVML calls block, so they run in a worker thread, one at a time. ``nvmlShutdown`` on close. The
  start-to-close lifecycle (sampler, worker thread, shutdown) is :class:`carbond.sensors.gpu.GpuLifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Annotated, Any

from pydantic import Field

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import DeviceClass, DeviceDown, DeviceInfo, Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Backend, Clock, Context, Settings
from carbond.sensors.gpu import POWER_SAMPLE_HZ, RETRY_S, GpuLifecycle, PowerIntegrator, next_backoff
from carbond.sensors.mig import MigGpu

log = get_logger("carbond.sensors.nvml")


class NvmlSettings(Settings):
    """The ``nvml`` config section."""

    #: NVML indices or UUIDs; empty: every GPU
    devices: list[Annotated[str, Field(min_length=1)] | Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    power_sample_hz: Annotated[float, Field(ge=0.1, le=100)] = POWER_SAMPLE_HZ
    retry_secs: Annotated[float, Field(ge=1, le=3600)] = RETRY_S


@dataclass(slots=True)
class Gpu:
    index: int
    handle: Any = None
    model: str = ""
    uuid: str = ""
    counter: bool = False
    described: bool = False  # handle, name and UUID known: it can be read
    reason: str = ""  # why it is down
    joules: float = 0.0  # from the energy counter
    last_counter_mj: int | None = None
    power: PowerIntegrator = field(default_factory=PowerIntegrator)  # GPUs without a counter
    down_until: float = 0.0
    backoff_s: float = 0.0
    read_at: float = 0.0
    rebaselined: bool = False
    mig_capable: bool = True  # False once nvmlDeviceGetMigMode says NotSupported (before Ampere)
    mig: MigGpu | None = None  # once MIG has been seen enabled on it


class NvmlSensor:
    name = "nvml"
    inline = False

    def __init__(
        self,
        clock: Clock,
        *,
        devices: Sequence[str | int] = (),
        power_sample_hz: float = POWER_SAMPLE_HZ,
        retry_secs: float = RETRY_S,
        module: ModuleType | None = None,
    ) -> None:
        self._clock = clock
        self._select = [str(d) for d in devices]
        self._retry = retry_secs
        self._nvml = module
        self._life: GpuLifecycle[Gpu] = GpuLifecycle(
            "nvml", "NVML", 1.0 / power_sample_hz, lambda g: self._poll(g, self._clock())
        )
        self._partial_errors = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return self._life.covers

    def device_info(self) -> tuple[DeviceInfo, ...]:
        out = []
        for g in self._life.described():
            out.append(DeviceInfo(f"gpu-{g.index}", g.model, g.uuid, self.name, _method(g.counter)))
            if g.mig is not None:
                out.extend(g.mig.device_info(self.name))
        return tuple(out)

    async def start(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise SensorUnavailable("nvml", "nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
            self._nvml = pynvml
        nv = self._nvml
        try:
            await asyncio.to_thread(nv.nvmlInit)
        except nv.NVMLError as exc:
            raise SensorUnavailable("nvml", f"nvmlInit failed: {exc} ({type(exc).__name__})") from None
        try:
            self._life.gpus = await asyncio.to_thread(self._enumerate)
        except nv.NVMLError as exc:
            await asyncio.to_thread(nv.nvmlShutdown)
            raise SensorUnavailable("nvml", f"cannot enumerate GPUs: {exc}") from None
        if not self._life.gpus:
            await asyncio.to_thread(nv.nvmlShutdown)
            raise SensorUnavailable("nvml", "NVML found no GPU" + (f" matching {self._select}" if self._select else ""))
        for g in self._life.gpus:
            if g.described:
                self._found(g)
        self._life.sample_power_only()

    def _found(self, g: Gpu) -> None:
        log.info("gpu_found", device=f"gpu-{g.index}", model=g.model, uuid=g.uuid, method=_method(g.counter))

    def _describe(self, g: Gpu) -> None:
        """Handle, name, UUID and energy method of one GPU; NVMLError (e.g. GpuIsLost) when it cannot be read."""
        nv = self._nvml
        assert nv is not None
        h = nv.nvmlDeviceGetHandleByIndex(g.index)
        name = nv.nvmlDeviceGetName(h)
        uuid = nv.nvmlDeviceGetUUID(h)
        try:
            nv.nvmlDeviceGetTotalEnergyConsumption(h)
            counter = True
        except nv.NVMLError_NotSupported:
            counter = False
        g.handle, g.counter, g.described = h, counter, True
        g.model = name.decode() if isinstance(name, bytes) else name
        g.uuid = uuid.decode() if isinstance(uuid, bytes) else uuid

    def _enumerate(self) -> list[Gpu]:
        """Every selected GPU, each described on its own: one that fails (lost, off the bus) is down and retried
        with backoff while the others are measured."""
        nv = self._nvml
        assert nv is not None
        wanted: set[int] | None = None
        if self._select:
            wanted = set()
            for sel in self._select:
                if sel.isdigit():
                    wanted.add(int(sel))
                    continue
                handle = nv.nvmlDeviceGetHandleByUUID(sel)
                if sel.startswith("MIG-"):
                    handle = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
                wanted.add(self._index_of(handle))
        gpus = []
        now = self._clock()
        for i in range(nv.nvmlDeviceGetCount()):
            if wanted is not None and i not in wanted:
                continue
            g = Gpu(i)
            try:
                self._describe(g)
            except nv.NVMLError as exc:
                self._lost(g, exc, now)
            gpus.append(g)
        return gpus

    def _index_of(self, handle: Any) -> int:
        nv = self._nvml
        assert nv is not None
        uuid = nv.nvmlDeviceGetUUID(handle)
        for i in range(nv.nvmlDeviceGetCount()):
            with contextlib.suppress(nv.NVMLError):  # a lost GPU is not the one asked for by a readable UUID
                if nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)) == uuid:
                    return i
        raise nv.NVMLError(nv.NVML_ERROR_NOT_FOUND)

    def _shares(self, handle: Any) -> dict[int, float]:
        """Each running compute process's share of a GPU or MIG device: SM utilisation, else an equal split."""
        nv = self._nvml
        assert nv is not None
        pids = [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)]
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(handle, 0)
            util = {s.pid: float(s.smUtil) for s in samples if s.pid in pids or not pids}
        except nv.NVMLError:
            util = {}
        total = sum(util.values())
        if total > 0:
            return {pid: u / total for pid, u in util.items() if u > 0}
        return {pid: 1.0 / len(pids) for pid in pids} if pids else {}

    def process_shares(self) -> dict[str, dict[int, float]]:
        """Per GPU, the share of its energy each process used over the last interval (for attribution)."""
        nv = self._nvml
        assert nv is not None
        out = {}
        for g in self._life.gpus:
            if not g.described or self._clock() < g.down_until:
                continue
            try:
                if g.mig is not None and g.mig.enabled:
                    out[f"gpu-{g.index}"] = g.mig.process_shares(nv, self._shares)
                else:
                    out[f"gpu-{g.index}"] = self._shares(g.handle)
            except nv.NVMLError:
                continue
        return out

    def _lost(self, g: Gpu, exc: Exception, now: float) -> None:
        g.backoff_s = next_backoff(g.backoff_s, self._retry)
        g.down_until = now + g.backoff_s
        g.power.restart()  # power integration restarts on return
        g.rebaselined = not g.counter  # a counter keeps counting while we cannot read it: its gap is measured
        self._partial_errors += 1
        g.reason = f"{type(exc).__name__}: {exc}"
        log.warning("gpu_down", device=f"gpu-{g.index}", error=g.reason, retry_in_s=g.backoff_s)

    def _poll(self, g: Gpu, now: float) -> bool:
        """Update one GPU; False when it could not be read."""
        nv = self._nvml
        assert nv is not None
        if now < g.down_until:
            return False
        try:
            if not g.described:  # lost when the sensor started: describe it first (this poll only primes it)
                self._describe(g)
                self._found(g)
            if g.counter:
                mj = int(nv.nvmlDeviceGetTotalEnergyConsumption(g.handle))
                at = self._clock()
                if g.last_counter_mj is not None and mj >= g.last_counter_mj:
                    g.joules += (mj - g.last_counter_mj) / 1000.0
                g.last_counter_mj = mj
            else:
                watts = nv.nvmlDeviceGetPowerUsage(g.handle) / 1000.0
                at = self._clock()
                g.power.add(watts, at)
        except nv.NVMLError as exc:
            self._lost(g, exc, now)
            return False
        if g.backoff_s:
            log.info("gpu_recovered", device=f"gpu-{g.index}")
            g.backoff_s, g.reason = 0.0, ""
        g.read_at = at
        return True

    def _mig_enabled(self, g: Gpu) -> bool:
        """Whether MIG is on now (False for good on a GPU without MIG; the last known mode when NVML fails)."""
        nv = self._nvml
        assert nv is not None
        try:
            return bool(nv.nvmlDeviceGetMigMode(g.handle)[0] == nv.NVML_DEVICE_MIG_ENABLE)
        except nv.NVMLError_NotSupported:
            g.mig_capable = False
        except nv.NVMLError as exc:
            log.debug("gpu_mig_mode_unreadable", device=f"gpu-{g.index}", error=f"{type(exc).__name__}: {exc}")
            return g.mig is not None and g.mig.enabled
        return False

    def _mig_readings(self, g: Gpu, joules: float, baseline: bool) -> list[Reading]:
        """The apportioned readings of the GPU's MIG devices (none without MIG)."""
        nv = self._nvml
        assert nv is not None
        enabled = self._mig_enabled(g)
        if enabled and g.mig is None:
            g.mig = MigGpu(f"gpu-{g.index}", g.model)
            log.info("gpu_mig_enabled", device=f"gpu-{g.index}")
        if g.mig is None:
            return []
        return g.mig.advance(nv, g.handle, joules, g.read_at, baseline, enabled)

    def _read_all(self) -> SensorRead:
        now = self._clock()
        out, down = [], []
        for g in self._life.gpus:
            fresh = self._poll(g, now)
            primed = g.last_counter_mj is not None if g.counter else g.power.primed
            if fresh and primed:
                joules = g.joules if g.counter else g.power.joules
                out.append(Reading(f"gpu-{g.index}", "gpu", joules, g.read_at, baseline=g.rebaselined))
                if g.mig_capable:
                    out.extend(self._mig_readings(g, joules, g.rebaselined))
                g.rebaselined = False
            elif g.reason:
                down.append(DeviceDown(f"gpu-{g.index}", "gpu", g.reason))
        shares = self.process_shares()  # after the reads: a MIG GPU's shares follow this tick's split
        return SensorRead(tuple(out), shares, self.device_info(), self._partial_errors, tuple(down))

    async def read(self, host: HostSample) -> SensorRead:
        result = await self._life.read(self._read_all)
        if not result.readings and all(self._clock() < g.down_until for g in self._life.gpus):
            raise SensorReadError("every GPU is down")
        return result

    async def close(self) -> None:
        await self._life.close(self._nvml.nvmlShutdown if self._nvml is not None else None)


def _method(counter: bool) -> str:
    return "energy counter" if counter else "power integration"


def create(settings: NvmlSettings, ctx: Context) -> NvmlSensor:
    return NvmlSensor(
        ctx.clock,
        devices=settings.devices,
        power_sample_hz=settings.power_sample_hz,
        retry_secs=settings.retry_secs,
    )


BACKEND = Backend(frozenset({"gpu"}), NvmlSettings, create)
