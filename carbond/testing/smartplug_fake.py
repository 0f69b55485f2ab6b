"""Loopback fakes of smart plugs' local HTTP APIs, serving their documented JSON.

- :class:`FakeShelly`: a Shelly Gen2+ switch, ``GET /rpc/Switch.GetStatus?id=N``, behind SHA-256 digest
  authentication (RFC 7616, user ``admin``, the device's id as realm) when it has a password, as the Gen2 API
  documents: an unauthenticated request gets 401 with ``WWW-Authenticate: Digest qop="auth", realm=..., nonce=...,
  algorithm=SHA-256``; a nonce stays valid for further requests with an increasing ``nc``.
- :class:`FakeTasmota`: ``GET /cm?cmnd=Status%208`` (``user``/``password`` query parameters when it has a password),
  answering ``{"StatusSNS": {"ENERGY": {"Power": W, "Total": kWh, ...}}}``.

Values are plain attributes the test changes between polls (``plug.apower = 0``, ``plug.total_wh += 5``); every
request is recorded; ``fail(status, retry_after)``, ``hang(seconds)``, ``html()`` and ``raw(text)`` make it
misbehave, ``ok()`` recovers.

    async with FakeShelly(apower=120.0, password="s3cret") as plug:
        ... host=plug.host ...
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from carbond.testing.loopback import serve

_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


def digest_params(header: str) -> dict[str, str]:
    """The ``key=value`` pairs of a Digest challenge or Authorization header."""
    return {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(header)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _FakePlug:
    def __init__(self) -> None:
        self.host = ""  # 127.0.0.1:<port>, as the sensor's config takes it
        self.url = ""
        self.requests: list[str] = []  # path and query of each request, in order
        self.authorizations: list[str] = []  # the Authorization header of each request ("" when absent)
        self._status: int | None = None
        self._retry_after: str | None = None
        self._hang_s = 0.0
        self._raw: tuple[str, str] | None = None  # (body, content type)
        self._runner: web.AppRunner | None = None

    def ok(self) -> None:
        self._status, self._retry_after, self._hang_s, self._raw = None, None, 0.0, None

    def fail(self, status: int = 503, retry_after: str | None = None) -> None:
        self.ok()
        self._status, self._retry_after = status, retry_after

    def hang(self, seconds: float = 3600.0) -> None:
        self.ok()
        self._hang_s = seconds

    def html(self) -> None:
        """A 200 with an HTML page instead of JSON (a captive portal, a proxy's error page)."""
        self.raw("<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")

    def raw(self, body: str, content_type: str = "application/json") -> None:
        self.ok()
        self._raw = (body, content_type)

    async def _misbehave(self) -> web.StreamResponse | None:
        if self._hang_s:
            await asyncio.sleep(self._hang_s)
        if self._status is not None:
            headers = {"Retry-After": self._retry_after} if self._retry_after is not None else {}
            return web.Response(status=self._status, text=f"fake failure {self._status}", headers=headers)
        if self._raw is not None:
            return web.Response(text=self._raw[0], content_type=self._raw[1])
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(str(request.rel_url))
        self.authorizations.append(request.headers.get("Authorization", ""))
        denied = self._auth(request)
        if denied is not None:
            return denied
        bad = await self._misbehave()
        if bad is not None:
            return bad
        return self._answer(request)

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        raise NotImplementedError

    def _answer(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _path(self) -> str:
        raise NotImplementedError

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get(self._path(), self._handle)
        self._runner, self.url = await serve(app, shutdown_timeout=0.1)
        self.host = self.url.removeprefix("http://")
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


def _json(doc: Any, status: int = 200) -> web.Response:
    # json.dumps writes NaN as the bare token NaN, as some firmwares do: the client must cope
    return web.Response(text=json.dumps(doc), status=status, content_type="application/json")


class FakeShelly(_FakePlug):
    """A Shelly Gen2+ switch with ``channels`` outputs; ``apower``/``total_wh`` are channel 0's (``watts``/``wh``
    lists hold every channel's)."""

    def __init__(
        self,
        apower: float = 100.0,
        total_wh: float = 1000.0,
        *,
        channels: int = 1,
        password: str | None = None,
        realm: str = "shellyplusplugs-e86bea000001",
    ) -> None:
        super().__init__()
        self.watts = [apower] * channels
        self.wh = [total_wh] * channels
        self.voltage = 230.1
        self.password = password
        self.realm = realm
        self.nonces: set[str] = set()
        self.challenges = 0  # 401s sent with a fresh nonce

    @property
    def apower(self) -> float:
        return self.watts[0]

    @apower.setter
    def apower(self, value: float) -> None:
        self.watts[0] = value

    @property
    def total_wh(self) -> float:
        return self.wh[0]

    @total_wh.setter
    def total_wh(self, value: float) -> None:
        self.wh[0] = value

    def expire_nonces(self) -> None:
        self.nonces.clear()

    def _path(self) -> str:
        return "/rpc/Switch.GetStatus"

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        if self.password is None:
            return None
        got = digest_params(request.headers.get("Authorization", "").removeprefix("Digest "))
        if got.get("nonce") in self.nonces and got.get("username") == "admin" and got.get("uri") == request.path_qs:
            ha1 = _sha256(f"admin:{self.realm}:{self.password}")
            ha2 = _sha256(f"{request.method}:{got['uri']}")
            want = _sha256(f"{ha1}:{got['nonce']}:{got.get('nc', '')}:{got.get('cnonce', '')}:auth:{ha2}")
            if got.get("response") == want and got.get("realm") == self.realm:
                return None
        nonce = secrets.token_hex(8)
        self.nonces.add(nonce)
        self.challenges += 1
        challenge = f'Digest qop="auth", realm="{self.realm}", nonce="{nonce}", algorithm=SHA-256'
        return web.Response(status=401, text="401 Unauthorized", headers={"WWW-Authenticate": challenge})

    def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            n = int(request.query.get("id", "0"))
            watts, wh = self.watts[n], self.wh[n]
        except (ValueError, IndexError):
            return _json({"code": -105, "message": f"Argument 'id', value {request.query.get('id')} not found!"}, 404)
        numeric = isinstance(watts, int | float) and watts == watts  # a test may put NaN or a string here
        amps = round(watts / self.voltage, 3) if numeric and self.voltage else 0.0
        return _json(
            {
                "id": n,
                "source": "init",
                "output": True,
                "apower": watts,
                "voltage": self.voltage,
                "freq": 50.0,
                "current": amps,
                "aenergy": {"total": wh, "by_minute": [0.0, 0.0, 0.0], "minute_ts": int(time.time()) // 60 * 60},
                "ret_aenergy": {"total": 0.0, "by_minute": [0.0, 0.0, 0.0], "minute_ts": int(time.time()) // 60 * 60},
                "temperature": {"tC": 36.2, "tF": 97.2},
            }
        )


class FakeTasmota(_FakePlug):
    """A Tasmota plug with energy monitoring; ``power`` in W, ``total_kwh`` its Total counter (lists: one value per
    channel, as multi-channel firmware reports them)."""

    def __init__(
        self,
        power: float | list[float] = 60.0,
        total_kwh: float | list[float] = 12.5,
        *,
        user: str = "admin",
        password: str | None = None,
    ) -> None:
        super().__init__()
        self.power: Any = power  # Any: a test may put a list (multi-channel firmware) or a string here
        self.total_kwh: Any = total_kwh
        self.user = user
        self.password = password

    def _path(self) -> str:
        return "/cm"

    def _auth(self, request: web.Request) -> web.StreamResponse | None:
        if self.password is None:
            return None
        if request.query.get("user") == self.user and request.query.get("password") == self.password:
            return None
        return _json({"WARNING": "Need user=<username>&password=<password>"}, 401)

    def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("cmnd", "").lower() != "status 8":
            return _json({"Command": "Unknown"})
        return _json(
            {
                "StatusSNS": {
                    "Time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "ENERGY": {
                        "TotalStartTime": "2024-01-01T00:00:00",
                        "Total": self.total_kwh,
                        "Yesterday": 0.412,
                        "Today": 0.107,
                        "Power": self.power,
                        "ApparentPower": self.power,
                        "ReactivePower": 0,
                        "Factor": 1.0,
                        "Voltage": 231,
                        "Current": 0.26,
                    },
                }
            }
        )
