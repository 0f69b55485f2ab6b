"""The HTTP side: /metrics, /healthz, /readyz and a small index page (served by ``carbond.exporter.http``).

A scrape never touches hardware or the network: it serves bytes rendered once per snapshot (per format and
encoding), from a private registry. The HTTP server's own counters (connections evicted and refused, TLS handshakes
timed out, logins refused by reason) are rendered with each snapshot, so they are as fresh as the last tick.
"""

from __future__ import annotations

import gzip
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from carbond import __version__
from carbond.exporter.cgroup_lines import CgroupLines, render_om, render_text
from carbond.exporter.channel import raise_fd_limit
from carbond.exporter.collector import head_families, tail_families
from carbond.exporter.families import HTTP_EVICTED, HTTP_LOGINS_REFUSED, HTTP_REFUSED, HTTP_TLS_TIMEOUTS
from carbond.exporter.family import to_metric
from carbond.exporter.http import DEFAULT_MAX_CONNECTIONS, HttpServer, Request, Response
from carbond.exporter.listen import DEFER_ACCEPT_S
from carbond.model import Snapshot

if TYPE_CHECKING:
    from carbond.exporter.live import LiveWebConfig

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

INDEX_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>carbond</title></head>
<body><h1>carbond {version}</h1>
<p>Energy and carbon footprint of this machine's computing.</p>
<ul><li><a href="metrics">/metrics</a> (Prometheus)</li><li><a href="healthz">/healthz</a></li>
<li><a href="readyz">/readyz</a></li></ul></body></html>
"""


#: The fastest level: the compression runs on the event loop, in the first gzip scrape after a tick, while other
#: scrapes wait, and the exposition's repeated label sets compress well at any level (level 1 against the default 6
#: is measured in bench/optimisations.md).
GZIP_LEVEL = 1


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value.strip()), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


def wants_openmetrics(accept: str) -> bool:
    """OpenMetrics when the client lists it with a quality above zero and not below the text format's (text/plain,
    text/*, */*), as Prometheus's Accept header does; ``q=0`` refuses it."""
    om = text = 0.0
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media == "application/openmetrics-text":
            om = max(om, _quality(params))
        elif media in ("text/plain", "text/*", "*/*"):
            text = max(text, _quality(params))
    return om > 0 and om >= text


Part = Callable[[Snapshot], Iterator[Metric]]


class _Families(Collector):
    """Yields some of the families of the snapshot being rendered."""

    def __init__(self, part: Part, extra: Part | None = None) -> None:
        self._part, self.extra = part, extra
        self.snap: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snap is not None:
            yield from self._part(self.snap)
            if self.extra is not None:
                yield from self.extra(self.snap)


def server_families(server: HttpServer, web: LiveWebConfig | None) -> Part:
    """The families of the HTTP server's counters, for :class:`MetricsCache`'s ``extra``."""

    def families(snap: Snapshot) -> Iterator[Metric]:
        host = snap.host
        yield to_metric(HTTP_EVICTED, host, [((lim,), server.evicted[lim]) for lim in ("connections", "handshakes")])
        yield to_metric(HTTP_REFUSED, host, [((), server.refused_total)])
        yield to_metric(HTTP_TLS_TIMEOUTS, host, [((), server.handshake_timeouts_total)])
        if web is not None:
            yield to_metric(HTTP_LOGINS_REFUSED, host, [((r,), n) for r, n in web.refused_logins().items()])

    return families


class MetricsCache:
    """Renders the exposition of a snapshot at most once per (snapshot, format, encoding).

    The families before and after the cgroup ones are rendered by prometheus_client (each part a collector of its
    own, never in a global registry); the cgroup families, thousands of samples on a busy node, by
    :class:`CgroupLines` between them.
    """

    def __init__(self, latest: Callable[[], Snapshot | None], extra: Part | None = None) -> None:
        self._latest = latest
        self._head, self._tail = _Families(head_families, extra), _Families(tail_families)
        self._cgroups = CgroupLines()
        self._snap: Snapshot | None = None  # the snapshot the cached bodies belong to (identity, not seq:
        # a reload starts a new monitor whose seq counts from 1 again)
        self._bodies: dict[tuple[bool, bool], bytes] = {}

    def set_extra(self, extra: Part) -> None:
        """Families rendered after the head ones with each snapshot (the HTTP server's counters)."""
        self._head.extra = extra

    def body(self, openmetrics: bool, gzipped: bool) -> bytes | None:
        snap = self._latest()
        if snap is None:
            return None
        if snap is not self._snap:
            self._snap, self._bodies = snap, {}
        key = (openmetrics, gzipped)
        cached = self._bodies.get(key)
        if cached is None:
            raw = self._bodies.get((openmetrics, False))
            if raw is None:
                raw = self._render(snap, openmetrics)
                self._bodies[(openmetrics, False)] = raw
            cached = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0) if gzipped else raw
            self._bodies[key] = cached
        return cached

    def _render(self, snap: Snapshot, openmetrics: bool) -> bytes:
        self._head.snap = self._tail.snap = snap  # every part from the same snapshot
        if openmetrics:  # one "# EOF" at the very end
            head, tail = render_om(self._head).removesuffix(b"# EOF\n"), render_om(self._tail)
        else:
            head, tail = render_text(self._head), render_text(self._tail)
        if not snap.cgroups:
            return head + tail
        return b"".join((head, self._cgroups.render(snap, openmetrics).encode(), tail))


#: Probes must work without credentials; they reveal nothing but liveness.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
ALLOW = (("Allow", "GET, HEAD"),)
#: None lets a request pass; otherwise the answer to give instead (401, 429).
Check = Callable[[Request], Awaitable[Response | None]]


def accepts_gzip(accept_encoding: str) -> bool:
    """gzip is listed and not refused with ``q=0``."""
    for part in accept_encoding.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower().removeprefix("q=").strip()
            return q not in ("0", "0.0", "0.00", "0.000")
    return False


class Routes:
    """Maps a request to its response: bytes from the cache, probes, the index page, 404/405/401/503."""

    def __init__(self, latest: Callable[[], Snapshot | None], check: Check | None = None) -> None:
        self._latest = latest
        self.cache = MetricsCache(latest)
        self._check = check
        self._index = INDEX_HTML.format(version=__version__).encode()

    async def __call__(self, request: Request) -> Response:
        path = request.path
        if path not in ("/", "/metrics", "/healthz", "/readyz"):
            return Response(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=ALLOW)
        if self._check is not None and path not in OPEN_PATHS:
            refused = await self._check(request)
            if refused is not None:
                return refused
        if path == "/metrics":
            return self._metrics(request)
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            if self._latest() is None:
                return Response(503, b"waiting for the first measurement\n")
            return Response(200, b"ready\n")
        return Response(200, self._index, content_type="text/html; charset=utf-8")

    def _metrics(self, request: Request) -> Response:
        om = wants_openmetrics(request.headers.get("accept", ""))
        gz = accepts_gzip(request.headers.get("accept-encoding", ""))
        body = self.cache.body(om, gz)
        if body is None:
            return Response(503, b"no measurement yet\n")
        headers = (("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")) if gz else (("Vary", "Accept-Encoding"),)
        return Response(200, body, content_type=OPENMETRICS_TYPE if om else TEXT_TYPE, headers=headers)


async def start_server(
    latest: Callable[[], Snapshot | None],
    host: str,
    port: int,
    web: LiveWebConfig | None = None,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    defer_accept_s: int = DEFER_ACCEPT_S,
) -> HttpServer:
    """Bind and serve, with the TLS, basic auth and headers of ``web`` as they are at each connection and request;
    the caller stops it with ``await server.close()``."""
    raise_fd_limit()
    routes = Routes(latest, web.check if web is not None else None)
    server = HttpServer(
        routes,
        server_header=f"carbond/{__version__}",
        max_connections=max_connections,
        defer_accept_s=defer_accept_s,
        headers=web.extra_headers if web is not None else None,
        peer_check=web.peer_allowed if web is not None else None,
    )
    routes.cache.set_extra(server_families(server, web))
    await server.start(host, port, web.tls if web is not None else None)
    return server
