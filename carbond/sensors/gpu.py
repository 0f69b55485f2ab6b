"""What the GPU backends share: the lifecycle from start to close, integrating power readings into energy, and the
background power sampler.

:class:`GpuLifecycle` is what an NVML or amdsmi sensor holds between start and close: the GPUs the library found,
the worker thread every library call runs on, the background sampler of the power-only GPUs, and the library's
shutdown on close. Each backend keeps what differs: how a GPU is described, polled and reported.

A GPU without an energy counter (NVIDIA before Volta and many vGPUs; some AMD parts, or a counter rejected at
start) reports power only. Its power is sampled in the background at ``power_sample_hz`` and integrated by the
trapezoid rule between samples, so the energy between ticks is measured at the sampler's resolution and the GPU
is never shown at 0 W. Every time stamp comes from the sensor's injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from carbond.errors import SensorReadError
from carbond.logs import get_logger
from carbond.model import DeviceClass, SensorRead
from carbond.sensors.base import BlockingCalls

log = get_logger("carbond.sensors.gpu")

#: Default background sampling rate of power-only GPUs (``nvml.power_sample_hz``, ``amdsmi.power_sample_hz``).
POWER_SAMPLE_HZ = 1.0
#: A GPU that fails is retried after ``retry_secs`` (this default), doubling up to MAX_BACKOFF_S.
RETRY_S = 30.0
MAX_BACKOFF_S = 600.0


def next_backoff(current_s: float, retry_s: float) -> float:
    """The wait before the next retry of a GPU that failed again (``current_s`` 0: its first failure)."""
    return min(MAX_BACKOFF_S, current_s * 2 if current_s else retry_s)


class PowerIntegrator:
    """Cumulative joules from power samples (W at monotonic seconds), trapezoid by trapezoid."""

    __slots__ = ("joules", "last_at", "last_w")

    def __init__(self) -> None:
        self.joules = 0.0
        self.last_w: float | None = None
        self.last_at: float | None = None

    @property
    def primed(self) -> bool:
        """True once a sample exists to integrate from."""
        return self.last_at is not None

    def add(self, watts: float, at: float) -> None:
        if self.last_w is not None and self.last_at is not None and at > self.last_at:
            self.joules += (watts + self.last_w) / 2 * (at - self.last_at)
        self.last_w, self.last_at = watts, at

    def restart(self) -> None:
        """Forget the last sample (the device was lost): integration starts again at the next one."""
        self.last_w = self.last_at = None


class PowerSampler:
    """Calls ``poll`` (blocking: it runs through the sensor's :class:`BlockingCalls`) every ``period_s`` in the
    background, until :meth:`close`. A poll still blocked when the next is due is skipped: the tick reports it."""

    def __init__(self, name: str, poll: Callable[[], None], period_s: float, blocking: BlockingCalls) -> None:
        self._poll = poll
        self._period = period_s
        self._blocking = blocking
        self._task: asyncio.Task[None] = asyncio.create_task(self._run(), name=f"{name}-power-sampler")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            with contextlib.suppress(SensorReadError):
                await self._blocking(self._poll)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class GpuState(Protocol):
    """What the lifecycle reads of a backend's record of one GPU."""

    described: bool  # known to the library (handle, name, energy method): it can be read
    counter: bool  # True: read from its energy counter; False: power-only, sampled in the background


G = TypeVar("G", bound=GpuState)


class GpuLifecycle(Generic[G]):
    """The GPUs of one backend from start to close, and the read and close both backends do with them.

    ``name`` names the sampler's task and the logs, ``library`` the blocking calls' errors; ``poll`` updates one
    GPU (blocking: it runs in the worker thread), for the background sampling of power-only GPUs.
    """

    def __init__(self, name: str, library: str, period_s: float, poll: Callable[[G], object]) -> None:
        self.gpus: list[G] = []  # set by the backend's start; emptied on close
        self.blocking = BlockingCalls(library)  # every library call goes through it: one at a time
        self._name = name
        self._period = period_s
        self._poll = poll
        self._sampler: PowerSampler | None = None

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"gpu"}) if self.gpus else frozenset()

    def described(self) -> list[G]:
        """The GPUs the library has described (a GPU down since start is left out until it answers)."""
        return [g for g in self.gpus if g.described]

    def sample_power_only(self) -> None:
        """Start the background sampler once a power-only GPU is described (at start, or when a GPU down at start
        comes back); nothing when it runs already or every GPU has a counter."""
        if self._sampler is None and any(g.described and not g.counter for g in self.gpus):
            self._sampler = PowerSampler(self._name, self._poll_power_only, self._period, self.blocking)

    def _poll_power_only(self) -> None:
        for g in self.gpus:
            if g.described and not g.counter:
                self._poll(g)

    async def read(self, read_all: Callable[[], SensorRead]) -> SensorRead:
        """``read_all`` in the worker thread; then the sampler, should that read have described a power-only GPU."""
        result = await self.blocking(read_all)
        self.sample_power_only()
        return result

    async def close(self, shutdown: Callable[[], object] | None) -> None:
        """Stop the sampler, then shut the library down (``shutdown``; None: it was never loaded) if it found GPUs.
        A shutdown that fails is logged, not raised: the other sensors close all the same."""
        if self._sampler is not None:
            await self._sampler.close()
            self._sampler = None
        if shutdown is not None and self.gpus:
            try:
                await asyncio.to_thread(shutdown)
            except Exception as exc:  # noqa: BLE001 - whatever the library raises: closing must go on
                log.warning("gpu_shutdown_failed", sensor=self._name, error=f"{type(exc).__name__}: {exc}")
        self.gpus = []
