"""The exporter's HTTP/1.1 server, spoken to over raw sockets: framing, keep-alive, limits and failures."""

from __future__ import annotations

import asyncio
import gzip
import logging
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from carbond.exporter.http import HttpServer, Request, Response
from carbond.exporter.server import accepts_gzip, start_server, wants_openmetrics
from tests.harness.snapshots import frozen_snapshot
from tests.harness.wait import eventually_async


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    return Response(200, f"{request.method} {request.path} {request.headers.get('x-n', '')}\n".encode())


@pytest_asyncio.fixture
async def server() -> AsyncIterator[HttpServer]:
    s = HttpServer(
        echo,
        server_header="test",
        request_timeout_s=0.5,
        keepalive_timeout_s=0.5,
        max_connections=3,
        max_body_bytes=100,
        fresh_s=0.2,
        defer_accept_s=0,  # the eviction policy on its own: a silent connection is accepted at once
    )
    await s.start("127.0.0.1", 0)
    yield s
    await s.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def at_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    return await asyncio.wait_for(reader.read(1), timeout) == b""


def get(path: str, extra: str = "", version: str = "1.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


@pytest.mark.asyncio
async def test_keep_alive_and_pipelining(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/a?q=1", "X-N: 1\r\n"))
    status, headers, body = await read_response(reader)
    assert status == 200
    assert body == b"GET /a 1\n"
    assert headers["server"] == "test"
    assert headers["date"].endswith("GMT")
    writer.write(get("/b", "X-N: 2\r\n") + get("/c", "X-N: 3\r\n"))  # two requests in one write
    assert (await read_response(reader))[2] == b"GET /b 2\n"
    assert (await read_response(reader))[2] == b"GET /c 3\n"
    writer.close()


@pytest.mark.asyncio
async def test_http10_and_connection_close_end_the_connection(server: HttpServer) -> None:
    for request in (get("/a", version="1.0"), get("/a", "Connection: close\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        status, _, body = await read_response(reader)
        assert status == 200
        assert body.startswith(b"GET /a")
        assert await at_eof(reader)
        writer.close()


@pytest.mark.asyncio
async def test_head_sends_the_length_but_no_body(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/a", method="HEAD") + get("/z"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: 9\r\n" in head  # the length of "HEAD /a \n"
    status, _, body = await read_response(reader)  # the next response follows the head at once
    assert status == 200
    assert body == b"GET /z \n"
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (get("/a", "".join(f"X-{i}: v\r\n" for i in range(70))), 431),  # too many fields
        (get("/a", "X-Big: " + "v" * 9000 + "\r\n"), 431),  # head over 8 KiB
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"x" * 500, 413),
    ],
)
async def test_bad_requests_get_a_4xx_and_the_connection_closes(
    server: HttpServer, request_bytes: bytes, status: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    got, headers, _ = await read_response(reader)
    assert got == status
    assert headers["connection"] == "close"
    assert await at_eof(reader)
    writer.close()


@pytest.mark.asyncio
async def test_a_small_body_is_read_and_dropped(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + get("/after"))
    assert (await read_response(reader))[2] == b"POST /p \n"
    assert (await read_response(reader))[2] == b"GET /after \n"
    writer.close()


@pytest.mark.asyncio
async def test_a_dripping_client_gets_408(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /a HTTP/1.1\r\nHo")
    for _ in range(4):  # a byte every 0.2 s keeps the socket busy but never finishes within 0.5 s
        await asyncio.sleep(0.2)
        try:
            writer.write(b"s")
            await writer.drain()
        except OSError:
            break  # the server has answered and closed
    status, _, _ = await read_response(reader)
    assert status == 408
    writer.close()


@pytest.mark.asyncio
async def test_idle_keep_alive_connections_are_closed(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/a"))
    assert (await read_response(reader))[0] == 200
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await at_eof(reader, timeout=5)
    assert 0.3 < loop.time() - t0 < 3  # after keepalive_timeout_s (0.5 s), not at once and not never
    writer.close()


@pytest.mark.asyncio
async def test_at_the_limit_the_oldest_idle_connection_is_evicted_not_the_new_one(server: HttpServer) -> None:
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    await eventually_async(lambda: len(server.connections) == 3, what="three connections accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # the fourth, over the limit of 3
    writer.write(get("/a"))
    assert (await read_response(reader))[0] == 200
    assert await at_eof(held[0][0])  # the oldest idle one made room
    r1, w1 = held[1]
    w1.write(get("/a"))
    assert (await read_response(r1))[0] == 200
    assert server.evicted_total == 1
    assert server.refused_total == 0
    for _, w in held:
        w.close()
    writer.close()


@pytest.mark.asyncio
async def test_a_client_that_was_served_outranks_one_that_never_sent_a_request(server: HttpServer) -> None:
    served_r, served_w = await asyncio.open_connection("127.0.0.1", server.port)
    served_w.write(get("/a"))
    assert (await read_response(served_r))[0] == 200
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]  # newer, but never asked
    await asyncio.sleep(0.3)  # past fresh_s: they had their chance to send a request
    late_r, late_w = await asyncio.open_connection("127.0.0.1", server.port)  # the fourth, over the limit of 3
    served_w.write(get("/b"))  # the keep-alive connection that was served survived the fourth connection
    assert (await read_response(served_r))[2] == b"GET /b \n"
    assert await at_eof(idle[0][0])
    for _, w in [*idle, (served_r, served_w), (late_r, late_w)]:
        w.close()


@pytest.mark.asyncio
async def test_a_new_connection_keeps_the_moment_it_needs_to_send_its_request(server: HttpServer) -> None:
    """However fast connections arrive, a new one is not the first to go: served idle ones are (an HTTP client
    retries a GET that meets a closed keep-alive connection)."""
    served = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for reader, writer in served:
        writer.write(get("/a"))
        assert (await read_response(reader))[0] == 200
    new_r, new_w = await asyncio.open_connection("127.0.0.1", server.port)  # no request yet
    other = await asyncio.open_connection("127.0.0.1", server.port)  # over the limit of 3 at once
    await eventually_async(lambda: server.evicted_total == 1, what="the fourth connection accepted")
    new_w.write(get("/new"))
    assert (await read_response(new_r))[2] == b"GET /new \n"
    assert await at_eof(served[0][0])  # the least recently used served connection made room
    for _, w in [*served, (new_r, new_w), other]:
        w.close()


@pytest.mark.asyncio
async def test_a_failing_handler_costs_one_500(server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/boom") + get("/a"))
    assert (await read_response(reader))[0] == 500
    assert (await read_response(reader))[0] == 200  # the same connection goes on
    writer.close()


@pytest.mark.asyncio
async def test_close_drops_open_connections_quietly(caplog: pytest.LogCaptureFixture) -> None:
    s = HttpServer(echo, server_header="test")
    await s.start("127.0.0.1", 0)
    conns = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(5)]
    await eventually_async(lambda: len(s.connections) == 5, what="five connections accepted")
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(s.close(), 5)
        for reader, writer in conns:  # whatever the close left to log is logged while the clients see EOF
            assert await at_eof(reader)
            writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("header", "ok"),
    [("gzip", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False), ("identity", False), ("", False)],
)
def test_accepts_gzip(header: str, ok: bool) -> None:
    assert accepts_gzip(header) is ok


@pytest.mark.asyncio
async def test_metrics_routes_over_the_wire() -> None:
    snap = await frozen_snapshot()
    server = await start_server(lambda: snap, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/metrics", "Accept-Encoding: gzip\r\n"))
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["content-encoding"] == "gzip"
        assert b"carbond_node_power_watts" in gzip.decompress(body)
        writer.write(get("/metrics", method="DELETE"))
        status, headers, _ = await read_response(reader)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        writer.close()
    finally:
        await server.close()


def test_the_machine_only_daemon_does_not_load_the_http_client() -> None:
    """aiohttp costs about 11 MB resident: the embedded defaults (static intensity) must not import it."""
    code = (
        "import asyncio, sys\n"
        "from carbond import app, cli\n"
        "from carbond.config import load\n"
        "from carbond.intensity.build import build_source\n"
        "asyncio.run(build_source(load(None).intensity, None))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl', 'multidict')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"  # after the log line of the unset zone


@pytest.mark.asyncio
async def test_a_large_body_reaches_a_closing_client_whole() -> None:
    """The connection is closed after the write buffer is flushed, not cut with the tail of the body in it."""
    big = bytes(range(256)) * 131072  # 32 MiB: more than the kernel buffers take at once

    async def handler(request: Request) -> Response:
        return Response(200, big, content_type="application/octet-stream")

    s = HttpServer(handler, server_header="test")
    await s.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(get("/", version="1.0"))
        await asyncio.sleep(0.3)  # the server is done writing long before the client reads
        status, _, body = await read_response(reader)
        assert status == 200
        assert body == big
        assert await at_eof(reader)
        writer.close()
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_absolute_form_targets_are_served_by_their_path(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get(f"http://127.0.0.1:{server.port}/a?x=1") + get("https://h/"))
    assert (await read_response(reader))[2] == b"GET /a \n"
    assert (await read_response(reader))[2] == b"GET / \n"
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["2.0", "0.9", "3.1"])
async def test_unknown_http_major_versions_get_505(server: HttpServer, version: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/a", version=version))
    status, headers, _ = await read_response(reader)
    assert status == 505
    assert headers["connection"] == "close"
    writer.close()


@pytest.mark.asyncio
async def test_content_length_with_transfer_encoding_closes_the_connection(server: HttpServer) -> None:
    """The smuggling shape: whatever the body framing meant, nothing after it is read as a request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    )
    status, headers, body = await read_response(reader)
    assert status == 200
    assert body == b"POST /p \n"
    assert headers["connection"] == "close"
    assert await at_eof(reader)
    writer.close()


@pytest.mark.asyncio
async def test_expect_100_continue_is_answered_before_the_body(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
    writer.write(b"hello")
    assert (await read_response(reader))[2] == b"POST /p \n"
    # a body over the limit is refused before the client sends it
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert (await read_response(reader))[0] == 413
    writer.close()


@pytest.mark.asyncio
async def test_status_lines_carry_reason_phrases_and_errors_never_echo_the_request(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"<script>alert(1)</script> / HTTP/1.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    assert body == b"Bad Request\n"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/a"))
    assert (await asyncio.wait_for(reader.readline(), 5)) == b"HTTP/1.1 200 OK\r\n"
    writer.close()


@pytest.mark.parametrize(
    ("accept", "om"),
    [
        ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),  # Prometheus
        ("application/openmetrics-text;q=0", False),
        ("application/openmetrics-text; q=0.0, text/plain", False),
        ("text/plain;q=0.9, application/openmetrics-text;q=0.5", False),
        ("application/openmetrics-text;q=0.5", True),
        ("text/plain", False),
        ("", False),
    ],
)
def test_openmetrics_is_negotiated_with_quality_values(accept: str, om: bool) -> None:
    assert wants_openmetrics(accept) is om
