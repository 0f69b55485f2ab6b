"""Static grid intensity from the shipped country table (never fails, never touches the network).

Zones: ISO 3166 alpha-2 or alpha-3 country codes, any case. ``world`` and unknown zones get the world average,
475 g/kWh (IEA, Global Energy & CO2 Status Report 2019); an unknown zone also logs one warning naming it.
"""

from __future__ import annotations

import csv
import io
from functools import cache
from importlib import resources

import structlog

from carbond.model import Intensity

log = structlog.get_logger("carbond.intensity.static")

WORLD_G_PER_KWH = 475.0
WORLD = Intensity(
    g_per_kwh=WORLD_G_PER_KWH, provider="static", zone="world", observed_at=0.0, source="iea-2019", year=2019
)


@cache
def _countries() -> dict[str, Intensity]:
    text = resources.files("carbond.data").joinpath("country_intensity.csv").read_text(encoding="utf-8")
    table: dict[str, Intensity] = {}
    for row in csv.DictReader(io.StringIO(text)):
        value = Intensity(
            g_per_kwh=float(row["g_per_kwh"]),
            provider="static",
            zone=row["alpha2"],
            observed_at=0.0,
            source="owid",
            year=int(row["year"]),
        )
        table[row["alpha2"]] = table[row["alpha3"]] = value
    return table


def lookup_country(zone: str) -> Intensity | None:
    """The country's lifecycle intensity, zone normalised to alpha-2; None if unknown."""
    return _countries().get(zone.strip().upper())


class StaticProvider:
    name = "static"

    def __init__(self, zone: str) -> None:
        self._zone = zone
        self._warned: set[str] = set()

    async def current(self, zone: str | None = None) -> Intensity:
        zone = zone or self._zone
        if zone.strip().lower() == "world":
            return WORLD
        found = lookup_country(zone)
        if found is not None:
            return found
        if zone not in self._warned:
            self._warned.add(zone)
            log.warning("unknown_zone", zone=zone, fallback="world", g_per_kwh=WORLD_G_PER_KWH)
        return WORLD
