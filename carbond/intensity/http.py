"""What every live provider shares: one GET returning JSON, errors that never carry a secret, value checks.

Every failure becomes a :class:`ProviderError` whose message is safe to log and export: the provider's HTTP status
or the exception type, never a token, a password or a response body.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol

import aiohttp

from carbond.errors import IntensityError
from carbond.intensity.config import TIMEOUT_S
from carbond.model import Intensity

#: Values outside this range are a provider bug, not a grid (the dirtiest grids are about 1,000-1,200 g/kWh).
MAX_G_PER_KWH = 2000.0
MAX_BODY = 4 << 20


class ProviderError(IntensityError):
    """A refresh failed; ``retry_after`` is the server's Retry-After in seconds (429/503), if it sent one."""

    def __init__(self, provider: str, reason: str, *, status: int | None = None, retry_after: float | None = None):
        self.provider = provider
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{provider}: {reason}")


@dataclass(frozen=True, slots=True)
class ForecastPoint:
    starts_at: float  # epoch seconds
    ends_at: float
    g_per_kwh: float


class LiveProvider(Protocol):
    """A network provider. ``key`` names what it asks for, so a persisted value for another zone is not reused."""

    name: str
    key: str

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity: ...

    async def fetch_forecast(self, session: aiohttp.ClientSession) -> tuple[ForecastPoint, ...]: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def get_json(
    session: aiohttp.ClientSession,
    provider: str,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT_S,
) -> object:
    """GET ``url`` and decode its JSON body; ProviderError (secret-free) on any failure."""
    try:
        async with session.get(
            url,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            if resp.status >= 300:
                retry = parse_retry_after(resp.headers.get("Retry-After")) if resp.status in (429, 503) else None
                raise ProviderError(provider, f"HTTP {resp.status}", status=resp.status, retry_after=retry)
            body = await read_body(resp, MAX_BODY)
            if body is None:
                raise ProviderError(provider, f"response larger than {MAX_BODY} bytes")
    except ProviderError:
        raise
    except TimeoutError:
        raise ProviderError(provider, f"no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise ProviderError(provider, _client_error(exc)) from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ProviderError(provider, "response is not valid JSON") from None


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` bytes (read no further than that)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__  # the message of some client errors quotes request headers: keep it out


def basic_auth(username: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def read_secret(provider: str, file: Path | None, env: str | None, what: str) -> str | None:
    """The secret named by a file (re-read each time) or an environment variable; None if neither is set."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProviderError(provider, f"cannot read {what}_file {file}: {type(exc).__name__}") from None
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ProviderError(provider, f"{what}_env: ${env} is not set")
        return value.strip()
    return None


def field(doc: object, provider: str, *path: str | int) -> object:
    """``doc[path[0]][path[1]]...``; ProviderError naming the path when it is missing or of the wrong shape."""
    node = doc
    for i, part in enumerate(path):
        if isinstance(part, int):
            if not isinstance(node, list) or len(node) <= part:
                raise ProviderError(provider, f"missing field {_dotted(path[: i + 1])}")
        elif not isinstance(node, dict) or part not in node:
            raise ProviderError(provider, f"missing field {_dotted(path[: i + 1])}")
        node = node[part]  # type: ignore[index]  # checked above: a list with the index, or a dict with the key
    return node


def _dotted(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def number(value: object, provider: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProviderError(provider, f"{what} is not a number")
    try:
        result = float(value)
    except OverflowError:  # a JSON integer too large for a float
        raise ProviderError(provider, f"{what} is not finite") from None
    if not math.isfinite(result):
        raise ProviderError(provider, f"{what} is not finite")
    return result


def g_per_kwh(value: object, provider: str, what: str = "intensity", factor: float = 1.0) -> float:
    """A checked intensity: a finite number in [0, 2000] g/kWh after multiplying by ``factor``."""
    result = number(value, provider, what) * factor
    if not 0.0 <= result <= MAX_G_PER_KWH:
        raise ProviderError(provider, f"{what} {result:g} g/kWh is outside 0-{MAX_G_PER_KWH:g}")
    return result


def timestamp(value: object, provider: str, what: str = "datetime") -> float:
    """Epoch seconds of an ISO 8601 time (``2023-01-23T17:00:00.000Z``, ``2018-01-20T12:00Z``); UTC if naive."""
    if not isinstance(value, str):
        raise ProviderError(provider, f"{what} is not a string")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ProviderError(provider, f"{what} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        raise ProviderError(provider, f"{what} is out of range") from None


def iso_minute(epoch: float) -> str:
    """``2018-01-20T12:00Z``: the UK API's path format."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%MZ")


def forecast_points(
    items: object, provider: str, parse: Callable[[object], tuple[float, float | None, float]]
) -> tuple[ForecastPoint, ...]:
    """Points from a list; ``parse(item) -> (start, end | None, g)`` may raise ProviderError to skip an item.

    A missing end is the next point's start (or start + the previous spacing, else one hour).
    """
    if not isinstance(items, list):
        raise ProviderError(provider, "forecast is not a list")
    raw: list[tuple[float, float | None, float]] = []
    for item in items:
        try:
            raw.append(parse(item))
        except ProviderError:
            continue
    raw.sort(key=lambda p: p[0])
    points = []
    for i, (start, end, g) in enumerate(raw):
        if end is None:
            end = raw[i + 1][0] if i + 1 < len(raw) else start + (start - raw[i - 1][0] if i else 3600.0)
        if end > start:
            points.append(ForecastPoint(start, end, g))
    return tuple(points)
