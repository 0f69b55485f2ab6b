"""A small HTTP/1.1 server on asyncio streams, with h11 doing the protocol (parsing, framing, keep-alive).

carbond serves four GET endpoints of pre-rendered bytes, so a full web framework is more than it needs, and
aiohttp's server with its imports would be a large share of the daemon's resident memory (bench/optimisations.md
has the figure). h11 is the sans-I/O HTTP/1.1 state machine of the python-hyper project; this module only moves
bytes between it and the socket and enforces the limits a long-running node agent needs:

- request heads of at most ``max_head_bytes`` and ``max_headers`` fields (431 beyond), bodies of at most
  ``max_body_bytes`` (413 beyond); an error answer is followed by a short lingering close;
- a request must arrive whole within ``request_timeout_s`` of its first byte (slow clients cannot hold a
  connection open by dripping bytes); an idle keep-alive connection is closed after ``keepalive_timeout_s``;
- a response not taken by the client within ``write_timeout_s`` drops the connection;
- at most ``max_connections`` connections at once; further ones are closed at once;
- a malformed request gets the 4xx h11 names and the connection is closed; a failing handler gets a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate

import h11
import structlog

log = structlog.get_logger("carbond.http")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable[Response]]


class _Date:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        *,
        server_header: str,
        max_head_bytes: int = 8192,
        max_body_bytes: int = 4096,
        max_headers: int = 64,
        request_timeout_s: float = 10.0,
        keepalive_timeout_s: float = 30.0,
        write_timeout_s: float = 30.0,
        max_connections: int = 256,
    ) -> None:
        self._handler = handler
        self._server_header = server_header.encode()
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._max_headers = max_headers
        self._request_timeout = request_timeout_s
        self._keepalive_timeout = keepalive_timeout_s
        self._write_timeout = write_timeout_s
        self._max_connections = max_connections
        self._date = _Date()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._refused = 0

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(
            self._accept,
            host or None,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=self._request_timeout if ssl_context else None,
            reuse_address=True,
            limit=self._max_head,
        )

    async def close(self) -> None:
        """Stop listening and drop the open connections (a scrape in flight is cut short)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            self._refused += 1
            if self._refused == 1 or self._refused % 1000 == 0:
                log.warning("http_connections_refused", limit=self._max_connections, refused_total=self._refused)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
            # flush what drain() left in the buffer (a large body to an HTTP/1.0 client), then FIN
            writer.close()
            async with asyncio.timeout(self._write_timeout):
                await writer.wait_closed()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            writer.transport.abort()  # the client went away or was too slow: nothing to tell it
        except asyncio.CancelledError:  # close(): the task ends here (asyncio logs a cancelled connection task)
            writer.transport.abort()
        except Exception as exc:  # a bug here must cost one connection, never the daemon
            log.error("http_connection_failed", error=repr(exc))
            writer.transport.abort()
        finally:
            self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        while True:
            try:
                request = await self._read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(conn, writer, Response(status, f"{exc}\n".encode()), head=False, close=True)
                    await self._linger(reader)
                return
            if request is None:
                return
            try:
                response = await self._handler(request)
            except Exception as exc:
                log.error("http_handler_failed", path=request.path, error=repr(exc))
                response = Response(500, b"internal error\n")
            await self._send(conn, writer, response, head=request.method == "HEAD", close=False)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 decided the connection cannot be reused (HTTP/1.0, Connection: close, ...)
            conn.start_next_cycle()

    async def _linger(self, reader: asyncio.StreamReader, limit: int = 1 << 16) -> None:
        """Read (and drop) what the client still sends, for up to a second: closing with unread input would
        reset the connection and could destroy the error response before the client reads it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while limit > 0 and (left := end - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(limit), left)
            except TimeoutError:
                return
            if not data:
                return
            limit -= len(data)

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        """The next whole request (its body read and dropped); None when the client closed or went idle."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set at the first byte of a request
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None and (request is not None or conn.trailing_data[0]):
                    deadline = loop.time() + self._request_timeout
                timeout = self._keepalive_timeout if deadline is None else deadline - loop.time()
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):  # cheaper than wait_for: no task per read
                        data = await reader.read(65536)
                except TimeoutError:
                    if deadline is None:
                        return None  # idle keep-alive connection
                    raise h11.RemoteProtocolError("request not received in time", error_status_hint=408) from None
                if deadline is None and data:
                    deadline = loop.time() + self._request_timeout
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                if len(event.headers) > self._max_headers or _head_size(event) > self._max_head:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self._max_body:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return _request(request)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # PAUSED cannot happen: the cycle is restarted after each response
                return None

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, r: Response, *, head: bool, close: bool
    ) -> None:
        headers = [
            (b"Content-Type", r.content_type.encode()),
            (b"Content-Length", str(len(r.body)).encode()),
            (b"Date", self._date()),
            (b"Server", self._server_header),
        ]
        headers += [(k.encode(), v.encode()) for k, v in r.headers]
        if close:
            headers.append((b"Connection", b"close"))
        out = conn.send(h11.Response(status_code=r.status, headers=headers))
        assert out is not None
        chunks = [out]
        if r.body and not head:  # a HEAD response has no body, only its length
            chunks.append(conn.send(h11.Data(data=r.body)) or b"")
        chunks.append(conn.send(h11.EndOfMessage()) or b"")
        writer.write(b"".join(chunks))
        if writer.transport.get_write_buffer_size():  # the usual scrape went straight to the socket
            async with asyncio.timeout(self._write_timeout):
                await writer.drain()


def _request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:  # h11 gives names lower-cased
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    return Request(event.method.decode("latin-1"), target.partition("?")[0], headers)


def _head_size(event: h11.Request) -> int:
    """The size of the request head as sent, near enough (h11 bounds only a head that arrives in pieces)."""
    return len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in event.headers)
