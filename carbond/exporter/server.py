"""The HTTP side: /metrics, /healthz, /readyz and a small index page, served by aiohttp.

A scrape never touches hardware or the network: it serves bytes rendered once per snapshot (per format and
encoding), from a private registry.
"""

from __future__ import annotations

import gzip
import ssl
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format

from carbond import __version__
from carbond.exporter.collector import SnapshotCollector
from carbond.model import Snapshot

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

INDEX_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>carbond</title></head>
<body><h1>carbond {version}</h1>
<p>Energy and carbon footprint of this machine's computing.</p>
<ul><li><a href="metrics">/metrics</a> (Prometheus)</li><li><a href="healthz">/healthz</a></li>
<li><a href="readyz">/readyz</a></li></ul></body></html>
"""


def wants_openmetrics(accept: str) -> bool:
    return any(part.split(";")[0].strip() == "application/openmetrics-text" for part in accept.split(","))


class MetricsCache:
    """Renders the exposition of a snapshot at most once per (snapshot, format, encoding)."""

    def __init__(self, latest: Callable[[], Snapshot | None]) -> None:
        self._latest = latest
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(latest))
        self._snap: Snapshot | None = None  # the snapshot the cached bodies belong to (identity, not seq:
        # a reload starts a new monitor whose seq counts from 1 again)
        self._bodies: dict[tuple[bool, bool], bytes] = {}

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
                render = om_format.generate_latest if openmetrics else text_format.generate_latest
                raw = render(self._registry)
                self._bodies[(openmetrics, False)] = raw
            cached = gzip.compress(raw, compresslevel=6, mtime=0) if gzipped else raw
            self._bodies[key] = cached
        return cached


#: Probes must work without credentials; they reveal nothing but liveness.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def make_app(latest: Callable[[], Snapshot | None], basic_auth_users: dict[str, str] | None = None) -> web.Application:
    cache = MetricsCache(latest)

    async def metrics(request: web.Request) -> web.Response:
        om = wants_openmetrics(request.headers.get("Accept", ""))
        gz = "gzip" in request.headers.get("Accept-Encoding", "")
        body = cache.body(om, gz)
        if body is None:
            return web.Response(status=503, text="no measurement yet\n")
        headers = {"Content-Type": OPENMETRICS_TYPE if om else TEXT_TYPE}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if latest() is None:
            return web.Response(status=503, text="waiting for the first measurement\n")
        return web.Response(text="ready\n")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=INDEX_HTML.format(version=__version__), content_type="text/html")

    middlewares = []
    if basic_auth_users:
        from carbond.exporter.webconfig import basic_auth_middleware

        middlewares.append(basic_auth_middleware(basic_auth_users, OPEN_PATHS))
    # small bounded requests: we only serve GETs without bodies
    app = web.Application(
        client_max_size=4096,
        middlewares=middlewares,
        handler_args={"max_line_size": 4096, "max_field_size": 4096, "max_headers": 32},
    )
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Bind and serve; the caller cleans up with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    return runner
