"""Grid carbon intensity: providers, and the source the monitor reads each tick without waiting.

Modules: ``static`` (shipped tables), ``electricitymaps``, ``watttime``, ``ukgrid`` (one live provider each),
``http`` (what they share), ``cache`` (background refresh, fallback chain), ``persist`` (the cache file),
``location`` (``zone: auto``), ``config`` (the ``intensity`` section), ``build`` (the factory for app.py).
"""

from __future__ import annotations

from typing import Protocol

from carbond.model import Intensity, IntensityForecast, IntensityProviderState, ZoneSource


class IntensitySource(Protocol):
    """What the monitor asks once per tick: never blocks, never touches the network."""

    def current(self) -> tuple[Intensity | None, float]:
        """The intensity in force (None if none is known yet) and its age in seconds."""
        ...


class ManagedIntensity(IntensitySource, Protocol):
    """An intensity source with a life cycle and the extra figures the exporter shows."""

    #: Failed writes of the persisted intensity cache (0 for sources that keep none).
    persist_errors: int
    #: Where the zone came from (config, metadata, fallback, timezone, default).
    zone_source: ZoneSource

    @property
    def zone(self) -> str:
        """The zone in use (``zone: auto`` resolved)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def values(self) -> tuple[tuple[Intensity, float], ...]:
        """Every value that may be served now (the one in force among them), each with its age in seconds."""
        ...

    def forecast(self) -> IntensityForecast | None:
        """The lowest forecast intensity of the next 24 h, where a provider of the configured signal gives one."""
        ...

    def providers(self) -> tuple[IntensityProviderState, ...]:
        """Health of each live provider of the chain (empty for fixed values)."""
        ...


class FixedIntensity:
    """A value that does not age (static tables, overrides)."""

    persist_errors = 0

    def __init__(self, value: Intensity, zone_source: ZoneSource = "config") -> None:
        self._value = value
        self.zone_source: ZoneSource = zone_source

    @property
    def zone(self) -> str:
        return self._value.zone

    def current(self) -> tuple[Intensity | None, float]:
        return self._value, 0.0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def values(self) -> tuple[tuple[Intensity, float], ...]:
        return ((self._value, 0.0),)

    def forecast(self) -> IntensityForecast | None:
        return None

    def providers(self) -> tuple[IntensityProviderState, ...]:
        return ()
