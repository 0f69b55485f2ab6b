"""The /metrics server under cheap unauthenticated floods: idle connections, slowloris, stalled TLS handshakes.

Bounded in count (a few hundred connections) and time (seconds), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from carbond.exporter.channel import MAX_BUFFER, READ_SIZE, raise_fd_limit
from carbond.exporter.http import DEFAULT_MAX_CONNECTIONS, HttpServer, Request, Response
from carbond.exporter.server import Routes
from tests.exporter import certs
from tests.harness.snapshots import frozen_snapshot
from tests.harness.wait import eventually_async

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(autouse=True, scope="module")
def enough_descriptors() -> None:
    """The flooding client holds hundreds of sockets: a soft limit of 1024 (a CI runner's) is raised to the hard one."""
    raise_fd_limit()


@contextlib.asynccontextmanager
async def serving(tls: ssl.SSLContext | None = None, **limits: float) -> AsyncIterator[HttpServer]:
    snap = await frozen_snapshot()
    server = HttpServer(Routes(lambda: snap), server_header="test", **limits)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0, tls)
    try:
        yield server
    finally:
        await server.close()


async def scrape(port: int, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return body.startswith(b"HTTP/1.1 200 ") and b"carbond_node_power_watts" in body
    except (OSError, TimeoutError):
        return False


async def flood(port: int, count: int, first: bytes = b"") -> list[Conn]:
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if first:
            writer.write(first)
        conns.append((reader, writer))
    return conns


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.transport.abort()


def test_the_default_limit_is_far_above_the_floods_that_locked_scrapes_out() -> None:
    assert DEFAULT_MAX_CONNECTIONS >= 1024  # was 256: 300 idle connections refused every scrape


@pytest.mark.asyncio
async def test_scrapes_succeed_under_an_idle_flood_beyond_the_limit() -> None:
    async with serving(max_connections=64) as server:
        conns = await flood(server.port, 200)  # three times the limit, never a byte sent
        # the kernel hands silent connections over after the deferred accept's wait (DEFER_ACCEPT_S)
        await eventually_async(lambda: server.evicted_total >= 136, what="the idle flood past the limit")
        results = [await scrape(server.port) for _ in range(16)]
        assert all(results)
        assert len(server.connections) <= 64
        assert server.evicted_total >= 136
        close_all(conns)


@pytest.mark.asyncio
async def test_scrapes_succeed_under_a_slowloris_flood() -> None:
    async with serving(max_connections=64, request_timeout_s=5) as server:
        conns = await flood(server.port, 150, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        stop = asyncio.Event()

        async def drip() -> None:  # each connection sends one more header byte every 0.2 s
            while not stop.is_set():
                for _, writer in conns:
                    if not writer.transport.is_closing():
                        writer.write(b"X")
                await asyncio.sleep(0.2)

        dripping = asyncio.create_task(drip())
        results = await asyncio.gather(*(scrape(server.port) for _ in range(16)))
        stop.set()
        await dripping
        assert all(results)
        close_all(conns)


@pytest.mark.asyncio
async def test_a_flood_of_served_connections_held_open_does_not_evict_a_new_scrape() -> None:
    """Clients that each complete a request and then hold their connection: a scrape's new connection, the
    youngest, is never the one evicted for the next attacker."""
    async with serving(max_connections=32) as server:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        holders = await flood(server.port, 32, request)
        stop = asyncio.Event()

        async def more() -> None:  # keeps arriving while the scrapes run
            while not stop.is_set():
                holders.extend(await flood(server.port, 4, request))

        arriving = asyncio.create_task(more())
        results = [await scrape(server.port) for _ in range(16)]
        stop.set()
        await arriving
        assert all(results)
        assert server.evicted_total > 0
        close_all(holders)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext, bytes]:
    """Server context, client context and a ClientHello to replay."""
    tmp = tmp_path_factory.mktemp("tls")
    pair = certs.self_signed(tmp, "server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pair.cert, pair.key)
    client = ssl.create_default_context(cafile=str(pair.cert))
    out = ssl.MemoryBIO()
    obj = client.wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return server, client, out.read()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.asyncio
async def test_stalled_tls_handshakes_are_counted_bounded_and_timed_out(
    tls_files: tuple[ssl.SSLContext, ssl.SSLContext, bytes],
) -> None:
    server_ctx, client_ctx, hello = tls_files
    async with serving(max_connections=600, max_handshakes=64, handshake_timeout_s=1.5, tls=server_ctx) as server:
        assert await scrape(server.port, client_ctx)
        before = rss_kib()
        conns = await flood(server.port, 400, hello)  # each stops after its ClientHello
        await eventually_async(
            lambda: server.evicted_total >= 400 - 64 and len(server.connections) <= 64, what="400 handshakes begun"
        )
        # counted before any handshake completes; OpenSSL state for at most 64 of them, the oldest evicted
        assert len(server.connections) == 64
        assert all(c.handshaking for c in server.connections)
        assert server.evicted_total == 400 - 64
        grown_mib = (rss_kib() - before) / 1024
        assert grown_mib < 40, f"{grown_mib:.0f} MiB for 400 stalled handshakes"
        assert await scrape(server.port, client_ctx)  # a real client still gets through
        # past the handshake timeout the stalled ones are gone
        await eventually_async(lambda: not server.connections, what="stalled handshakes timed out")
        close_all(conns)


@pytest.mark.asyncio
async def test_clients_that_never_read_their_answers_cannot_fill_the_server() -> None:
    """A slow-read flood: each asks for a large body and never reads it; new clients are still served."""
    big = b"x" * (4 << 20)

    async def handler(request: Request) -> Response:
        return Response(200, big if request.path == "/big" else b"ok\n")

    server = HttpServer(handler, server_header="test", max_connections=16)
    await server.start("127.0.0.1", 0)
    try:
        hogs = await flood(server.port, 16, b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"\r\n\r\nok\n")
            writer.close()
        assert server.refused_total == 0
        close_all(hogs)
    finally:
        await server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("stall_s", "reads"), [(1.0, 1), (0.3, 10)], ids=["burst", "long-answer"])
async def test_an_answer_being_taken_is_not_cut_by_a_burst_of_new_connections(stall_s: float, reads: int) -> None:
    """A scrape whose large body is in flight (its client reads it steadily through a small window) while new
    connections arrive faster than ``fresh_s``: the young ones go, the answer completes. It used to be the first
    victim (a served connection went before young ones), its client reset mid-body. ``long-answer``: an answer
    flowing for longer than ``stall_s`` when the server first looks at it was judged by the time it began, as
    if its client had taken nothing, and cut; the first look now counts as progress."""
    body = b"y" * (6 << 20)

    async def handler(request: Request) -> Response:
        return Response(200, body)

    # defer_accept_s=0: the burst's silent connections reach the server while the answer is in flight
    server = HttpServer(
        handler, server_header="test", max_connections=8, fresh_s=30.0, stall_s=stall_s, defer_accept_s=0
    )
    await server.start("127.0.0.1", 0)
    crowd: list[Conn] = []
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # the answer stays in flight for a while
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        for _ in range(reads):  # steady reading, for longer than stall_s in the long-answer case
            got += await reader.read(65536)
            await asyncio.sleep(0.05)
        crowd = await flood(server.port, 24)  # 16 over the limit, all younger than fresh_s
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
            got += chunk
        writer.close()
        assert got.endswith(b"\r\n\r\n" + body)
        assert server.evicted_total >= 16
    finally:
        close_all(crowd)
        await server.close()


@contextlib.asynccontextmanager
async def slow_readers(
    handler: Callable[[Request], Awaitable[Response]], count: int, **limits: float
) -> AsyncIterator[tuple[HttpServer, list[socket.socket], int]]:
    """A server of ``handler``, ``count`` clients with a 4 KiB receive window that each send a GET and never read,
    and this process's RSS (KiB) just before they connected."""
    server = HttpServer(handler, server_header="test", **limits)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        before = rss_kib()
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield server, socks, before
    finally:
        for sock in socks:
            sock.close()
        await server.close()


@pytest.mark.asyncio
async def test_clients_that_never_read_a_large_answer_hold_a_slice_of_it_not_a_copy() -> None:
    """16 clients ask for an 8 MiB body and never read: the body was joined with its head (a copy) and what the
    socket did not take copied again into the transport's buffer, 98 MiB in all. Written in slices as the client
    takes them, a connection holds at most a slice beyond the high-water mark."""
    body = b"z" * (8 << 20)

    async def handler(request: Request) -> Response:
        return Response(200, body)

    async with slow_readers(handler, 16, max_connections=64, write_timeout_s=20.0) as (server, _, before):
        await eventually_async(
            lambda: len(server.connections) == 16 and all(c.unacked() > 0 for c in server.connections),
            what="16 answers written and not taken",
        )
        grown_mib = (rss_kib() - before) / 1024
        assert grown_mib < 16, f"{grown_mib:.0f} MiB for 16 clients that do not read"


@pytest.mark.asyncio
async def test_bytes_a_client_pipelines_while_it_waits_are_bounded_per_connection() -> None:
    """While an answer is being made, 64 clients each push 512 KiB more. asyncio read up to 256 KiB at a time past
    the input bound (64 KiB): 132 KiB a connection were held here, 9 MiB in all. Reads of 16 KiB up to a 32 KiB
    bound hold at most 48 KiB."""
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        await release.wait()
        return Response(200, b"ok\n")

    try:
        async with slow_readers(handler, 64, max_connections=128) as (server, socks, before):
            junk = b"j" * (512 << 10)
            for sock in socks:
                with contextlib.suppress(BlockingIOError):
                    sock.send(junk)
            # each connection read up to its bound and stopped reading (what it holds is what is measured)
            await eventually_async(
                lambda: (
                    len(server.connections) == 64 and all(c.busy and c.held() > MAX_BUFFER for c in server.connections)
                ),
                what="64 connections holding their bound of unread input",
            )
            grown_mib = (rss_kib() - before) / 1024
            held = max(c.held() for c in server.connections)
            assert held <= MAX_BUFFER + READ_SIZE, f"{held} bytes of unread input held by one connection"
            assert grown_mib < 8, f"{grown_mib:.1f} MiB of unread input for 64 clients"
    finally:
        release.set()
