"""The Sensor protocol, a backend's description (settings model and factory) and what a factory receives."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from carbond.errors import SensorReadError
from carbond.model import DeviceClass, SensorRead
from carbond.procfs import HostSample

T = TypeVar("T")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Paths:
    """Filesystem roots (``/host/sys`` etc. in a container, fixture trees in tests)."""

    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    cgroupfs: Path = Path("/sys/fs/cgroup")


class Settings(BaseModel):
    """Base of every backend's config section: strict (unknown keys are errors), immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Settings)


@dataclass(frozen=True, slots=True)
class Context:
    """What every backend gets besides its own section: filesystem roots, the clock, and the cloud instance type
    the config names (``embodied.instance_type`` and its cloud: ``("gcp", "n2-standard-8")``), for the CPU model
    where DMI does not name it."""

    paths: Paths = Paths()
    clock: Clock = time.monotonic
    instance: tuple[str, str] | None = None


@runtime_checkable
class Sensor(Protocol):
    """A source of cumulative energy readings, one per device."""

    name: str
    #: True when read() does no IO that could block (a model, or procfs, which the kernel generates in memory):
    #: the monitor then calls it directly, without a timeout task.
    inline: bool

    @property
    def covers(self) -> frozenset[DeviceClass]:
        """Device classes this sensor provides once started (empty before start)."""
        ...

    async def start(self) -> None:
        """Open the backend; raise :class:`carbond.errors.SensorUnavailable` with the reason if it cannot run."""
        ...

    async def read(self, host: HostSample) -> SensorRead:
        """Current cumulative energy of every device (``host``: this tick's /proc/stat and meminfo); raise
        SensorReadError when nothing could be read."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Backend(Generic[S]):
    """One backend: the device classes it can cover, its config section's model, and its factory."""

    classes: frozenset[DeviceClass]
    settings: type[S]
    create: Callable[[S, Context], Sensor]

    def build(self, section: Settings | None, ctx: Context) -> Sensor:
        """The sensor for ``section`` (its defaults when None or of another model)."""
        settings = section if isinstance(section, self.settings) else self.settings()
        return self.create(settings, ctx)


class BlockingCalls:
    """One blocking backend call at a time, in a worker thread.

    A call that finds another in flight (the background power sampler's, a millisecond long) waits for it up to
    ``grace_s``. A call that outlives that (a hung driver, a sysfs read stuck in the kernel) keeps its thread;
    while it is still blocked, further calls fail with :class:`SensorReadError` after the grace instead of piling
    up threads until the shared pool is exhausted. When the blocked call returns, calls go through again.
    """

    def __init__(self, what: str, grace_s: float = 0.5) -> None:
        self._what = what
        self._grace = grace_s
        self._pending: asyncio.Future[Any] | None = None

    @property
    def blocked(self) -> bool:
        return self._pending is not None and not self._pending.done()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        while (pending := self._pending) is not None and not pending.done():  # another waiter may have gone first
            await asyncio.wait({pending}, timeout=max(deadline - loop.time(), 0.0))  # never cancels the shared call
            if not pending.done():
                raise SensorReadError(f"{self._what}: the previous call is still blocked")
        fut = loop.run_in_executor(None, functools.partial(fn, *args))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed even if nobody awaits it
        self._pending = fut
        return await asyncio.shield(fut)
