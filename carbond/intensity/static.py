"""Static grid intensity from the shipped tables (never fails, never touches the network).

Zones, any case, looked up in this order (the first table that has the zone wins):

1. ``region_intensity.csv``: US states (``US-CA``, eGRID2023 CO2e output rates, direct), Canadian provinces
   (``CA-QC``, 2023 mix x per-source lifecycle factors), Swedish and Norwegian bidding zones (``SE3``, ``NO1``:
   Electricity Maps' 2025 yearly averages, lifecycle), cloud regions (``aws:eu-west-3``, ``gcp:europe-west1``,
   ``azure:westeurope``; see :mod:`carbond.data.regions` for which source wins when several have a region);
2. ``country_intensity.csv``: ISO 3166 alpha-2 or alpha-3, one row per country, so ``FI`` and ``FIN`` (also a
   bidding zone) give one value: Our World in Data (``owid``, lifecycle), or for a country whose OWID intensity is 0
   its generation mix x per-source lifecycle factors (``owid-mix``: the Central African Republic); a sub-zone not
   in the region table (``DE-BY``) falls back to its country;
3. ``world`` and unknown zones get the world average, 475 g/kWh (IEA, Global Energy & CO2 Status Report 2019); an
   unknown zone also logs one warning naming it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal, cast

from carbond.logs import get_logger
from carbond.model import Intensity

log = get_logger("carbond.intensity.static")

WORLD_G_PER_KWH = 475.0
WORLD = Intensity(
    g_per_kwh=WORLD_G_PER_KWH, provider="static", zone="world", observed_at=0.0, source="iea-2019", year=2019
)


@dataclass(frozen=True, slots=True)
class ZoneRow:
    """A row of the static tables with its human name (for ``carbond zones``)."""

    intensity: Intensity
    name: str
    table: Literal["country", "region", "cloud"]


def _read(name: str) -> list[dict[str, str]]:
    text = resources.files("carbond.data").joinpath(name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@cache
def _countries() -> dict[str, ZoneRow]:
    table: dict[str, ZoneRow] = {}
    for row in _read("country_intensity.csv"):
        value = Intensity(
            g_per_kwh=float(row["g_per_kwh"]),
            provider="static",
            zone=row["alpha2"],
            observed_at=0.0,
            source=row["source"],
            year=int(row["year"]),
        )
        table[row["alpha2"]] = table[row["alpha3"]] = ZoneRow(value, row["name"], "country")
    return table


@cache
def _regions() -> dict[str, ZoneRow]:
    table: dict[str, ZoneRow] = {}
    for row in _read("region_intensity.csv"):
        value = Intensity(
            g_per_kwh=float(row["g_per_kwh"]),
            provider="static",
            zone=row["zone"],
            observed_at=0.0,
            factor_type=cast(Literal["lifecycle", "direct"], row["factor_type"]),
            source=row["source"],
            year=int(row["year"]) if row["year"] else None,
        )
        kind: Literal["region", "cloud"] = "cloud" if ":" in row["zone"] else "region"
        table[normalise(row["zone"])] = ZoneRow(value, row["name"], kind)
    return table


def normalise(zone: str) -> str:
    """The table key of a zone: ``aws:EU-West-3`` -> ``aws:eu-west-3``, ``azure:West Europe`` ->
    ``azure:westeurope``, ``us-ca`` -> ``US-CA``."""
    zone = zone.strip()
    cloud, sep, region = zone.partition(":")
    if sep:
        cloud = cloud.strip().lower()
        region = region.strip().lower()
        if cloud == "azure":
            region = region.replace(" ", "")
        return f"{cloud}:{region}"
    return zone.upper()


def lookup_country(zone: str) -> Intensity | None:
    """The country's lifecycle intensity, zone normalised to alpha-2; None if unknown."""
    row = _countries().get(zone.strip().upper())
    return row.intensity if row else None


def lookup(zone: str) -> Intensity | None:
    """The static intensity of any zone the tables know (precedence in the module docstring); None if unknown."""
    key = normalise(zone)
    if key == "WORLD":
        return WORLD
    row = _regions().get(key) or _countries().get(key)
    if row is None and "-" in key and ":" not in key:
        row = _countries().get(key.partition("-")[0])
    return row.intensity if row else None


def close_matches(zone: str, n: int = 3) -> list[str]:
    """Known zones that look like ``zone`` (for an error message)."""
    import difflib

    keys = {"WORLD", *_countries(), *_regions()}
    return difflib.get_close_matches(normalise(zone), sorted(keys), n=n, cutoff=0.5)


def rows(table: Literal["zones", "aws", "gcp", "azure"]) -> list[ZoneRow]:
    """Every row of a table, once: ``zones`` = countries (by alpha-2) and sub-national zones; else one cloud."""
    if table == "zones":
        regions = [r for r in _regions().values() if r.table == "region"]
        shadowed = {r.intensity.zone for r in regions}  # a zone in both tables is listed once, as looked up
        countries = {id(r): r for r in _countries().values() if r.intensity.zone not in shadowed}
        return list(countries.values()) + regions
    prefix = f"{table}:"
    return [r for key, r in _regions().items() if key.startswith(prefix)]


class StaticProvider:
    name = "static"

    def __init__(self, zone: str) -> None:
        self._zone = zone
        self._warned: set[str] = set()

    def value(self, zone: str | None = None) -> Intensity:
        """The static value, synchronously (never fails)."""
        zone = zone or self._zone
        found = lookup(zone)
        if found is not None:
            return found
        if zone not in self._warned:
            self._warned.add(zone)
            log.warning("unknown_zone", zone=zone, fallback="world", g_per_kwh=WORLD_G_PER_KWH)
        return WORLD

    async def current(self, zone: str | None = None) -> Intensity:
        return self.value(zone)
