"""The exporter's HTTP server where a client or the load goes wrong: every connection busy (a new one is refused),
a streamed body over the limit without Content-Length, a TLS client that leaves before or during its handshake.
Each costs one connection, quietly, and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from carbond.exporter.http import HttpServer, Request, Response
from tests.exporter import certs
from tests.harness.wait import eventually, eventually_async

TIMEOUT_S = 10.0


async def read_status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT_S)
    return int(head.split()[1]), body


class Gate:
    """A handler whose ``/slow`` answers wait until the test opens the gate (each such request stays busy)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    async def __call__(self, request: Request) -> Response:
        if request.path == "/slow":
            self.waiting += 1
            await self.open.wait()
        return Response(200, f"{request.method} {request.path}\n".encode())


@contextlib.asynccontextmanager
async def serving(handler: Gate, **limits: int) -> AsyncIterator[HttpServer]:
    server = HttpServer(handler, server_header="test", **limits)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_when_every_connection_is_being_answered_a_new_one_is_refused_and_logged_once() -> None:
    gate = Gate()
    async with serving(gate, max_connections=2) as server:
        busy = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for _, writer in busy:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually_async(lambda: gate.waiting == 2 and all(c.busy for c in server.connections), TIMEOUT_S)
        with capture_logs() as logs:
            for _ in range(3):  # nothing can be evicted: each newcomer is dropped at once, before any request
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
                await shut(writer)
        assert server.refused_total == 3
        assert server.evicted_total == 0
        refused = [e for e in logs if e["event"] == "http_connection_refused"]
        assert [(e["limit"], e["refused_total"]) for e in refused] == [(2, 1)]  # the first, not one per refusal
        gate.open.set()  # the answers being made were never cut
        for reader, writer in busy:
            assert await read_status(reader) == (200, b"GET /slow\n")
            await shut(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # and there is room again
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_status(reader) == (200, b"GET /a\n")
        await shut(writer)


async def shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def chunked(*sizes: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in sizes) + b"0\r\n\r\n"


@pytest.mark.asyncio
async def test_a_streamed_body_over_the_limit_without_content_length_gets_413() -> None:
    async with serving(Gate(), max_body_bytes=100) as server:
        head = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head + chunked(60, 40) + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")  # 100 bytes: served
        assert await read_status(reader) == (200, b"POST /p\n")
        assert await read_status(reader) == (200, b"GET /after\n")
        chunk = b"3c\r\n" + b"x" * 60 + b"\r\n"  # 60 bytes
        writer.write(head + chunk + chunk)  # the second takes the body past 100 bytes; its end is never sent
        assert await read_status(reader) == (413, f"{HTTPStatus(413).phrase}\n".encode())
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""  # and the connection is closed
        await shut(writer)


# ---- TLS clients that leave early ---------------------------------------------------------------------------------


class ThreadedServer:
    """An HttpServer on its own event loop in a thread: a server stuck in a loop that never yields (what a lost
    end-of-input check in a handshake becomes) fails the test's wait instead of hanging the test's loop."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = HttpServer(Gate(), server_header="test", handshake_timeout_s=60.0)
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-under-test", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0, tls), self.loop).result(TIMEOUT_S)

    def handshakes(self) -> int:
        return sum(1 for c in list(self.server.connections) if c.handshaking)

    def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> certs.Pair:
    return certs.self_signed(tmp_path_factory.mktemp("tls"), "server")


@pytest.fixture
def tls_server(tls_pair: certs.Pair) -> Iterator[ThreadedServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_pair.cert, tls_pair.key)
    threaded = ThreadedServer(ctx)
    try:
        yield threaded
    finally:
        threaded.close()


def client_context(pair: certs.Pair) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pair.cert))


def client_hello(pair: certs.Pair) -> bytes:
    out = ssl.MemoryBIO()
    obj = client_context(pair).wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def scrape_tls(port: int, pair: certs.Pair) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
        client_context(pair).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := tls.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_closing_before_its_tls_handshake_costs_one_quiet_connection(
    tls_server: ThreadedServer, tls_pair: certs.Pair
) -> None:
    port = tls_server.server.port
    with capture_logs() as logs:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
                pass  # connected and closed without a byte
        eventually(lambda: not tls_server.server.connections, TIMEOUT_S, what="the connections dropped")
        assert scrape_tls(port, tls_pair).startswith(b"HTTP/1.1 200 ")
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


def test_a_client_closing_during_its_tls_handshake_costs_one_quiet_connection(
    tls_server: ThreadedServer, tls_pair: certs.Pair, tmp_path: Path
) -> None:
    port = tls_server.server.port
    hello = client_hello(tls_pair)
    with capture_logs() as logs:
        for cut in (len(hello), len(hello) // 2):  # the whole ClientHello (the server answered), or half of it
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
                s.sendall(hello[:cut])
                eventually(tls_server.handshakes, TIMEOUT_S, what="a handshake in progress")
                if cut == len(hello):
                    assert s.recv(5)[:1] == b"\x16"  # the server's hello: mid-handshake, waiting for the client
            eventually(lambda: not tls_server.server.connections, TIMEOUT_S, what="the connection dropped")
        assert tls_server.handshakes() == 0
        assert scrape_tls(port, tls_pair).startswith(b"HTTP/1.1 200 ")
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
