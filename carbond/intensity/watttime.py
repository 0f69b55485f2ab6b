"""WattTime (``intensity.watttime``): the **marginal** operating emissions rate (MOER) of a balancing area.

- ``GET {base_url}/login`` with HTTP Basic -> ``{"token": "..."}``, valid 30 minutes: renewed after 25 minutes and
  at once on a 401 (one retry per refresh).
- ``GET {base_url}/v3/forecast?region=<r>&signal_type=co2_moer&horizon_hours=0`` with ``Authorization: Bearer`` ->
  ``{"data": [{"point_time", "value"}], "meta": {"region", "units": "lbs_co2_per_mwh", "data_point_period_seconds"}}``.
  lb/MWh x 0.45359237 = g/kWh. The same call with ``horizon_hours=24`` gives the forecast.

Exported as ``signal="marginal"``, ``factor_type="direct"`` (MOER counts the smokestack CO2 of the marginal plant);
never used for the emissions counters unless ``intensity.signal: marginal``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from carbond.intensity.config import TIMEOUT_S
from carbond.intensity.http import (
    ForecastPoint,
    ProviderError,
    basic_auth,
    field,
    forecast_points,
    g_per_kwh,
    get_json,
    number,
    read_secret,
    timestamp,
)
from carbond.model import Intensity
from carbond.units import LB_PER_MWH_TO_G_PER_KWH

NAME = "watttime"
TOKEN_TTL_S = 25 * 60  # the API's tokens last 30 minutes: renew with a margin
#: meta.units -> factor to g/kWh; a missing unit is taken as the documented lbs_co2_per_mwh.
UNITS = {"lbs_co2_per_mwh": LB_PER_MWH_TO_G_PER_KWH, "g_co2_per_kwh": 1.0, "kg_co2_per_mwh": 1.0}


def _factor(doc: object) -> float:
    meta = doc.get("meta") if isinstance(doc, dict) else None
    units = meta.get("units", "lbs_co2_per_mwh") if isinstance(meta, dict) else "lbs_co2_per_mwh"
    if not isinstance(units, str) or units not in UNITS:
        raise ProviderError(NAME, "meta.units is not a known unit")
    return UNITS[units]


def _period(doc: object) -> float | None:
    meta = doc.get("meta") if isinstance(doc, dict) else None
    value = meta.get("data_point_period_seconds") if isinstance(meta, dict) else None
    try:
        seconds = number(value, NAME, "data_point_period_seconds")
    except ProviderError:
        return None
    return seconds if 0 < seconds <= 86_400 else None


def parse_latest(doc: object, region: str) -> Intensity:
    factor = _factor(doc)
    point = field(doc, NAME, "data", 0)
    g = g_per_kwh(field(point, NAME, "value"), NAME, "value", factor)
    observed = timestamp(field(point, NAME, "point_time"), NAME, "point_time")
    meta = doc.get("meta") if isinstance(doc, dict) else None
    zone = meta.get("region") if isinstance(meta, dict) else None
    if not isinstance(zone, str) or not zone.strip() or len(zone) > 64:
        zone = region
    return Intensity(
        g_per_kwh=g,
        provider=NAME,
        zone=zone.strip(),
        observed_at=observed,
        signal="marginal",
        factor_type="direct",
        source=NAME,
    )


def parse_forecast(doc: object) -> tuple[ForecastPoint, ...]:
    factor = _factor(doc)
    period = _period(doc)

    def point(item: object) -> tuple[float, float | None, float]:
        start = timestamp(field(item, NAME, "point_time"), NAME, "point_time")
        g = g_per_kwh(field(item, NAME, "value"), NAME, "value", factor)
        return start, (start + period if period else None), g

    return forecast_points(field(doc, NAME, "data"), NAME, point)


class WattTime:
    name = NAME

    def __init__(
        self,
        base_url: str,
        region: str,
        username: str,
        password_file: Path | None = None,
        password_env: str | None = None,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._region = region
        self._username = username
        self._password_file, self._password_env = password_file, password_env
        self._timeout = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._token_at = 0.0
        self.logins = 0
        self.key = f"{NAME}:{region}"

    async def _login(self, session: aiohttp.ClientSession) -> str:
        password = read_secret(NAME, self._password_file, self._password_env, "password") or ""
        headers = {"Authorization": basic_auth(self._username, password)}
        try:
            doc = await get_json(session, NAME, f"{self._base}/login", headers=headers, timeout_s=self._timeout)
        except ProviderError as exc:
            raise ProviderError(NAME, f"login: {exc.reason}", status=exc.status, retry_after=exc.retry_after) from None
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ProviderError(NAME, "login answered without a token")
        self.logins += 1
        self._token, self._token_at = token, self._clock()
        return token

    async def _get(self, session: aiohttp.ClientSession, horizon_hours: int) -> object:
        params = {"region": self._region, "signal_type": "co2_moer", "horizon_hours": str(horizon_hours)}
        url = f"{self._base}/v3/forecast"
        token = self._token
        if token is None or self._clock() - self._token_at >= TOKEN_TTL_S:
            token = await self._login(session)
        for attempt in (1, 2):
            try:
                headers = {"Authorization": f"Bearer {token}"}
                return await get_json(session, NAME, url, params=params, headers=headers, timeout_s=self._timeout)
            except ProviderError as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                self._token = None  # expired or revoked early: log in again, once
                token = await self._login(session)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        return parse_latest(await self._get(session, 0), self._region)

    async def fetch_forecast(self, session: aiohttp.ClientSession) -> tuple[ForecastPoint, ...]:
        return parse_forecast(await self._get(session, 24))
