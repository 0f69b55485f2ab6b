"""AMD GPUs through ROCm's ``amdsmi`` Python binding (imported only in :meth:`start`).

- Energy from ``amdsmi_get_energy_count``: ``energy_accumulator`` (``power`` in older releases) x
  ``counter_resolution`` microjoules. At start the counter is checked against ``average_socket_power`` over a short
  sample; if they disagree by more than 10x (a misreported resolution has been seen), power is integrated instead
  and ``carbond probe`` says so.
- Power-only devices integrate ``average_socket_power`` (W) sampled in the background.
- MI250/MI250X: the second die of each package reports 0 W while the first reports both; a device that reports
  0 W and a still counter at start is left out rather than shown as a 0 W GPU (logged).
- A not-initialised status (e.g. after a driver reset) re-initialises once and retries. ``amdsmi_shut_down`` on
  close. Calls block, so they run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import DeviceClass, Reading
from carbond.sensors.base import BackendOptions, BlockingCalls, Clock

log = structlog.get_logger("carbond.sensors.amdsmi")
VALIDATION_S = 0.5


@dataclass(slots=True)
class AmdGpu:
    index: int
    handle: Any
    model: str
    uuid: str
    counter: bool
    method: str = "energy counter"
    joules: float = 0.0
    last_uj: float | None = None
    last_w: float | None = None
    last_at: float | None = None


class AmdSmiSensor:
    name = "amdsmi"

    def __init__(self, clock: Clock, *, power_sample_hz: float = 1.0, module: ModuleType | None = None) -> None:
        self._clock = clock
        self._period = 1.0 / power_sample_hz
        self._smi = module
        self._gpus: list[AmdGpu] = []
        self._sampler: asyncio.Task[None] | None = None
        self._blocking = BlockingCalls("amdsmi")
        self.partial_errors = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"gpu"}) if self._gpus else frozenset()

    def device_info(self) -> list[tuple[str, str, str]]:
        return [(f"gpu-{g.index}", f"{g.model} ({g.method})", g.uuid) for g in self._gpus]

    def _call(self, fn: str, *args: Any) -> Any:
        smi = self._smi
        assert smi is not None
        try:
            return getattr(smi, fn)(*args)
        except smi.AmdSmiLibraryException as exc:
            if "NOT_INIT" not in str(exc):
                raise
            log.info("amdsmi_reinit", call=fn)
            smi.amdsmi_init()
            return getattr(smi, fn)(*args)

    def _energy_uj(self, handle: Any) -> float:
        e = self._call("amdsmi_get_energy_count", handle)
        count = e.get("energy_accumulator", e.get("power"))
        return float(count) * float(e["counter_resolution"])

    def _power_w(self, handle: Any) -> float:
        return float(self._call("amdsmi_get_power_info", handle)["average_socket_power"])

    def _discover(self) -> list[AmdGpu]:
        smi = self._smi
        assert smi is not None
        gpus = []
        for i, h in enumerate(self._call("amdsmi_get_processor_handles")):
            model = str(self._call("amdsmi_get_gpu_asic_info", h).get("market_name", "AMD GPU"))
            uuid = str(self._call("amdsmi_get_gpu_device_uuid", h))
            try:
                self._energy_uj(h)
                counter = True
            except smi.AmdSmiLibraryException:
                counter = False
            gpus.append(AmdGpu(i, h, model, uuid, counter, "energy counter" if counter else "power integration"))
        first = {g.index: (self._energy_uj(g.handle) if g.counter else 0.0, time.monotonic()) for g in gpus}
        time.sleep(VALIDATION_S)
        kept = []
        for g in gpus:
            watts = self._power_w(g.handle)
            counter_w = 0.0
            if g.counter:
                e0, t0 = first[g.index]
                counter_w = (self._energy_uj(g.handle) - e0) / 1e6 / (time.monotonic() - t0)
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
        return kept

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
            self._gpus = await asyncio.to_thread(self._discover)
        except smi.AmdSmiException as exc:
            raise SensorUnavailable("amdsmi", f"amdsmi failed: {exc}") from None
        if not self._gpus:
            await asyncio.to_thread(smi.amdsmi_shut_down)
            raise SensorUnavailable("amdsmi", "amdsmi found no GPU reporting power")
        if any(not g.counter for g in self._gpus):
            self._sampler = asyncio.create_task(self._sample_power(), name="amdsmi-power-sampler")

    def _poll(self, g: AmdGpu) -> bool:
        smi = self._smi
        assert smi is not None
        try:
            if g.counter:
                uj = self._energy_uj(g.handle)
                if g.last_uj is not None and uj >= g.last_uj:
                    g.joules += (uj - g.last_uj) / 1e6
                g.last_uj = uj
            else:
                watts, now = self._power_w(g.handle), self._clock()
                if g.last_w is not None and g.last_at is not None:
                    g.joules += (watts + g.last_w) / 2 * (now - g.last_at)
                g.last_w, g.last_at = watts, now
        except smi.AmdSmiException as exc:
            self.partial_errors += 1
            log.warning("amdsmi_read_failed", device=f"gpu-{g.index}", error=str(exc))
            return False
        return True

    def _read_all(self) -> list[Reading]:
        out = []
        for g in self._gpus:
            if self._poll(g):
                out.append(Reading(f"gpu-{g.index}", "gpu", g.joules, self._clock()))
        return out

    def _poll_power_only(self) -> None:
        for g in self._gpus:
            if not g.counter:
                self._poll(g)

    async def _sample_power(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            with contextlib.suppress(SensorReadError):  # blocked: the tick reports it
                await self._blocking(self._poll_power_only)

    async def read(self) -> Sequence[Reading]:
        readings = await self._blocking(self._read_all)
        if not readings:
            raise SensorReadError("no AMD GPU could be read")
        return readings

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._smi is not None and self._gpus:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._smi.amdsmi_shut_down)
        self._gpus = []


def create(opts: BackendOptions) -> AmdSmiSensor:
    s = opts.section
    hz = 1.0 if s is None else float(s.get("power_sample_hz", 1.0) if isinstance(s, dict) else s.power_sample_hz)
    return AmdSmiSensor(opts.clock, power_sample_hz=hz)
