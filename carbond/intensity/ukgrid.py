"""National Grid ESO Carbon Intensity API (``intensity.ukgrid``): keyless, CC BY 4.0, Great Britain only.

- National: ``GET {base_url}/intensity`` -> ``{"data": [{"from", "to", "intensity": {"forecast", "actual",
  "index"}}]}``; ``actual`` may be null (not yet measured): the forecast is used then and the value is marked
  estimated. Zone ``GB``.
- Regional (``region_id`` 1-17 or an outward ``postcode``): ``GET {base_url}/regional/regionid/<id>`` or
  ``/regional/postcode/<pc>`` -> ``{"data": [{"regionid", "shortname", "data": [{"from", "to", "intensity":
  {"forecast", "index"}, "generationmix"}]}]}`` (forecasts only). Zone ``GB-<regionid>``.
- Forecast: ``/intensity/{from}/fw24h`` and ``/regional/intensity/{from}/fw24h/regionid/<id>`` (or
  ``.../postcode/<pc>``); regional answers have ``data`` as an object rather than a list: both are accepted.

The figures count CO2 from generation only: ``factor_type="direct"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from carbond.intensity.config import TIMEOUT_S
from carbond.intensity.http import (
    ForecastPoint,
    ProviderError,
    field,
    forecast_points,
    g_per_kwh,
    get_json,
    iso_minute,
    timestamp,
)
from carbond.model import Intensity

NAME = "ukgrid"


def _period_value(period: object, what: str) -> tuple[float, bool]:
    """(g/kWh, estimated) of one half-hour: ``actual`` when measured, else ``forecast``."""
    intensity = field(period, NAME, "intensity")
    actual = intensity.get("actual") if isinstance(intensity, dict) else None
    if actual is not None:
        return g_per_kwh(actual, NAME, f"{what}.actual"), False
    return g_per_kwh(field(intensity, NAME, "forecast"), NAME, f"{what}.forecast"), True


def _value(period: object, zone: str) -> Intensity:
    g, estimated = _period_value(period, "intensity")
    return Intensity(
        g_per_kwh=g,
        provider=NAME,
        zone=zone,
        observed_at=timestamp(field(period, NAME, "from"), NAME, "from"),
        signal="average",
        factor_type="direct",
        estimated=estimated,
        source=NAME,
    )


def parse_national(doc: object) -> Intensity:
    return _value(field(doc, NAME, "data", 0), "GB")


def _region(doc: object) -> dict[str, object]:
    data = field(doc, NAME, "data")
    region = data[0] if isinstance(data, list) and data else data
    if not isinstance(region, dict):
        raise ProviderError(NAME, "missing field data[0]")
    return region


def _zone(region: dict[str, object]) -> str:
    rid = region.get("regionid")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 < rid < 100:
        raise ProviderError(NAME, "regionid is not a region number")
    return f"GB-{rid}"


def parse_regional(doc: object) -> Intensity:
    region = _region(doc)
    return _value(field(region, NAME, "data", 0), _zone(region))


def _point(item: object) -> tuple[float, float | None, float]:
    start = timestamp(field(item, NAME, "from"), NAME, "from")
    end = timestamp(field(item, NAME, "to"), NAME, "to") if isinstance(item, dict) and "to" in item else None
    return start, end, _period_value(item, "intensity")[0]


def parse_forecast(doc: object, regional: bool) -> tuple[ForecastPoint, ...]:
    items = field(_region(doc), NAME, "data") if regional else field(doc, NAME, "data")
    return forecast_points(items, NAME, _point)


class UkGrid:
    name = NAME

    def __init__(
        self,
        base_url: str,
        region_id: int | None = None,
        postcode: str | None = None,
        timeout_s: float = TIMEOUT_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = timeout_s
        self._wall = wall_clock
        if region_id is not None:
            self._where: str | None = f"regionid/{region_id}"
        elif postcode is not None:
            self._where = f"postcode/{postcode.upper()}"
        else:
            self._where = None
        self.key = f"{NAME}:{self._where or 'national'}"

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        if self._where is None:
            return parse_national(await get_json(session, NAME, f"{self._base}/intensity", timeout_s=self._timeout))
        url = f"{self._base}/regional/{self._where}"
        return parse_regional(await get_json(session, NAME, url, timeout_s=self._timeout))

    async def fetch_forecast(self, session: aiohttp.ClientSession) -> tuple[ForecastPoint, ...]:
        start = iso_minute(self._wall())
        if self._where is None:
            url = f"{self._base}/intensity/{start}/fw24h"
        else:
            url = f"{self._base}/regional/intensity/{start}/fw24h/{self._where}"
        return parse_forecast(await get_json(session, NAME, url, timeout_s=self._timeout), self._where is not None)
