"""Dev tool (called by :mod:`carbond.data.build_tables`): the sub-national and cloud-region intensity table.

Rows of ``region_intensity.csv`` (zone, name, g_per_kwh, factor_type, source, year; year empty when the source does
not date its figures):

- US states ``US-XX``: EPA eGRID2023 state annual CO2-equivalent total output emission rates (``STC2ERTA``: CO2, CH4
  and N2O), lb CO2e/MWh x 0.45359237 (direct: combustion at the plants), from ``upstream/egrid2023_states.json``
  (as shipped by CodeCarbon 3.3.2 on PyPI). The ``_unit``/``_source`` pseudo-rows and the national ``usa`` row are
  not zones and are skipped.
- Canadian provinces ``CA-XX``: the 2023 generation shares weighted by the per-source lifecycle factors of
  ``carbon_intensity_per_source.json``, normalised by the row total (some totals are 99.8-100.2 %). The table has
  no biomass or tidal factor: biomass takes 230 g/kWh (IPCC AR5 WG3 Annex III, lifecycle median for dedicated
  biomass), tidal the hydroelectricity factor.
- Nordic bidding zones ``SE1``-``SE4``, ``NO1``-``NO5``: Electricity Maps' yearly average for 2025 of each zone
  (lifecycle, consumption-based: imports counted), from ``upstream/electricitymaps_nordic.json`` (extracted from
  the npm package ``@tgwf/co2`` 0.19.0, which republishes Electricity Maps' yearly figures under ODbL). ``FI`` is
  one bidding zone and one country: it has no row here, so ``FI`` and ``FIN`` both give the country row.
- Other Electricity Maps sub-national zones under their own names (``US-CAL-CISO``, ``DK-DK1``, ``IT-NO`` ...):
  their 2025 yearly averages (``upstream/electricitymaps_2025_subzones.json``, same package and licence).
- Cloud regions ``aws:<region>``, ``gcp:<region>``, ``azure:<region>`` (Azure names lower-cased without spaces,
  ``West Europe`` -> ``westeurope``): Google's own 2024 figures (``google-2024``, location-based, direct) for GCP;
  every other region takes its grid zone's row, with that row's source and year (:func:`_cloud`). Cloud Carbon
  Footprint's and the ML CO2 calculator's own factors are undated and stale (aws eu-north-1 8 g/kWh against 20-36
  for Sweden's SE3 in 2024-2025) and are only used to place regions (the Azure cells that lost their ``0.``
  no longer matter).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from carbond.units import LB_PER_MWH_TO_G_PER_KWH

UPSTREAM = Path(__file__).parent / "upstream"

BIOMASS_G_PER_KWH = 230.0
PROVINCES = {
    "alberta": "AB",
    "british columbia": "BC",
    "manitoba": "MB",
    "new brunswick": "NB",
    "newfoundland and labrador": "NL",
    "northwest territories": "NT",
    "nova scotia": "NS",
    "nunavut": "NU",
    "ontario": "ON",
    "prince edward island": "PE",
    "quebec": "QC",
    "saskatchewan": "SK",
    "yukon": "YT",
}
#: Electricity Maps zone -> (carbond zone, name: the bidding zone's reference city and area).
NORDIC_ZONES = {
    "SE-SE1": ("SE1", "Luleå (northern Sweden)"),
    "SE-SE2": ("SE2", "Sundsvall (north-central Sweden)"),
    "SE-SE3": ("SE3", "Stockholm (south-central Sweden)"),
    "SE-SE4": ("SE4", "Malmö (southern Sweden)"),
    "NO-NO1": ("NO1", "Oslo (eastern Norway)"),
    "NO-NO2": ("NO2", "Kristiansand (south-western Norway)"),
    "NO-NO3": ("NO3", "Trondheim (central Norway)"),
    "NO-NO4": ("NO4", "Tromsø (northern Norway)"),
    "NO-NO5": ("NO5", "Bergen (western Norway)"),
}
NORDIC_YEAR = "2025"
#: Canadian mix keys -> keys of carbon_intensity_per_source.json (None: see the module docstring).
MIX_FACTORS = {
    "coal": "coal",
    "petroleum": "petroleum",
    "naturalGas": "natural_gas",
    "nuclear": "nuclear",
    "hydro": "hydroelectricity",
    "tidal": "hydroelectricity",
    "wind": "wind",
    "solar": "solar",
    "biomass": None,
    "other": "world_average",
}

#: Our World in Data generation keys (TWh) -> keys of carbon_intensity_per_source.json (None: biomass, see above).
#: "Other renewables excluding bioenergy" is mostly geothermal (with some wave and tidal): the geothermal factor.
OWID_MIX_FACTORS = {
    "coal_TWh": "coal",
    "gas_TWh": "natural_gas",
    "oil_TWh": "petroleum",
    "nuclear_TWh": "nuclear",
    "hydroelectricity_TWh": "hydroelectricity",
    "solar_TWh": "solar",
    "wind_TWh": "wind",
    "biofuel_TWh": None,
    "other_renewable_exc_biofuel_TWh": "geothermal",
}

Row = tuple[str, str, float, str, str, str]  # zone, name, g_per_kwh, factor_type, source, year


def ccf_tonnes(cell: str) -> float:
    """A CCF t CO2e/kWh cell in g/kWh, repairing cells that lost their leading ``0.``."""
    text = cell.strip()
    if re.fullmatch(r"0\d+", text):
        text = "0." + text
    return float(text) * 1e6


def cloud_key(provider: str, region: str) -> str:
    region = region.strip()
    if provider == "azure":
        region = region.replace(" ", "").lower()
    return f"{provider}:{region}"


def _us_states(upstream: Path) -> list[Row]:
    data = json.loads((upstream / "egrid2023_states.json").read_text(encoding="utf-8"))
    meta = data["_source"]
    if meta.get("field") != "STC2ERTA" or data["_unit"]["emissions"] != "lbs/MWh":
        raise ValueError(f"egrid2023_states.json: expected STC2ERTA in lbs/MWh, found {meta}")
    year = str(meta["year"])
    rows = []
    for name, entry in data.items():
        code = str(entry.get("regionCode", "")) if isinstance(entry, dict) else ""
        if not re.fullmatch(r"[A-Z]{2}", code):
            continue
        g = float(entry["emissions"]) * LB_PER_MWH_TO_G_PER_KWH
        rows.append((f"US-{code}", name.title(), g, "direct", f"egrid-{year}", year))
    return rows


def owid_mix_intensity(entry: Mapping[str, Any], factors: Mapping[str, Any]) -> float | None:
    """A country's lifecycle intensity from its OWID generation mix x the per-source factors (for a country whose
    OWID ``carbon_intensity`` is missing or 0); None without generation."""
    twh = {key: float(entry.get(key) or 0.0) for key in OWID_MIX_FACTORS}
    total = sum(twh.values())
    if total <= 0:
        return None
    g = 0.0
    for key, factor_key in OWID_MIX_FACTORS.items():
        factor = BIOMASS_G_PER_KWH if factor_key is None else float(factors[factor_key])
        g += twh[key] * factor
    return g / total


def _provinces(shared: Path) -> list[Row]:
    factors = json.loads((shared / "carbon_intensity_per_source.json").read_text())
    mix = json.loads((shared / "canada_energy_mix_2023.json").read_text())
    rows = []
    for name, shares in mix.items():
        total = float(shares["total"])
        g = 0.0
        for key, factor_key in MIX_FACTORS.items():
            factor = BIOMASS_G_PER_KWH if factor_key is None else float(factors[factor_key])
            g += float(shares.get(key, 0.0)) * factor
        rows.append((f"CA-{PROVINCES[name]}", name.title(), g / total, "lifecycle", "canada-mix-2023", "2023"))
    return rows


def _nordic(upstream: Path) -> list[Row]:
    zones = json.loads((upstream / "electricitymaps_nordic.json").read_text(encoding="utf-8"))["zones"]
    return [
        (zone, name, float(zones[em]["carbonIntensity"][NORDIC_YEAR]), "lifecycle", "electricitymaps", NORDIC_YEAR)
        for em, (zone, name) in NORDIC_ZONES.items()
    ]


def _em_subzones(upstream: Path) -> list[Row]:
    """Every other Electricity Maps sub-national zone (``US-CAL-CISO``, ``DK-DK1``, ``IT-NO`` ...), its 2025 yearly
    average under its Electricity Maps name."""
    data = json.loads((upstream / "electricitymaps_2025_subzones.json").read_text(encoding="utf-8"))
    year = str(data["year"])
    return [
        (zone, entry["name"], float(entry["g_per_kwh"]), "lifecycle", "electricitymaps", year)
        for zone, entry in data["zones"].items()
        if zone not in NORDIC_ZONES
    ]


#: Cities and areas CCF's tables name for a cloud region, and their grid zone (geography; Gävle is in SE3).
PLACES = {
    "gavle": "SE3",
    "brussels": "BE",
    "cardiff": "GB",
    "london": "GB",
    "england": "GB",
    "chennai": "IN",
    "mumbai": "IN",
    "pune": "IN",
    "frankfurt": "DE",
    "helsinki": "FI",
    "paris": "FR",
    "usa": "US",
    "united states": "US",
    "south korea": "KR",
    "hong kong": "HK",
}


def _place_zone(place: str, known: Mapping[str, Row], names: Mapping[str, str]) -> str | None:
    """The zone of a place name: a US state or Canadian province (by the table's names), a country, a city."""
    key = place.strip().lower()
    if not key:
        return None
    zone = PLACES.get(key) or names.get(key)
    return zone if zone and (zone in known or zone in names.values()) else None


def _cloud(shared: Path, upstream: Path, grid: Mapping[str, Row], countries: Mapping[str, Row]) -> list[Row]:
    """Cloud regions: Google's own 2024 figures for GCP; every other region (AWS, Azure, GCP regions Google does not
    list) at its grid's figure, with that figure's source and year: the Electricity Maps zone Cloud Carbon Footprint
    maps it to (``upstream/ccf_region_zones.json``), else the state, province or country its tables place it in.
    CCF's and the ML CO2 calculator's own undated factors are not used (stale: aws eu-north-1 8 g/kWh)."""
    rows: list[Row] = []
    with (shared / "gcp_region_carbon_2024.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            g = float(r["Grid carbon intensity (gCO2eq / kWh)"])
            rows.append((cloud_key("gcp", r["Google Cloud Region"]), r["Location"], g, "direct", "google-2024", "2024"))
    known = {**countries, **grid}
    names = {row[1].lower(): zone for zone, row in known.items()}
    aliases = {em: zone for em, (zone, _) in NORDIC_ZONES.items()}
    mapped = json.loads((upstream / "ccf_region_zones.json").read_text(encoding="utf-8"))
    places: dict[str, list[str]] = {}  # cloud key -> place names, most specific first
    label: dict[str, str] = {}
    for provider in ("aws", "azure", "gcp"):
        with (shared / f"ccf_grid_factors_{provider}.csv").open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader)
            for cells in reader:
                if cells:
                    key = cloud_key(provider, cells[0])
                    places.setdefault(key, []).append(cells[1])
                    label.setdefault(key, cells[1])
    with (shared / "cloud_impact_mlco2.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["provider"] in ("aws", "gcp", "azure") and r["region"]:
                key = cloud_key(r["provider"], r["region"])
                places.setdefault(key, [])[:0] = [r["state"], r["country"]]
                label.setdefault(key, r["regionName"] or r["city"] or r["country"])
    for key, where in sorted(places.items()):
        provider, _, region = key.partition(":")
        em = mapped.get(provider, {}).get(region)
        zone = aliases.get(em, em) if em else None
        if zone not in known:
            zone = next((z for p in where if (z := _place_zone(p, known, names))), None)
        if zone is None or zone not in known:
            continue
        _, _, g, factor, source, year = known[zone]
        rows.append((key, f"{label[key]} (grid {zone})", g, factor, f"{source} ({zone})", year))
    return rows


def _country_rows(path: Path) -> dict[str, Row]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {
            r["alpha2"]: (r["alpha2"], r["name"], float(r["g_per_kwh"]), "lifecycle", r["source"], r["year"])
            for r in csv.DictReader(fh)
        }


def build_regions(shared: Path, out: Path, upstream: Path = UPSTREAM) -> tuple[dict[str, int], list[str]]:
    """Write the table; returns rows per source and the repairs made."""
    fixes = []
    with (shared / "ccf_grid_factors_azure.csv").open(newline="", encoding="utf-8") as fh:
        for cells in csv.reader(fh):
            if len(cells) > 3 and re.fullmatch(r"0\d+", cells[3].strip()):
                fixes.append(f"azure {cells[0]}: {cells[3]!r} read as {ccf_tonnes(cells[3]):.0f} g/kWh")
    chosen: dict[str, Row] = {}
    for row in _us_states(upstream) + _provinces(shared) + _nordic(upstream) + _em_subzones(upstream):
        chosen.setdefault(row[0], row)  # sources are listed in precedence order
    countries = _country_rows(out.parent / "country_intensity.csv")
    for row in _cloud(shared, upstream, dict(chosen), countries):
        chosen.setdefault(row[0], row)
    counts: dict[str, int] = {}
    for row in chosen.values():
        counts[row[4]] = counts.get(row[4], 0) + 1
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["zone", "name", "g_per_kwh", "factor_type", "source", "year"])
        for zone, name, g, factor_type, source, year in sorted(chosen.values()):
            w.writerow([zone, name, f"{g:.3f}", factor_type, source, year])
    return counts, fixes
