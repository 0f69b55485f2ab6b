"""The Sensor protocol and what a backend factory receives."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from carbond.errors import SensorReadError
from carbond.model import DeviceClass, Reading

T = TypeVar("T")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Paths:
    """Filesystem roots (``/host/sys`` etc. in a container, fixture trees in tests)."""

    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    cgroupfs: Path = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """What the composition root hands a backend factory: roots, clock, and the backend's own config section."""

    paths: Paths = Paths()
    clock: Clock = time.monotonic
    section: Any = None


@runtime_checkable
class Sensor(Protocol):
    """A source of cumulative energy readings, one per device."""

    name: str
    #: Optional class attribute ``inline_read = True``: read() does no IO that could block (a model, or procfs,
    #: which the kernel generates in memory), so the monitor calls it directly, without a timeout task.

    @property
    def covers(self) -> frozenset[DeviceClass]:
        """Device classes this sensor provides once started (empty before start)."""
        ...

    async def start(self) -> None:
        """Open the backend; raise :class:`carbond.errors.SensorUnavailable` with the reason if it cannot run."""
        ...

    async def read(self) -> Sequence[Reading]:
        """Current cumulative energy of every device; raise SensorReadError when nothing could be read."""
        ...

    async def close(self) -> None: ...


class BlockingCalls:
    """One blocking backend call at a time, in a worker thread.

    A call that outlives the monitor's timeout (a hung driver, a sysfs read stuck in the kernel) keeps its thread;
    while it is still blocked, further calls fail at once with :class:`SensorReadError` instead of piling up
    threads until the shared pool is exhausted. When the blocked call returns, calls go through again.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._pending: asyncio.Future[Any] | None = None

    @property
    def blocked(self) -> bool:
        return self._pending is not None and not self._pending.done()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.blocked:
            raise SensorReadError(f"{self._what}: the previous call is still blocked")
        fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed even if nobody awaits it
        self._pending = fut
        return await asyncio.shield(fut)
