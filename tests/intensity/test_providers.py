"""Each live provider against its loopback fake: documented shapes, units, auth, every failure mode."""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp
import pytest

from carbond.intensity.electricitymaps import ElectricityMaps
from carbond.intensity.http import ProviderError, parse_retry_after
from carbond.intensity.ukgrid import UkGrid
from carbond.intensity.watttime import TOKEN_TTL_S, WattTime
from carbond.testing.provider_fakes import FakeElectricityMaps, FakeUkGrid, FakeWattTime

pytestmark = pytest.mark.asyncio


def _token_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    return path


# ---- Electricity Maps ------------------------------------------------------------------------------------------------


async def test_electricitymaps_latest(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeElectricityMaps(token="tok", g_per_kwh=103) as fake:
        em = ElectricityMaps(fake.url, "FR", token_file=_token_file(tmp_path, "tok"))
        value = await em.fetch(session)
    assert (value.g_per_kwh, value.zone, value.provider) == (103.0, "FR", "electricitymaps")
    assert (value.signal, value.factor_type, value.estimated) == ("average", "lifecycle", True)
    assert abs(value.observed_at - time.time()) < 3700
    assert fake.requests == ["GET /v3/carbon-intensity/latest?zone=FR"]
    assert fake.headers[0]["auth-token"] == "tok"


async def test_electricitymaps_direct_factor_and_token_env(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EM_TOKEN", "from-env")
    async with FakeElectricityMaps(token="from-env") as fake:
        fake.factor_type = "direct"
        value = await ElectricityMaps(fake.url, "DE", token_env="EM_TOKEN").fetch(session)
    assert value.factor_type == "direct"
    assert value.zone == "DE"


async def test_electricitymaps_bad_token_is_an_error_without_the_token(session: aiohttp.ClientSession) -> None:
    async with FakeElectricityMaps(token="right") as fake:
        em = ElectricityMaps(fake.url, "FR", token_env="EM_WRONG")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EM_WRONG", "wrong-secret-value")
            with pytest.raises(ProviderError) as err:
                await em.fetch(session)
    assert err.value.status == 401
    assert "wrong-secret-value" not in str(err.value)


async def test_electricitymaps_forecast_points(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeElectricityMaps(token="t", forecast=[120, 90, 40, 70]) as fake:
        points = await ElectricityMaps(fake.url, "FR", _token_file(tmp_path, "t")).fetch_forecast(session)
    assert [p.g_per_kwh for p in points] == [120, 90, 40, 70]
    assert all(p.ends_at - p.starts_at == 3600 for p in points)


# ---- WattTime --------------------------------------------------------------------------------------------------------


async def test_watttime_converts_lb_per_mwh_and_is_marginal(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeWattTime(password="pw", lbs_per_mwh=1048.41) as fake:
        wt = WattTime(fake.url, "CAISO_NORTH", "carbond", password_file=_token_file(tmp_path, "pw"))
        value = await wt.fetch(session)
    assert value.g_per_kwh == pytest.approx(1048.41 * 0.45359237)
    assert value.g_per_kwh == pytest.approx(475.55, abs=0.01)
    assert (value.signal, value.factor_type, value.zone) == ("marginal", "direct", "CAISO_NORTH")
    assert fake.requests[0] == "GET /login"
    assert fake.requests[1] == "GET /v3/forecast?region=CAISO_NORTH&signal_type=co2_moer&horizon_hours=0"
    assert fake.headers[1]["Authorization"] == "Bearer wt-token-1"


async def test_watttime_logs_in_again_on_401_and_before_expiry(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    now = [1000.0]
    async with FakeWattTime(password="pw") as fake:
        wt = WattTime(fake.url, "CAISO_NORTH", "carbond", _token_file(tmp_path, "pw"), clock=lambda: now[0])
        await wt.fetch(session)
        await wt.fetch(session)
        assert wt.logins == 1  # the token is reused while valid
        fake.expire_tokens()  # revoked early: the data call answers 401
        await wt.fetch(session)
        assert wt.logins == 2
        now[0] += TOKEN_TTL_S + 1  # renewed before the server's 30 minutes run out
        await wt.fetch(session)
        assert wt.logins == 3
    assert fake.count("GET /v3/forecast") == 5  # the 401 call was retried once


async def test_watttime_bad_password_fails_without_leaking_it(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeWattTime(password="right") as fake:
        wt = WattTime(fake.url, "CAISO_NORTH", "carbond", _token_file(tmp_path, "hunter2-wrong"))
        with pytest.raises(ProviderError) as err:
            await wt.fetch(session)
    assert err.value.status == 401
    assert "hunter2" not in str(err.value)


async def test_watttime_forecast_has_5_minute_points(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeWattTime(password="pw") as fake:
        wt = WattTime(fake.url, "CAISO_NORTH", "carbond", _token_file(tmp_path, "pw"))
        points = await wt.fetch_forecast(session)
    assert len(points) == 288
    assert points[0].ends_at - points[0].starts_at == 300
    assert min(p.g_per_kwh for p in points) == pytest.approx(500 * 0.45359237)
    assert "horizon_hours=24" in fake.requests[-1]


# ---- UK carbon intensity ---------------------------------------------------------------------------------------------


async def test_ukgrid_national_actual(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid(forecast=266, actual=263) as fake:
        value = await UkGrid(fake.url).fetch(session)
    assert (value.g_per_kwh, value.zone, value.estimated) == (263.0, "GB", False)
    assert (value.factor_type, value.signal, value.provider) == ("direct", "average", "ukgrid")


async def test_ukgrid_null_actual_uses_forecast(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid(forecast=266, actual=None) as fake:
        value = await UkGrid(fake.url).fetch(session)
    assert value.g_per_kwh == 266.0
    assert value.estimated


@pytest.mark.parametrize(("kwargs", "path"), [({"region_id": 3}, "/regionid/3"), ({"postcode": "rg10"}, "/RG10")])
async def test_ukgrid_regional(session: aiohttp.ClientSession, kwargs: dict[str, object], path: str) -> None:
    async with FakeUkGrid() as fake:
        uk = UkGrid(fake.url, **kwargs)  # type: ignore[arg-type]
        value = await uk.fetch(session)
        points = await uk.fetch_forecast(session)
    assert value.g_per_kwh == 182.0
    assert value.zone == "GB-3"
    assert value.estimated
    assert fake.requests[0].endswith(path)
    assert "/fw24h/" in fake.requests[1]
    assert min(p.g_per_kwh for p in points) == 150.0


async def test_ukgrid_national_forecast(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid() as fake:
        points = await UkGrid(fake.url).fetch_forecast(session)
    assert len(points) == 48
    assert points[2].g_per_kwh == 150.0
    assert points[0].ends_at - points[0].starts_at == 1800
    assert fake.requests[0].startswith("GET /intensity/")
    assert fake.requests[0].endswith("Z/fw24h")


# ---- failures shared by every provider -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"data": []}, "missing field data[0]"),
        ({"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": None}}]}, "missing field forecast"),
        ({"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": 2500}}]}, "outside 0-2000"),
        ({"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": -1}}]}, "outside 0-2000"),
        ({"data": [{"from": "yesterday", "intensity": {"actual": 100}}]}, "not an ISO 8601 time"),
        ({"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": "100"}}]}, "not a number"),
    ],
)
async def test_bad_answers_are_errors(session: aiohttp.ClientSession, doc: object, reason: str) -> None:
    async with FakeUkGrid() as fake:
        fake.respond(doc)
        with pytest.raises(ProviderError, match=re.escape(reason)):
            await UkGrid(fake.url).fetch(session)


async def test_http_failures(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid() as fake:
        uk = UkGrid(fake.url, timeout_s=0.3)
        fake.fail(500)
        with pytest.raises(ProviderError, match="HTTP 500"):
            await uk.fetch(session)
        fake.fail(429, retry_after="120")
        with pytest.raises(ProviderError) as err:
            await uk.fetch(session)
        assert err.value.status == 429
        assert err.value.retry_after == 120.0
        fake.garbage()
        with pytest.raises(ProviderError, match="not valid JSON"):
            await uk.fetch(session)
        fake.hang(5)
        started = time.monotonic()
        with pytest.raises(ProviderError, match=r"no answer within 0\.3 s"):
            await uk.fetch(session)
        assert time.monotonic() - started < 2
        fake.respond({"data": ["x" * (5 << 20)]})
        with pytest.raises(ProviderError, match="response larger than"):
            await uk.fetch(session)
        fake.ok()
        assert (await uk.fetch(session)).g_per_kwh == 263.0


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    fake = FakeUkGrid()
    url = await fake.start()
    await fake.stop()
    with pytest.raises(ProviderError, match=r"cannot connect to 127\.0\.0\.1"):
        await UkGrid(url).fetch(session)


async def test_retry_after_forms() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
