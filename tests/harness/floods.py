"""Flood clients that run in a process of their own, as real clients do (in the server's own event loop a flood
starves the server it floods): scripts for ``python -c``, shared by the exporter tests and the benches."""

from __future__ import annotations

import sys

#: ``clients`` connections to 127.0.0.1:``port`` that say nothing and reconnect as soon as the server drops them
#: (evicted past ``web.max_connections``); the descriptor limit is raised to its hard limit first.
_RECONNECTING = """
import asyncio, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def client():
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", {port})
        except OSError:
            await asyncio.sleep(0.01)
            continue
        try:
            await reader.read()  # until the server drops it
        except OSError:
            pass
        writer.close()

async def main():
    await asyncio.gather(*(client() for _ in range({clients})))

asyncio.run(main())
"""


def reconnecting_flood(port: int, clients: int) -> list[str]:
    """The argv of a process holding ``clients`` silent connections to ``port``, reconnecting as they are dropped."""
    return [sys.executable, "-c", _RECONNECTING.format(port=int(port), clients=int(clients))]
