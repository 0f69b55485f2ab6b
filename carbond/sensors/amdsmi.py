"""AMD GPUs through ROCm's ``amdsmi`` Python binding (imported only in :meth:`start`).

- Energy from ``amdsmi_get_energy_count``: ``energy_accumulator`` (``power`` in older releases) x
  ``counter_resolution`` microjoules. At start the counter is checked against ``average_socket_power`` over a short
  sample; if they disagree by more than 10x (a misreported resolution has been seen), power is integrated instead
  and ``carbond probe`` says so.
- Power-only devices integrate ``average_socket_power`` (W) sampled in the background.
- MI250/MI250X: the second die of each package reports 0 W while the first reports both; a device that reports
  0 W and a still counter at start is left out rather than shown as a 0 W GPU (logged).
- A not-initialised status (e.g. after a driver reset) re-initialises once and retries. ``amdsmi_shut_down`` on
  close. Calls block, so they run in a worker thread, one at a time. The start-to-close lifecycle (sampler,
  worker thread, shutdown) is :class:`carbond.sensors.gpu.GpuLifecycle`, shared with NVML.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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

log = get_logger("carbond.sensors.amdsmi")
VALIDATION_S = 0.5


class AmdSmiSettings(Settings):
    """The ``amdsmi`` config section."""

    power_sample_hz: Annotated[float, Field(ge=0.1, le=100)] = POWER_SAMPLE_HZ
    retry_secs: Annotated[float, Field(ge=1, le=3600)] = RETRY_S  # a GPU that fails is retried after this, doubling


@dataclass(slots=True)
class AmdGpu:
    index: int
    handle: Any
    model: str = ""
    uuid: str = ""
    counter: bool = False
    method: str = "energy counter"
    described: bool = True  # False: it failed when the sensor started; described again when it answers
    reason: str = ""  # why it could not be described or read
    retry_at: float = 0.0
    backoff_s: float = 0.0
    joules: float = 0.0  # from the energy counter
    last_uj: float | None = None
    power: PowerIntegrator = field(default_factory=PowerIntegrator)  # power-only devices


class AmdSmiSensor:
    name = "amdsmi"
    inline = False

    def __init__(
        self,
        clock: Clock,
        *,
        power_sample_hz: float = POWER_SAMPLE_HZ,
        retry_secs: float = RETRY_S,
        module: ModuleType | None = None,
    ) -> None:
        self._retry = retry_secs
        self._clock = clock
        self._smi = module
        self._life: GpuLifecycle[AmdGpu] = GpuLifecycle("amdsmi", "amdsmi", 1.0 / power_sample_hz, self._poll)
        self._partial_errors = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return self._life.covers

    def device_info(self) -> tuple[DeviceInfo, ...]:
        return tuple(
            DeviceInfo(f"gpu-{g.index}", g.model, g.uuid, self.name, g.method.partition(" (")[0], _detail(g.method))
            for g in self._life.described()
        )

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        smi = self._smi
        assert smi is not None
        try:
            return fn(*args)
        except smi.AmdSmiLibraryException as exc:
            if "NOT_INIT" not in str(exc):
                raise
            log.info("amdsmi_reinit", call=fn.__name__)
            smi.amdsmi_init()
            return fn(*args)

    @property
    def _lib(self) -> ModuleType:
        assert self._smi is not None, "amdsmi used before start"
        return self._smi

    def _energy_uj(self, handle: Any) -> float:
        e = self._call(self._lib.amdsmi_get_energy_count, handle)
        count = e.get("energy_accumulator", e.get("power"))
        return float(count) * float(e["counter_resolution"])

    def _power_w(self, handle: Any) -> float:
        return float(self._call(self._lib.amdsmi_get_power_info, handle)["average_socket_power"])

    def _discover(self) -> list[AmdGpu]:
        smi = self._smi
        assert smi is not None
        gpus, down = [], []
        for i, h in enumerate(self._call(self._lib.amdsmi_get_processor_handles)):
            g = AmdGpu(i, h)
            try:  # each GPU on its own: one that fails is down and retried, the others are measured
                self._describe(g)
                first = (self._energy_uj(g.handle) if g.counter else 0.0, self._clock())
            except smi.AmdSmiException as exc:
                self._down(g, exc)
                down.append(g)
                continue
            gpus.append((g, first))
        time.sleep(VALIDATION_S)
        kept = []
        for g, (e0, t0) in gpus:
            try:
                watts = self._power_w(g.handle)
                counter_w = (self._energy_uj(g.handle) - e0) / 1e6 / max(self._clock() - t0, 1e-6) if g.counter else 0.0
            except smi.AmdSmiException as exc:
                self._down(g, exc)
                down.append(g)
                continue
            if watts == 0 and counter_w == 0:
                log.info(
                    "amdsmi_zero_die_skipped",
                    device=f"gpu-{g.index}",
                    model=g.model,
                    reason="reports 0 W and a still counter (second die of an MI250 package)",
                )
                continue
            if g.counter and watts > 0 and not 0.1 <= counter_w / watts <= 10:
                g.counter, g.method = False, f"power integration (counter gave {counter_w:.0f} W vs {watts:.0f} W)"
                log.warning("amdsmi_counter_rejected", device=f"gpu-{g.index}", counter_w=counter_w, power_w=watts)
            kept.append(g)
        return sorted(kept + down, key=lambda g: g.index)

    def _describe(self, g: AmdGpu) -> None:
        smi = self._smi
        assert smi is not None
        g.model = str(self._call(self._lib.amdsmi_get_gpu_asic_info, g.handle).get("market_name", "AMD GPU"))
        g.uuid = str(self._call(self._lib.amdsmi_get_gpu_device_uuid, g.handle))
        try:
            self._energy_uj(g.handle)
            g.counter, g.method = True, "energy counter"
        except smi.AmdSmiLibraryException:
            g.counter, g.method = False, "power integration"
        g.described = True

    def _down(self, g: AmdGpu, exc: Exception) -> None:
        """A GPU that cannot be described: retried after ``retry_secs``, doubling up to 10 minutes."""
        g.described, g.reason = False, f"{type(exc).__name__}: {exc}"
        g.backoff_s = next_backoff(g.backoff_s, self._retry)
        g.retry_at = self._clock() + g.backoff_s
        self._partial_errors += 1
        log.warning("gpu_down", device=f"gpu-{g.index}", error=g.reason, retry_in_s=g.backoff_s)

    async def start(self) -> None:
        if self._smi is None:
            try:
                import amdsmi
            except ImportError:
                raise SensorUnavailable(
                    "amdsmi",
                    "the amdsmi module is not importable (it ships with ROCm under "
                    "/opt/rocm/share/amd_smi; install it into carbond's environment)",
                ) from None
            self._smi = amdsmi
        smi = self._smi
        try:
            await asyncio.to_thread(smi.amdsmi_init)
            self._life.gpus = await asyncio.to_thread(self._discover)
        except smi.AmdSmiException as exc:
            raise SensorUnavailable("amdsmi", f"amdsmi failed: {exc}") from None
        if not self._life.gpus:
            await asyncio.to_thread(smi.amdsmi_shut_down)
            raise SensorUnavailable("amdsmi", "amdsmi found no GPU reporting power")
        self._life.sample_power_only()

    def _poll(self, g: AmdGpu) -> bool:
        smi = self._smi
        assert smi is not None
        if not g.described:
            if self._clock() < g.retry_at:
                return False
            try:  # back: described now, measured from the next read (without the start-up validation)
                self._describe(g)
            except smi.AmdSmiException as exc:
                self._down(g, exc)
                return False
            g.reason, g.backoff_s = "", 0.0
            log.info("gpu_recovered", device=f"gpu-{g.index}", model=g.model, method=g.method)
        try:
            if g.counter:
                uj = self._energy_uj(g.handle)
                if g.last_uj is not None and uj >= g.last_uj:
                    g.joules += (uj - g.last_uj) / 1e6
                g.last_uj = uj
            else:
                watts = self._power_w(g.handle)
                g.power.add(watts, self._clock())
        except smi.AmdSmiException as exc:
            self._partial_errors += 1
            g.reason = f"{type(exc).__name__}: {exc}"
            log.warning("amdsmi_read_failed", device=f"gpu-{g.index}", error=str(exc))
            return False
        g.reason = ""
        return True

    def _read_all(self) -> SensorRead:
        out, down = [], []
        for g in self._life.gpus:
            if self._poll(g):
                joules = g.joules if g.counter else g.power.joules
                out.append(Reading(f"gpu-{g.index}", "gpu", joules, self._clock()))
            elif g.reason:
                down.append(DeviceDown(f"gpu-{g.index}", "gpu", g.reason))
        return SensorRead(
            tuple(out), device_info=self.device_info(), partial_errors=self._partial_errors, down=tuple(down)
        )

    async def read(self, host: HostSample) -> SensorRead:
        result = await self._life.read(self._read_all)
        if not result.readings:
            raise SensorReadError("no AMD GPU could be read")
        return result

    async def close(self) -> None:
        await self._life.close(self._smi.amdsmi_shut_down if self._smi is not None else None)


def _detail(method: str) -> str:
    """What a rejected counter gave, where it was rejected (the part of the method in parentheses)."""
    return method.partition(" (")[2].removesuffix(")")


def create(settings: AmdSmiSettings, ctx: Context) -> AmdSmiSensor:
    return AmdSmiSensor(ctx.clock, power_sample_hz=settings.power_sample_hz, retry_secs=settings.retry_secs)


BACKEND = Backend(frozenset({"gpu"}), AmdSmiSettings, create)
