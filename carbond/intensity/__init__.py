"""Grid carbon intensity: providers, and the source the monitor reads each tick without waiting."""

from __future__ import annotations

from typing import Protocol

from carbond.model import Intensity


class IntensitySource(Protocol):
    """What the monitor asks once per tick: never blocks, never touches the network."""

    def current(self) -> tuple[Intensity | None, float]:
        """The intensity in force (None if none is known yet) and its age in seconds."""
        ...


class FixedIntensity:
    """A value that does not age (static tables, overrides)."""

    def __init__(self, value: Intensity) -> None:
        self._value = value

    def current(self) -> tuple[Intensity | None, float]:
        return self._value, 0.0
