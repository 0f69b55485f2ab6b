"""Static grid intensity from the shipped tables (never fails, never touches the network).

Zones, any case, in carbond's spelling or as Electricity Maps (``SE-SE3``, ``US-CAL-CISO``: its 2025 yearly
averages of every sub-national zone are rows) and WattTime (``CAISO_NORTH``: its grid operator's Electricity Maps
zone) name them (:func:`resolve`), looked up in this order (the first table that has the zone wins):

1. ``region_intensity.csv``: US states (``US-CA``, eGRID2023 CO2e output rates, direct), Canadian provinces
   (``CA-QC``, 2023 mix x per-source lifecycle factors), Swedish and Norwegian bidding zones (``SE3``, ``NO1``:
   Electricity Maps' 2025 yearly averages, lifecycle), cloud regions (``aws:eu-west-3``, ``gcp:europe-west1``,
   ``azure:westeurope``; see :mod:`carbond.data.regions` for which source wins when several have a region);
2. ``country_intensity.csv``: ISO 3166 alpha-2 or alpha-3, one row per country, so ``FI`` and ``FIN`` (also a
   bidding zone) give one value: Our World in Data (``owid``, lifecycle), or for a country whose OWID intensity is 0
   its generation mix x per-source lifecycle factors (``owid-mix``: the Central African Republic); a sub-zone not
   in the region table falls back to its country only when it is an ISO 3166-2 subdivision (``DE-BY``): ``US-ZZ``
   is unknown, not the US average;
3. ``world`` and unknown zones get the world average, 475 g/kWh (IEA, Global Energy & CO2 Status Report 2019); an
   unknown zone also logs one warning naming it.
"""

from __future__ import annotations

import csv
import io
import re
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


@cache
def _subdivisions() -> frozenset[str]:
    return frozenset(r["code"] for r in _read("subdivisions.csv"))


#: WattTime's names of the US grid operators whose Electricity Maps zone ends with another abbreviation.
_WATTTIME_OPERATORS = {"CAISO": "CISO", "ERCOT": "ERCO", "NYISO": "NYIS", "ISONE": "ISNE", "SPP": "SWPP", "BPA": "BPAT"}


def _watttime(key: str) -> str | None:
    """The Electricity Maps zone of a WattTime region (``CAISO_NORTH``, ``PJM_DC``, ``ERCOT_EASTTX``, ``TVA``): its
    grid operator, the part before the first underscore, is the last part of a US zone's name (EIA's codes)."""
    operator = key.partition("_")[0]
    if not re.fullmatch(r"[A-Z]{2,6}", operator):
        return None
    operator = _WATTTIME_OPERATORS.get(operator, operator)
    found = [z for z in _regions() if z.startswith("US-") and z.count("-") == 2 and z.rsplit("-", 1)[1] == operator]
    return found[0] if len(found) == 1 else None


def resolve(zone: str) -> tuple[str, ZoneRow | None]:
    """(table key, row) of a zone as users write it: a table key (``SE3``, ``US-CA``, ``aws:eu-north-1``), an
    Electricity Maps name (``SE-SE3``, ``US-CAL-CISO``), a WattTime region (``CAISO_NORTH``), a country (alpha-2 or
    alpha-3), or an ISO 3166-2 subdivision the tables lack (``DE-BY``: its country). Row None: unknown (an unknown
    sub-zone of a known country too: ``US-ZZ`` is not the US average)."""
    key = normalise(zone)
    row = _regions().get(key) or _countries().get(key)
    if row is not None:
        return key, row
    country, dash, sub = key.partition("-")
    if dash and ":" not in key:
        if sub.startswith(country) and (row := _regions().get(sub)) is not None:  # Electricity Maps' SE-SE3: SE3
            return sub, row
        if key in _subdivisions() and (row := _countries().get(country)) is not None:
            return key, row
        return key, None
    if (em := _watttime(key)) is not None:
        return em, _regions()[em]
    return key, None


def lookup(zone: str) -> Intensity | None:
    """The static intensity of any zone the tables know (precedence in the module docstring); None if unknown."""
    if normalise(zone) == "WORLD":
        return WORLD
    row = resolve(zone)[1]
    return row.intensity if row else None


def close_matches(zone: str, n: int = 4) -> list[str]:
    """Known zones that look like ``zone`` (for an error message): by name first (``us-californa``: US-CA,
    California), then zones of the same stem (``SE5``: SE1-SE4; ``US-CX``: US zones), then any zone."""
    import difflib

    key = normalise(zone)
    keys = sorted({"WORLD", *_countries(), *_regions()})
    names: dict[str, str] = {}
    for k, row in {**_countries(), **_regions()}.items():
        names.setdefault(row.name.lower(), k)
    words = key.lower().replace("-", " ").replace(":", " ").split()
    near = [names[m] for w in words if len(w) > 3 for m in difflib.get_close_matches(w, list(names), n=2, cutoff=0.75)]
    stem = re.match(r"[A-Z]+(?=[\d-])|[a-z]+:", key)
    if stem is not None:
        siblings = [k for k in keys if k.startswith(stem.group(0)) and k != stem.group(0).rstrip("-")]
        if re.fullmatch(r"[A-Z]+\d+", key):  # a numbered zone: every numbered sibling (SE5: SE1-SE4)
            near += sorted(k for k in siblings if re.fullmatch(stem.group(0) + r"\d+", k))
        near += difflib.get_close_matches(key, siblings, n=n, cutoff=0.4)
    near += difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
    return list(dict.fromkeys(near))[:n]


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
