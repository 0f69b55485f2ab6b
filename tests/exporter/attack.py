"""The issue-20 attacks on a carbond daemon run from any source tree, for before/after figures (not a test).

    .venv/bin/python -m tests.exporter.attack [SRCDIR]      # default: this checkout

SRCDIR is a carbond source tree (e.g. ``git archive <commit> | tar -x -C /tmp/old``). The daemon runs from it on
127.0.0.1 with the TDP model and its defaults. Printed: scrapes answered out of 32 while 300 idle connections, then
500 slowloris connections, are open; the daemon's RSS before, during and after 400 stalled TLS handshakes (three
rounds), and scrapes answered out of 8 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.exporter import certs
from tests.exporter.test_floods import scrape
from tests.harness.daemon import free_port
from tests.harness.wait import eventually

TMP = Path(tempfile.mkdtemp(prefix="carbond-attack-"))


def start(src: str, web: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = TMP / f"c{port}.yaml"
    text = f"sensors: [tdp]\nmeasure_power_secs: 1\nlisten_address: 127.0.0.1:{port}\nstate_dir: {TMP}/s{port}\n"
    cfg.write_text(text + (f"web: {{config_file: {web}}}\n" if web else ""))
    cmd = [sys.executable, "-m", "carbond", "run", "--config", str(cfg), "--log-format", "json"]
    with (TMP / "log").open("ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=src, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONPATH": src}
        )
    eventually(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True, ignore=(OSError,))
    return proc, port


async def flood(port: int, count: int, first: bytes = b"") -> list[asyncio.StreamWriter]:
    out = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            if first:
                writer.write(first)
            out.append(writer)
    await asyncio.sleep(0.2)
    return out


async def plain_floods(port: int) -> dict[str, int]:
    idle = await flood(port, 300)
    result = {"idle 300": sum([await scrape(port) for _ in range(32)])}
    for w in idle:
        w.transport.abort()
    await asyncio.sleep(0.5)
    slow = await flood(port, 500, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")

    async def drip() -> None:
        while True:
            for w in slow:
                if not w.transport.is_closing():
                    w.write(b"X")
            await asyncio.sleep(0.25)

    dripping = asyncio.create_task(drip())
    result["slowloris 500"] = sum([await scrape(port) for _ in range(32)])
    dripping.cancel()
    for w in slow:
        w.transport.abort()
    return result


async def stalls(port: int, pid: int, hello: bytes, client: ssl.SSLContext) -> str:
    before = psutil.Process(pid).memory_info().rss >> 20
    conns = await flood(port, 400, hello)
    await asyncio.sleep(1.0)
    peak = psutil.Process(pid).memory_info().rss >> 20
    ok = sum([await scrape(port, client) for _ in range(8)])
    for w in conns:
        w.transport.abort()
    await asyncio.sleep(2.0)
    after = psutil.Process(pid).memory_info().rss >> 20
    return f"RSS {before} -> {peak} MiB, {after} MiB after; scrapes {ok}/8"


def client_hello(client: ssl.SSLContext) -> bytes:
    out = ssl.MemoryBIO()
    obj = client.wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def main(src: str) -> None:
    proc, port = start(src)
    try:
        print(f"{src}: scrapes of 32 under", asyncio.run(plain_floods(port)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    pair = certs.self_signed(TMP, "server")
    web = TMP / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pair.cert}\n  key_file: {pair.key}\n")
    client = ssl.create_default_context(cafile=str(pair.cert))
    proc, port = start(src, web)
    try:
        for i in range(3):
            print(
                f"{src}: 400 stalled TLS handshakes, round {i + 1}:",
                asyncio.run(stalls(port, proc.pid, client_hello(client), client)),
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parents[2]))
