"""Serve an aiohttp application on 127.0.0.1 at a free port (the fakes' common start-up)."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, str]:
    """Start ``app`` on a free loopback port; returns the runner (``cleanup()`` stops it) and the base URL."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"
