"""Loopback fakes of the grid-intensity APIs and of cloud instance metadata, serving their documented JSON shapes.

Each fake listens on 127.0.0.1 (a free port), records every request, checks credentials like the real service, and
can be told to misbehave: ``fail(status, retry_after)``, ``hang()``, ``garbage()``, ``respond(doc)`` (any JSON, for
missing fields and absurd values), ``ok()`` to recover. Values are plain attributes, changed between refreshes.

    async with FakeElectricityMaps(token="t", g_per_kwh=103) as em:
        ... base_url=em.url ...

For a client in another process (the real daemon), :class:`FakeInThread` serves a fake from an event loop of its
own in a background thread and runs every change on that loop:

    with FakeInThread(FakeElectricityMaps(token="t")) as em:
        ... Daemon(tmp, {"intensity": {"electricitymaps": {"base_url": em.url}}}) ...
        em.fail(500)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, ParamSpec, Self, TypeVar

from aiohttp import web

from carbond.testing.loopback import serve

Handler = Any


def iso(epoch: float, millis: bool = True) -> str:
    when = datetime.fromtimestamp(epoch, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z") if millis else when.strftime("%Y-%m-%dT%H:%MZ")


class _FakeServer:
    def __init__(self) -> None:
        self.url = ""
        self.requests: list[str] = []  # method + path and query of each request, in order
        self.headers: list[dict[str, str]] = []
        self._status: int | None = None
        self._retry_after: str | None = None
        self._hang_s = 0.0
        self._garbage = False
        self._doc: Any = None
        self._runner: web.AppRunner | None = None

    # ---- behaviour -------------------------------------------------------------------------------------------------

    def ok(self) -> None:
        self._status, self._retry_after, self._hang_s, self._garbage, self._doc = None, None, 0.0, False, None

    def fail(self, status: int = 500, retry_after: str | None = None) -> None:
        self.ok()
        self._status, self._retry_after = status, retry_after

    def hang(self, seconds: float = 3600.0) -> None:
        self.ok()
        self._hang_s = seconds

    def garbage(self) -> None:
        self.ok()
        self._garbage = True

    def respond(self, doc: Any) -> None:
        """Answer every data request with this JSON document (login and auth checks still apply)."""
        self.ok()
        self._doc = doc

    def count(self, fragment: str) -> int:
        return sum(fragment in r for r in self.requests)

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        if self._hang_s:
            await asyncio.sleep(self._hang_s)
        if self._status is not None:
            headers = {"Retry-After": self._retry_after} if self._retry_after is not None else {}
            return web.json_response({"error": "fake failure"}, status=self._status, headers=headers)
        if self._garbage:
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="application/json")
        if self._doc is not None:
            return web.json_response(self._doc)
        return None

    def _wrap(self, handler: Handler, data: bool = True) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.requests.append(f"{request.method} {request.rel_url}")
            self.headers.append(dict(request.headers))
            denied = self._auth(request)
            if denied is not None:
                return denied
            if data:
                bad = await self._misbehave(request)
                if bad is not None:
                    return bad
            result: web.StreamResponse = await handler(request)
            return result

        return wrapped

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        return None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    # ---- life cycle ------------------------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        self.routes(app)
        self._runner, self.url = await serve(app, shutdown_timeout=0.1)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class FakeElectricityMaps(_FakeServer):
    """``/v3/carbon-intensity/latest`` and ``/forecast`` behind the ``auth-token`` header."""

    def __init__(self, token: str = "em-secret-token", g_per_kwh: float = 103.0, forecast: list[float] | None = None):
        super().__init__()
        self.token = token
        self.g_per_kwh = g_per_kwh
        self.factor_type = "lifecycle"
        #: hourly values from the current hour on
        self.forecast = forecast if forecast is not None else [120, 110, 95, 60, 80, 100] + [130] * 18

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("auth-token") != self.token:
            return web.json_response({"message": "Invalid auth-token"}, status=401)
        return None

    async def _latest(self, request: web.Request) -> web.StreamResponse:
        zone = request.query.get("zone", "")
        hour = time.time() // 3600 * 3600
        return web.json_response(
            {
                "zone": zone,
                "carbonIntensity": self.g_per_kwh,
                "datetime": iso(hour),
                "updatedAt": iso(time.time()),
                "createdAt": iso(hour - 86400),
                "emissionFactorType": self.factor_type,
                "isEstimated": True,
                "estimationMethod": "TIME_SLICER_AVERAGE",
            }
        )

    async def _forecast(self, request: web.Request) -> web.StreamResponse:
        hour = time.time() // 3600 * 3600
        points = [{"carbonIntensity": v, "datetime": iso(hour + 3600 * i)} for i, v in enumerate(self.forecast)]
        return web.json_response({"zone": request.query.get("zone", ""), "forecast": points, "updatedAt": iso(hour)})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v3/carbon-intensity/latest", self._wrap(self._latest))
        app.router.add_get("/v3/carbon-intensity/forecast", self._wrap(self._forecast))


class FakeWattTime(_FakeServer):
    """``/login`` (HTTP Basic -> token) and ``/v3/forecast`` (Bearer); values in lbs_co2_per_mwh."""

    def __init__(self, username: str = "carbond", password: str = "wt-secret-password", lbs_per_mwh: float = 1048.41):
        super().__init__()
        self.username, self.password = username, password
        self.lbs_per_mwh = lbs_per_mwh
        self.tokens: set[str] = set()
        self._serial = itertools.count(1)
        self.forecast = [900.0] * 12 + [500.0] * 6 + [900.0] * 270  # 5-minute points: lowest 1 h from now

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 401, as after the 30 minutes of validity."""
        self.tokens.clear()

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/login":
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if request.headers.get("Authorization") != f"Basic {expected}":
                return web.json_response({"error": "bad credentials"}, status=401)
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return web.json_response({"error": "invalid or expired token"}, status=401)
        return None

    async def _login(self, request: web.Request) -> web.StreamResponse:
        token = f"wt-token-{next(self._serial)}"
        self.tokens.add(token)
        return web.json_response({"token": token})

    async def _forecast(self, request: web.Request) -> web.StreamResponse:
        region = request.query.get("region", "")
        horizon = int(request.query.get("horizon_hours", "0") or 0)
        start = time.time() // 300 * 300
        values = [self.lbs_per_mwh] if horizon == 0 else self.forecast[: horizon * 12]
        data = [{"point_time": iso(start + 300 * i), "value": v} for i, v in enumerate(values)]
        meta = {
            "region": region,
            "signal_type": request.query.get("signal_type", "co2_moer"),
            "units": "lbs_co2_per_mwh",
            "data_point_period_seconds": 300,
            "model": {"date": "2023-03-01", "type": "binned_regression"},
            "generated_at_period_seconds": 300,
            "generated_at": iso(start),
            "warnings": [],
        }
        return web.json_response({"data": data, "meta": meta})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/login", self._wrap(self._login, data=False))
        app.router.add_get("/v3/forecast", self._wrap(self._forecast))


class FakeUkGrid(_FakeServer):
    """The keyless national and regional endpoints, with half-hourly forecasts."""

    def __init__(self, forecast: float = 266.0, actual: float | None = 263.0):
        super().__init__()
        self.forecast_value, self.actual = forecast, actual
        self.regional_forecast = 182.0
        self.forecast = [300.0, 280.0, 150.0] + [320.0] * 45  # half-hours from the current one

    @staticmethod
    def _half_hour() -> float:
        return time.time() // 1800 * 1800

    def _period(self, start: float, forecast: float, actual: float | None, regional: bool) -> dict[str, Any]:
        intensity: dict[str, Any] = {"forecast": forecast, "index": "moderate"}
        if not regional:
            intensity["actual"] = actual
        period: dict[str, Any] = {"from": iso(start, False), "to": iso(start + 1800, False), "intensity": intensity}
        if regional:
            period["generationmix"] = [{"fuel": "gas", "perc": 43.6}, {"fuel": "wind", "perc": 24.1}]
        return period

    def _region(self, request: web.Request, periods: list[dict[str, Any]]) -> dict[str, Any]:
        rid = int(request.match_info.get("rid", "3"))
        out: dict[str, Any] = {
            "regionid": rid,
            "dnoregion": "Electricity North West",
            "shortname": "North West England",
        }
        if "postcode" in request.match_info:
            out["postcode"] = request.match_info["postcode"]
        out["data"] = periods
        return out

    async def _national(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [self._period(self._half_hour(), self.forecast_value, self.actual, False)]})

    async def _regional(self, request: web.Request) -> web.StreamResponse:
        period = self._period(self._half_hour(), self.regional_forecast, None, True)
        return web.json_response({"data": [self._region(request, [period])]})

    def _points(self, regional: bool) -> list[dict[str, Any]]:
        start = self._half_hour()
        return [self._period(start + 1800 * i, v, None, regional) for i, v in enumerate(self.forecast)]

    async def _fw24h(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": self._points(False)})

    async def _regional_fw24h(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": self._region(request, self._points(True))})  # an object, as upstream

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/intensity", self._wrap(self._national))
        app.router.add_get("/regional/regionid/{rid}", self._wrap(self._regional))
        app.router.add_get("/regional/postcode/{postcode}", self._wrap(self._regional))
        app.router.add_get("/intensity/{start}/fw24h", self._wrap(self._fw24h))
        app.router.add_get("/regional/intensity/{start}/fw24h/regionid/{rid}", self._wrap(self._regional_fw24h))
        app.router.add_get("/regional/intensity/{start}/fw24h/postcode/{postcode}", self._wrap(self._regional_fw24h))


class FakeMetadata(_FakeServer):
    """One cloud's instance metadata service (``aws`` IMDSv2, ``gcp``, ``azure``) with the real header checks."""

    def __init__(self, cloud: str, region: str) -> None:
        super().__init__()
        self.cloud, self.region = cloud, region

    async def _aws_token(self, request: web.Request) -> web.StreamResponse:
        if self.cloud != "aws" or not request.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return web.Response(status=400 if self.cloud == "aws" else 404)
        return web.Response(text="imds-token")

    async def _aws_region(self, request: web.Request) -> web.StreamResponse:
        if self.cloud != "aws" or request.headers.get("X-aws-ec2-metadata-token") != "imds-token":
            return web.Response(status=401 if self.cloud == "aws" else 404)
        return web.Response(text=self.region)

    async def _gcp_zone(self, request: web.Request) -> web.StreamResponse:
        if self.cloud != "gcp" or request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403 if self.cloud == "gcp" else 404)
        return web.Response(text=f"projects/123456789/zones/{self.region}-b")

    async def _azure_location(self, request: web.Request) -> web.StreamResponse:
        if self.cloud != "azure" or request.headers.get("Metadata") != "true":
            return web.Response(status=400 if self.cloud == "azure" else 404)
        return web.Response(text=self.region)

    def routes(self, app: web.Application) -> None:
        app.router.add_put("/latest/api/token", self._wrap(self._aws_token))
        app.router.add_get("/latest/meta-data/placement/region", self._wrap(self._aws_region))
        app.router.add_get("/computeMetadata/v1/instance/zone", self._wrap(self._gcp_zone))
        app.router.add_get("/metadata/instance/compute/location", self._wrap(self._azure_location))


F = TypeVar("F", bound=_FakeServer)
P = ParamSpec("P")
T = TypeVar("T")


class FakeInThread(Generic[F]):
    """``fake`` served from its own event loop in a daemon thread; every method is safe to call from any thread.

    ``ok()``, ``fail()``, ``hang()``, ``garbage()``, ``respond()``, ``count()`` and ``set(attr=value)`` run on the
    fake's loop and wait for it; ``call(fn, ...)`` runs anything else there. ``stop()`` closes the listener (the
    client sees connection refused), as does leaving the ``with`` block, which also ends the thread.
    """

    def __init__(self, fake: F, timeout_s: float = 10.0) -> None:
        self.fake = fake
        self.url = ""
        self._timeout = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{type(fake).__name__}", daemon=True)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the fake's loop; its result (or its exception) here."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    # ---- behaviour, as on the fake ---------------------------------------------------------------------------------

    def ok(self) -> None:
        self.call(self.fake.ok)

    def fail(self, status: int = 500, retry_after: str | None = None) -> None:
        self.call(self.fake.fail, status, retry_after)

    def hang(self, seconds: float = 3600.0) -> None:
        self.call(self.fake.hang, seconds)

    def garbage(self) -> None:
        self.call(self.fake.garbage)

    def respond(self, doc: Any) -> None:
        self.call(self.fake.respond, doc)

    def count(self, fragment: str) -> int:
        return self.call(self.fake.count, fragment)

    def set(self, **attrs: Any) -> None:
        """Change the fake's values (``g_per_kwh=150``); an unknown name is an AttributeError, not a silent no-op."""

        def apply() -> None:
            for name, value in attrs.items():
                if not hasattr(self.fake, name):
                    raise AttributeError(f"{type(self.fake).__name__} has no attribute {name!r}")
                setattr(self.fake, name, value)

        self.call(apply)

    # ---- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> str:
        if not self._thread.is_alive():
            self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(self._timeout)
        return self.url

    def stop(self) -> None:
        """Close the listener and its connections (a hanging request is cut off); the thread keeps running."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(self._timeout)

    def close(self) -> None:
        """Stop the fake, cancel whatever still runs on its loop, end the thread and close the loop."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(self._timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    async def _shutdown(self) -> None:
        self.fake.ok()  # no new request hangs while the server shuts down
        await self.fake.stop()
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for task in others:
            task.cancel()
        for task in others:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._loop.shutdown_asyncgens()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
