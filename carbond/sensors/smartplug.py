"""What the whole machine draws, from the smart plugs it is plugged into (Shelly Gen2+ or Tasmota, local HTTP API).

Every plug listed in ``smartplug.plugs`` is part of the machine: each is one device (its ``name``) and the monitor
sums them as the platform, e.g. a workstation on one plug and its monitor on another. A plug that also feeds
something else (a desk lamp, a second computer) makes the figure wrong: give this machine plugs of its own.

- Shelly Gen2+: ``GET http://<host>/rpc/Switch.GetStatus?id=<channel>`` gives ``apower`` (W) and
  ``aenergy.total`` (Wh, cumulative since the plug booted). With a password the device asks for HTTP digest
  authentication with SHA-256 (RFC 7616, user ``admin``, the device id as realm): the 401's challenge is answered,
  and its nonce reused with an increasing ``nc`` until the device issues a new one.
- Tasmota: ``GET http://<host>/cm?cmnd=Status%208`` (with ``user`` and ``password`` query parameters when a password
  is set) gives ``StatusSNS.ENERGY.Power`` (W) and ``Total`` (kWh, cumulative); a list where the firmware has
  several channels.

The energy counter is used (a plug power-cycled restarts it at 0: a new baseline, never a spike, handled by the
platform frame); the power is checked (NaN, negative, above ``max_watts`` are rejected; 0 W is a plug whose load is
switched off and is accepted). Every plug is read concurrently and every one must answer: one failing fails the
poll, since a sum without one of its parts is wrong (the counters make up for the missed interval at the next
poll). 401 is an error naming the fix; 429 and 503 with ``Retry-After`` delay the next poll. These devices serve
plain HTTP only on the local network, so there is no TLS to configure.

The password comes from ``password_file`` (per plug, or the section's for all), read at start and again after a 401;
it never appears in a log line, an error or a metric (Tasmota's password travels in the URL: errors never print it).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote, urlencode

from pydantic import Field, field_validator, model_validator

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.sensors.base import Backend, Context, Sensor, Settings
from carbond.sensors.platform import Backoff, PlatformSensor, PlatformSettings, Rejected, Sample, watts

if TYPE_CHECKING:  # aiohttp and yarl are heavy (bench/results.md): imported where a smartplug sensor runs
    import aiohttp
    from yarl import URL

NAME = "smartplug"
#: A 429 without Retry-After waits this long; a Retry-After is clipped to this range.
DEFAULT_BACKOFF_S = 60.0
MAX_BACKOFF_S = 3600.0
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


class Plug(Settings):
    """One entry of ``smartplug.plugs``."""

    type: Literal["shelly", "tasmota"]
    host: Annotated[str, Field(min_length=1)]  # name or address, optionally :port (no scheme, no path)
    channel: Annotated[int, Field(ge=0, le=15)] = 0  # Shelly switch id / Tasmota energy channel
    name: str = ""  # the device name; default <type>-<host>-<channel>
    user: str = ""  # Tasmota's web user (default admin); Shelly's is always admin
    password_file: Path | None = None  # overrides the section's

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        if "/" in value or "?" in value or "@" in value:
            raise ValueError("a host name or address with an optional :port, without scheme, path or credentials")
        return value

    @property
    def device(self) -> str:
        return self.name or f"{self.type}-{self.host}-{self.channel}"


class SmartplugSettings(PlatformSettings):
    """The ``smartplug`` config section."""

    plugs: list[Plug] = Field(default_factory=list)  # every plug the machine (and only it) draws through
    password_file: Path | None = None  # the plugs' password, for those without their own

    @model_validator(mode="after")
    def _unique(self) -> SmartplugSettings:
        names = [p.device for p in self.plugs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"plugs: device names must be unique ({', '.join(dupes)}); set name")
        return self


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SensorUnavailable(NAME, f"cannot read password_file {path}: {type(exc).__name__}") from None


def retry_after(value: str | None, default: float | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), clipped; ``default`` when absent or bad."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 1.0), MAX_BACKOFF_S) if not math.isnan(seconds) else default


class Digest:
    """Client side of HTTP digest authentication (RFC 7616, qop=auth; SHA-256 as Shelly uses, MD5 also spoken)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self._challenge: dict[str, str] | None = None
        self._nc = 0

    def challenge(self, header: str) -> bool:
        """Take a 401's ``WWW-Authenticate``; False if it is not a digest challenge this client can answer."""
        if not header.lower().startswith("digest"):
            return False
        params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(header[6:])}
        if "nonce" not in params or params.get("algorithm", "MD5").upper() not in {"SHA-256", "MD5"}:
            return False
        self._challenge, self._nc = params, 0
        return True

    def header(self, password: str, method: str, uri: str) -> str | None:
        c = self._challenge
        if c is None:
            return None
        self._nc += 1
        algorithm = c.get("algorithm", "MD5")
        digest = hashlib.sha256 if algorithm.upper() == "SHA-256" else hashlib.md5

        def h(text: str) -> str:
            return digest(text.encode()).hexdigest()

        realm, nonce, nc, cnonce = c.get("realm", ""), c["nonce"], f"{self._nc:08x}", secrets.token_hex(8)
        ha1, ha2 = h(f"{self.user}:{realm}:{password}"), h(f"{method}:{uri}")
        response = h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        fields = [
            f'username="{self.user}"',
            f'realm="{realm}"',
            f'nonce="{nonce}"',
            f'uri="{uri}"',
            f"algorithm={algorithm}",
            f'response="{response}"',
            "qop=auth",
            f"nc={nc}",
            f'cnonce="{cnonce}"',
        ]
        if "opaque" in c:
            fields.append(f'opaque="{c["opaque"]}"')
        return "Digest " + ", ".join(fields)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("format", f"{what}: not a number: {value!r}"[:120])
    return float(value)


def plug_sample(power: Any, energy: Any, energy_unit_j: float, max_watts: float, where: str) -> Sample:
    """A Sample from a plug's power (W) and energy counter (in units of ``energy_unit_j`` joules)."""
    w = _number(power, f"{where} power")
    if w != 0:  # 0 W: the load is off, a real reading for a plug (the counter then stands still)
        try:
            w = watts(w, max_watts)
        except Rejected as exc:
            raise Rejected(exc.reason, f"{where}: {exc.detail}") from None
    e = _number(energy, f"{where} energy")
    if math.isnan(e) or math.isinf(e):
        raise Rejected("nan", f"{where}: energy counter {e}")
    return Sample(watts=w, energy_j=e * energy_unit_j)


class PlugClient:
    """One plug's request and the parse of its answer."""

    def __init__(self, plug: Plug, password_file: Path | None, max_watts: float) -> None:
        self.plug = plug
        self.password_file = password_file
        self.max_watts = max_watts
        self.password: str | None = None
        self.digest = Digest("admin")
        self.where = f"{plug.device} ({plug.type} at {plug.host})"

    def load_password(self) -> None:
        self.password = _read_secret(self.password_file) if self.password_file is not None else None

    def _safe(self, text: str) -> str:
        """``text`` without the password in any form (Tasmota's travels in the query string)."""
        if self.password:
            for form in {self.password, quote(self.password, safe=""), quote(self.password)}:
                text = text.replace(form, "***")
        return text

    def url(self) -> tuple[URL, str]:
        from yarl import URL

        p = self.plug
        if p.type == "shelly":
            uri = f"/rpc/Switch.GetStatus?id={p.channel}"
        else:
            query = {"cmnd": "Status 8"}
            if self.password:
                query |= {"user": p.user or "admin", "password": self.password}
            uri = "/cm?" + urlencode(query, quote_via=quote)
        return URL(f"http://{p.host}{uri}", encoded=True), uri

    async def read(self, session: aiohttp.ClientSession) -> Sample:
        import aiohttp

        try:
            status, headers, body = await self._get(session)
            shelly_auth = status == 401 and self.plug.type == "shelly" and self.password is not None
            if shelly_auth and self.digest.challenge(headers.get("WWW-Authenticate", "")):
                status, headers, body = await self._get(session)  # answer the challenge (or a new nonce) once
        except aiohttp.ClientError as exc:
            raise SensorReadError(self._safe(f"{self.where}: {type(exc).__name__}: {exc}")[:300]) from None
        return self._parse(status, headers, body)

    async def _get(self, session: aiohttp.ClientSession) -> tuple[int, Mapping[str, str], bytes]:
        url, uri = self.url()
        auth = self.digest.header(self.password, "GET", uri) if self.password and self.plug.type == "shelly" else None
        async with session.get(url, headers={"Authorization": auth} if auth else {}, allow_redirects=False) as resp:
            return resp.status, resp.headers, await resp.read()

    def _parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Sample:
        if status == 401:
            self.password = None  # read the file again before the next poll: it may hold a new password
            hint = "set password_file" if self.password_file is None else f"check the password in {self.password_file}"
            raise SensorReadError(f"{self.where}: HTTP 401 unauthorized ({hint})")
        if status in (429, 503):
            wait = retry_after(headers.get("Retry-After"), DEFAULT_BACKOFF_S if status == 429 else None)
            if wait is not None:
                raise Backoff(wait, f"{self.where}: HTTP {status}")
        if status != 200:
            raise SensorReadError(f"{self.where}: HTTP {status}")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            detail = self._safe(f"{self.where}: not JSON (an HTML error page?): {body[:60]!r}")
            raise Rejected("format", detail) from None
        return self._shelly(doc) if self.plug.type == "shelly" else self._tasmota(doc)

    def _shelly(self, doc: Any) -> Sample:
        if not isinstance(doc, dict) or not isinstance(doc.get("aenergy"), dict) or "apower" not in doc:
            raise Rejected("format", f"{self.where}: no apower/aenergy in the reply (a switch without metering?)")
        return plug_sample(doc["apower"], doc["aenergy"].get("total"), 3600.0, self.max_watts, self.where)

    def _tasmota(self, doc: Any) -> Sample:
        energy = doc.get("StatusSNS", {}).get("ENERGY") if isinstance(doc, dict) else None
        if not isinstance(energy, dict) or "Power" not in energy or "Total" not in energy:
            raise Rejected("format", f"{self.where}: no StatusSNS.ENERGY Power/Total (no energy monitoring?)")
        power, total = energy["Power"], energy["Total"]
        n = self.plug.channel
        if isinstance(power, list):
            if n >= len(power):
                raise Rejected("format", f"{self.where}: channel {n} not among {len(power)}")
            power = power[n]
            total = total[n] if isinstance(total, list) and n < len(total) else total
        elif n != 0:
            raise Rejected("format", f"{self.where}: channel {n}, but the plug reports one channel")
        return plug_sample(power, total, 3.6e6, self.max_watts, self.where)


class SmartplugSource:
    """The :class:`carbond.sensors.platform.Source` over the configured plugs."""

    name = NAME
    min_interval_s = 1.0  # plugs update their figures about once a second

    def __init__(self, settings: SmartplugSettings) -> None:
        self._settings = settings
        self._clients = [
            PlugClient(p, p.password_file or settings.password_file, settings.max_watts) for p in settings.plugs
        ]
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> str:
        if not self._clients:
            raise SensorUnavailable(NAME, "no plugs configured (smartplug.plugs)")
        for c in self._clients:
            await asyncio.to_thread(c.load_password)
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())
        return "plugs: " + ", ".join(c.where + (" with password" if c.password else "") for c in self._clients)

    async def sample(self) -> Mapping[str, Sample]:
        session = self._session
        if session is None:
            raise SensorReadError(f"{NAME}: not open")
        for c in self._clients:
            if c.password is None and c.password_file is not None:  # re-read after a 401: the password may be new
                await asyncio.to_thread(c.load_password)
        results = await asyncio.gather(*(c.read(session) for c in self._clients), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        backoffs = [r for r in failures if isinstance(r, Backoff)]
        if backoffs:
            raise max(backoffs, key=lambda b: b.seconds)
        for failure in failures:
            if isinstance(failure, TimeoutError):
                raise SensorReadError(f"{NAME}: no answer within {self._settings.timeout_s} s")
            raise failure
        return {c.plug.device: r for c, r in zip(self._clients, results, strict=True) if isinstance(r, Sample)}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def create(settings: SmartplugSettings, ctx: Context) -> Sensor:
    return PlatformSensor(SmartplugSource(settings), settings, ctx.clock, model="smart plug")


BACKEND = Backend(frozenset({"platform"}), SmartplugSettings, create)
