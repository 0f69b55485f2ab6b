"""What the GPU backends share: integrating power readings into energy, and the background power sampler.

A GPU without an energy counter (NVIDIA before Volta and many vGPUs; some AMD parts, or a counter rejected at
start) reports power only. Its power is sampled in the background at ``power_sample_hz`` and integrated by the
trapezoid rule between samples, so the energy between ticks is measured at the sampler's resolution and the GPU
is never shown at 0 W. Every time stamp comes from the sensor's injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from carbond.errors import SensorReadError
from carbond.sensors.base import BlockingCalls

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
