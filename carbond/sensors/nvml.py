"""NVIDIA GPUs through NVML (``pynvml`` from the ``nvidia-ml-py`` package, imported only in :meth:`start`).

- Devices are NVML's physical GPUs (``device="gpu-<NVML index>"``). NVML indices follow PCI order and ignore
  ``CUDA_VISIBLE_DEVICES``, which only renumbers devices inside CUDA programs; select with ``nvml.devices`` by NVML
  index or UUID (``GPU-...``; a ``MIG-...`` UUID selects its parent GPU, reported once: MIG instances share their
  parent's power).
- Energy from ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta and later). Where it is
  not supported (Pascal and older, many vGPUs) ``nvmlDeviceGetPowerUsage`` (mW) is sampled at
  ``nvml.power_sample_hz`` in the background and integrated (trapezoids), so a GPU without a counter is never
  reported at 0 W.
- A lost GPU (GpuIsLost, Unknown) gives no reading and counts an error while the others go on; it is retried after
  ``nvml.retry_secs``, doubling up to 10 minutes. A missing library or driver makes the sensor unavailable with
  the reason. NVML calls block, so they run in worker threads. ``nvmlShutdown`` on close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import DeviceClass, Reading
from carbond.sensors.base import BackendOptions, BlockingCalls, Clock

log = structlog.get_logger("carbond.sensors.nvml")
MAX_BACKOFF_S = 600.0


@dataclass(slots=True)
class Gpu:
    index: int
    handle: Any
    model: str
    uuid: str
    counter: bool
    joules: float = 0.0
    last_counter_mj: int | None = None
    last_power_w: float | None = None
    last_sample_at: float | None = None
    down_until: float = 0.0
    backoff_s: float = 0.0
    read_at: float = 0.0
    rebaselined: bool = False


def _opt(section: Any, name: str, default: Any) -> Any:
    if section is None:
        return default
    return section.get(name, default) if isinstance(section, dict) else getattr(section, name, default)


class NvmlSensor:
    name = "nvml"

    def __init__(
        self,
        clock: Clock,
        *,
        devices: Sequence[str | int] = (),
        power_sample_hz: float = 1.0,
        retry_secs: float = 30.0,
        module: ModuleType | None = None,
    ) -> None:
        self._clock = clock
        self._select = [str(d) for d in devices]
        self._period = 1.0 / power_sample_hz
        self._retry = retry_secs
        self._nvml = module
        self._gpus: list[Gpu] = []
        self._sampler: asyncio.Task[None] | None = None
        self._blocking = BlockingCalls("NVML")
        self.partial_errors = 0
        self.last_process_shares: dict[str, dict[int, float]] = {}

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"gpu"}) if self._gpus else frozenset()

    def device_info(self) -> list[tuple[str, str, str]]:
        return [(f"gpu-{g.index}", g.model, g.uuid) for g in self._gpus]

    async def start(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise SensorUnavailable(
                    "nvml", "nvidia-ml-py is not installed (pip install 'carbond[nvidia]')"
                ) from None
            self._nvml = pynvml
        nv = self._nvml
        try:
            await asyncio.to_thread(nv.nvmlInit)
        except nv.NVMLError as exc:
            raise SensorUnavailable("nvml", f"nvmlInit failed: {exc} ({type(exc).__name__})") from None
        try:
            self._gpus = await asyncio.to_thread(self._enumerate)
        except nv.NVMLError as exc:
            await asyncio.to_thread(nv.nvmlShutdown)
            raise SensorUnavailable("nvml", f"cannot enumerate GPUs: {exc}") from None
        if not self._gpus:
            await asyncio.to_thread(nv.nvmlShutdown)
            raise SensorUnavailable("nvml", "NVML found no GPU" + (f" matching {self._select}" if self._select else ""))
        for g in self._gpus:
            log.info(
                "gpu_found",
                device=f"gpu-{g.index}",
                model=g.model,
                uuid=g.uuid,
                method="energy counter" if g.counter else "power integration",
            )
        if any(not g.counter for g in self._gpus):
            self._sampler = asyncio.create_task(self._sample_power(), name="nvml-power-sampler")

    def _enumerate(self) -> list[Gpu]:
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
        for i in range(nv.nvmlDeviceGetCount()):
            if wanted is not None and i not in wanted:
                continue
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            uuid = nv.nvmlDeviceGetUUID(h)
            try:
                nv.nvmlDeviceGetTotalEnergyConsumption(h)
                counter = True
            except nv.NVMLError_NotSupported:
                counter = False
            gpus.append(
                Gpu(
                    i,
                    h,
                    name.decode() if isinstance(name, bytes) else name,
                    uuid.decode() if isinstance(uuid, bytes) else uuid,
                    counter,
                )
            )
        return gpus

    def _index_of(self, handle: Any) -> int:
        nv = self._nvml
        assert nv is not None
        uuid = nv.nvmlDeviceGetUUID(handle)
        for i in range(nv.nvmlDeviceGetCount()):
            if nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)) == uuid:
                return i
        raise nv.NVMLError(nv.NVML_ERROR_NOT_FOUND)

    def _shares(self, g: Gpu) -> dict[int, float]:
        """Each running compute process's share of the GPU: SM utilisation, else an equal split."""
        nv = self._nvml
        assert nv is not None
        pids = [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(g.handle)]
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(g.handle, 0)
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
        for g in self._gpus:
            if self._clock() < g.down_until:
                continue
            try:
                out[f"gpu-{g.index}"] = self._shares(g)
            except nv.NVMLError:
                continue
        return out

    def _lost(self, g: Gpu, exc: Exception, now: float) -> None:
        g.backoff_s = min(MAX_BACKOFF_S, g.backoff_s * 2 if g.backoff_s else self._retry)
        g.down_until = now + g.backoff_s
        g.last_power_w, g.last_sample_at = None, None  # power integration restarts on return
        g.rebaselined = not g.counter  # a counter keeps counting while we cannot read it: its gap is measured
        self.partial_errors += 1
        log.warning("gpu_down", device=f"gpu-{g.index}", error=f"{type(exc).__name__}: {exc}", retry_in_s=g.backoff_s)

    def _poll(self, g: Gpu, now: float) -> bool:
        """Update one GPU; False when it could not be read."""
        nv = self._nvml
        assert nv is not None
        if now < g.down_until:
            return False
        try:
            if g.counter:
                mj = int(nv.nvmlDeviceGetTotalEnergyConsumption(g.handle))
                at = self._clock()
                if g.last_counter_mj is not None and mj >= g.last_counter_mj:
                    g.joules += (mj - g.last_counter_mj) / 1000.0
                g.last_counter_mj = mj
            else:
                watts = nv.nvmlDeviceGetPowerUsage(g.handle) / 1000.0
                at = self._clock()
                if g.last_power_w is not None and g.last_sample_at is not None:
                    g.joules += (watts + g.last_power_w) / 2 * (at - g.last_sample_at)
                g.last_power_w, g.last_sample_at = watts, at
        except nv.NVMLError as exc:
            self._lost(g, exc, now)
            return False
        if g.backoff_s:
            log.info("gpu_recovered", device=f"gpu-{g.index}")
            g.backoff_s = 0.0
        g.read_at = at
        return True

    def _read_all(self) -> list[Reading]:
        now = self._clock()
        self.last_process_shares = self.process_shares()
        out = []
        for g in self._gpus:
            fresh = self._poll(g, now)
            primed = g.last_counter_mj is not None if g.counter else g.last_sample_at is not None
            if fresh and primed:
                out.append(Reading(f"gpu-{g.index}", "gpu", g.joules, g.read_at, baseline=g.rebaselined))
                g.rebaselined = False
        return out

    def _poll_power_only(self, now: float) -> None:
        for g in self._gpus:
            if not g.counter:
                self._poll(g, now)

    async def _sample_power(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            with contextlib.suppress(SensorReadError):  # blocked: the tick reports it
                await self._blocking(self._poll_power_only, self._clock())

    async def read(self) -> Sequence[Reading]:
        readings = await self._blocking(self._read_all)
        if not readings and all(self._clock() < g.down_until for g in self._gpus):
            raise SensorReadError("every GPU is down")
        return readings

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._nvml is not None and self._gpus:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._nvml.nvmlShutdown)
        self._gpus = []


def create(opts: BackendOptions) -> NvmlSensor:
    s = opts.section
    return NvmlSensor(
        opts.clock,
        devices=_opt(s, "devices", ()),
        power_sample_hz=float(_opt(s, "power_sample_hz", 1.0)),
        retry_secs=float(_opt(s, "retry_secs", 30.0)),
    )
