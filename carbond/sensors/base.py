"""The Sensor protocol and what a backend factory receives."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from carbond.model import DeviceClass, Reading

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
