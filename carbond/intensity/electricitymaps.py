"""Electricity Maps (``intensity.electricitymaps``): average lifecycle (or direct) intensity of a zone.

- ``GET {base_url}/v3/carbon-intensity/latest?zone=<zone>`` with header ``auth-token``. Required: ``zone``,
  ``carbonIntensity``, ``datetime``; optional: ``emissionFactorType`` (lifecycle|direct, default lifecycle),
  ``isEstimated``, ``estimationMethod``, ``updatedAt``, ``createdAt``.
- ``GET {base_url}/v3/carbon-intensity/forecast?zone=<zone>`` -> ``{"forecast": [{"carbonIntensity", "datetime"}]}``
  (hourly points; plans without forecast access answer 4xx, which only leaves the forecast empty).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import aiohttp

from carbond.intensity.config import TIMEOUT_S
from carbond.intensity.http import (
    ForecastPoint,
    ProviderError,
    field,
    forecast_points,
    g_per_kwh,
    get_json,
    read_secret,
    timestamp,
)
from carbond.model import Intensity

NAME = "electricitymaps"


def parse_latest(doc: object) -> Intensity:
    zone = field(doc, NAME, "zone")
    if not isinstance(zone, str) or not zone.strip() or len(zone) > 64:
        raise ProviderError(NAME, "zone is not a zone name")
    g = g_per_kwh(field(doc, NAME, "carbonIntensity"), NAME, "carbonIntensity")
    observed = timestamp(field(doc, NAME, "datetime"), NAME)
    fields: dict[str, object] = doc if isinstance(doc, dict) else {}  # a dict: field() above checked it
    factor: Literal["lifecycle", "direct"] = "direct" if fields.get("emissionFactorType") == "direct" else "lifecycle"
    # unknown future types: the API's default, lifecycle
    return Intensity(
        g_per_kwh=g,
        provider=NAME,
        zone=zone.strip(),
        observed_at=observed,
        signal="average",
        factor_type=factor,
        estimated=fields.get("isEstimated") is True,
        source=NAME,
    )


def _point(item: object) -> tuple[float, float | None, float]:
    return (
        timestamp(field(item, NAME, "datetime"), NAME),
        None,
        g_per_kwh(field(item, NAME, "carbonIntensity"), NAME, "carbonIntensity"),
    )


def parse_forecast(doc: object) -> tuple[ForecastPoint, ...]:
    return forecast_points(field(doc, NAME, "forecast"), NAME, _point)


class ElectricityMaps:
    name = NAME

    def __init__(
        self,
        base_url: str,
        zone: str,
        token_file: Path | None = None,
        token_env: str | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._zone = zone
        self._token_file, self._token_env = token_file, token_env
        self._timeout = float(timeout_s)
        self.key = f"{NAME}:{zone}"

    def _headers(self) -> dict[str, str]:
        token = read_secret(NAME, self._token_file, self._token_env, "token")
        return {"auth-token": token} if token else {}

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        url = f"{self._base}/v3/carbon-intensity/latest"
        doc = await get_json(
            session, NAME, url, params={"zone": self._zone}, headers=self._headers(), timeout_s=self._timeout
        )
        return parse_latest(doc)

    async def fetch_forecast(self, session: aiohttp.ClientSession) -> tuple[ForecastPoint, ...]:
        url = f"{self._base}/v3/carbon-intensity/forecast"
        doc = await get_json(
            session, NAME, url, params={"zone": self._zone}, headers=self._headers(), timeout_s=self._timeout
        )
        return parse_forecast(doc)
