"""A small HTTP/1.1 server on asyncio, with h11 doing the protocol (parsing, framing, keep-alive).

carbond serves four GET endpoints of pre-rendered bytes, so a full web framework is more than it needs, and
aiohttp's server with its imports would be a large share of the daemon's resident memory (bench/optimisations.md
has the figure). h11 is the sans-I/O HTTP/1.1 state machine of the python-hyper project; this module moves bytes
between it and the connection (:mod:`carbond.exporter.channel`, plain or TLS) and enforces the limits a
long-running node agent needs against cheap unauthenticated clients:

- request heads of at most ``max_head_bytes`` and ``max_headers`` fields (431 beyond), bodies of at most
  ``max_body_bytes`` (413 beyond, before ``Expect: 100-continue`` is answered); an error answer is followed by a
  short lingering close, and its body is the status's reason phrase, never the client's bytes;
- a request must arrive whole within ``request_timeout_s`` of its first byte (slow clients cannot hold a
  connection open by dripping bytes); an idle connection is closed after ``keepalive_timeout_s``; a TLS handshake
  must end within ``handshake_timeout_s``;
- a response not taken by the client within ``write_timeout_s`` drops the connection;
- at most ``max_connections`` connections at once, counted from the TCP accept (before any TLS handshake), and at
  most ``max_handshakes`` TLS handshakes in progress. At the limit a new connection is not refused: the least
  useful open one is evicted instead (see :func:`carbond.exporter.channel.victim_of`), so idle or dripping
  clients cannot lock out a scraper; on Linux a connection that sends nothing is handed over by the kernel only
  after ``defer_accept_s`` (TCP_DEFER_ACCEPT), and at the limit such a silent one is closed as it is accepted,
  before a transport is made for it (the accept loop is :class:`carbond.exporter.listen.Acceptor`, not asyncio's);
- listening on ``::`` or on every address (an empty host) opens one dual-stack socket (IPv6, IPV6_V6ONLY off),
  so IPv4 clients reach it too; where the kernel has no IPv6 it falls back to IPv4's 0.0.0.0;
- counters for operators: connections evicted (by limit) and refused, TLS handshakes timed out;
- HTTP major versions other than 1 get 505; a request carrying both Content-Length and Transfer-Encoding is answered
  and its connection closed (a request smuggling shape); absolute-form targets (``GET http://host/metrics``) work.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

import h11

from carbond.exporter.channel import Channel, PlainHttpOnTls, victim_of
from carbond.exporter.listen import DEFER_ACCEPT_S, LISTEN_BACKLOG, Acceptor, dual_stack_socket
from carbond.logs import get_logger

log = get_logger("carbond.http")

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_HANDSHAKES = 128
#: Bytes of an answer handed to the transport at a time (its default high-water mark is 64 KiB).
WRITE_SLICE = 1 << 16
#: Seconds a new connection has to send its request (or finish its handshake) before it is the first to go.
FRESH_S = 1.0
#: Seconds without the client taking any of its answer after which a connection receiving one may be evicted.
STALL_S = 1.0
#: What a plain-HTTP client gets on a TLS port (HTTP/1.0 and closed, whatever it asked).
PLAIN_ON_TLS = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + (
    b"This port speaks HTTPS: use https:// to reach it.\n"
)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string (and without scheme and authority for an absolute-form target)
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    peer: str = ""  # the client's IP address


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable[Response]]
TlsSource = Callable[[], ssl.SSLContext | None]


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
        handshake_timeout_s: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        fresh_s: float = FRESH_S,
        stall_s: float = STALL_S,
        defer_accept_s: int = DEFER_ACCEPT_S,
        headers: Callable[[], Sequence[tuple[str, str]]] | None = None,
        peer_check: Callable[[ssl.SSLObject], bool] | None = None,
    ) -> None:
        self._handler = handler
        self._server_header = server_header.encode()
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._max_headers = max_headers
        self._request_timeout = request_timeout_s
        self._keepalive_timeout = keepalive_timeout_s
        self._write_timeout = write_timeout_s
        self._handshake_timeout = handshake_timeout_s
        self._max_connections = max_connections
        self._max_handshakes = max_handshakes
        self._fresh, self._stall = fresh_s, stall_s
        self._defer = defer_accept_s
        self._acceptor = Acceptor(lambda: Channel(self), self._at_limit, self._idle_dropped)
        self._extra_headers = headers
        self._peer_check = peer_check  # after a TLS handshake: False drops the connection
        self._date = _Date()
        self._server: asyncio.Server | None = None
        self._tls: TlsSource | None = None
        self.connections: dict[Channel, None] = {}  # in accept order
        self._silent: dict[Channel, None] = {}  # those that sent nothing yet, in accept order
        self._spoken: dict[Channel, None] = {}  # the others, in the order they began to send
        self._handshaking: dict[Channel, None] = {}  # in the order their handshakes began
        self.evicted_total = 0
        self.evicted: Counter[str] = Counter()  # limit ("connections", "handshakes") -> connections evicted
        self.refused_total = 0
        self.handshake_timeouts_total = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        assert self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str, port: int, tls: ssl.SSLContext | TlsSource | None = None) -> None:
        """Listen. ``tls`` is a context, or a function asked at each new connection (a reloaded certificate
        serves the next handshake; None from it means plain HTTP)."""
        self._tls = (lambda: tls) if isinstance(tls, ssl.SSLContext) else tls
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and self._max_connections > soft // 2:
            log.warning("http_connection_limit_lowered", configured=self._max_connections, open_files_limit=soft)
            self._max_connections = max(soft // 2, 1)  # evict before accept() runs out of descriptors
        loop = asyncio.get_running_loop()
        # asyncio binds the sockets; the accept loop is this server's own (see _accept)
        sock = dual_stack_socket(port, LISTEN_BACKLOG) if host in ("", "::") else None
        if sock is not None:
            self._server = await loop.create_server(lambda: Channel(self), sock=sock, start_serving=False)
        else:
            self._server = await loop.create_server(
                lambda: Channel(self), host or "0.0.0.0", port, reuse_address=True, start_serving=False
            )
        self._acceptor.start(self._server.sockets, self._defer)

    async def close(self) -> None:
        """Stop listening and drop the open connections (a scrape in flight is cut short)."""
        self._acceptor.close()
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        for channel in list(self.connections):
            channel.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    def _at_limit(self) -> bool:
        """The open connections, parked ones included (see :class:`carbond.exporter.listen.Acceptor`), are at the
        limit: a silent arrival is then closed as it is accepted rather than let in. An idle client that arrives
        goes rather than one already open: both sent nothing for the deferred accept's wait or longer, and the
        newcomer has cost nothing yet."""
        return len(self.connections) + self._acceptor.parked >= self._max_connections

    def _idle_dropped(self) -> None:
        self._count_eviction("connections", self._max_connections)

    # connection accounting (called by Channel)

    def opened(self, channel: Channel) -> None:
        if self._at_limit() and channel.waiting() > 0 and self._acceptor.drop_parked():
            self._count_eviction("connections", self._max_connections)  # silent, no transport: the cheapest to go
        if len(self.connections) >= self._max_connections:
            self._promote_waiting()
            if self._acceptor.deferring and channel.waiting() == 0:
                # Handed over silent after the deferred accept's wait: an idle client, closed rather than let in
                # (as in the accept loop, for one accepted before the limit was reached).
                self._count_eviction("connections", self._max_connections)
                channel.abort()
                return
            victim = victim_of(self._spoken, self._fresh, self._stall, self._silent)
            if victim is None:  # every connection is being answered: this one waits for nothing
                self.refused_total += 1
                if self.refused_total == 1 or self.refused_total % 1000 == 0:
                    log.warning(
                        "http_connection_refused", limit=self._max_connections, refused_total=self.refused_total
                    )
                channel.abort()
                return
            self._evict(victim, "connections", self._max_connections)
        self.connections[channel] = None
        (self._silent if channel.silent else self._spoken)[channel] = None
        channel.task = asyncio.get_running_loop().create_task(self._run(channel))

    def _promote_waiting(self) -> None:
        """Move the oldest silent connections whose bytes are already in the kernel to the spoken ones (they get
        ``fresh_s`` from now to be read), so that the next silent one to go is one that truly sent nothing. The
        event loop accepts connections in batches before it reads from those accepted: without this look, a
        scraper's connection, request sent, was evicted as silent when a batch of reconnections landed first.
        Each connection is promoted at most once, so a flood costs one look per new connection."""
        now = time.monotonic()
        while self._silent:
            channel = next(iter(self._silent))
            if channel.waiting() == 0:
                return
            channel.silent, channel.since = False, now
            self.spoke(channel)

    def spoke(self, channel: Channel) -> None:
        if self._silent.pop(channel, 0) is None:
            self._spoken[channel] = None

    def closed(self, channel: Channel) -> None:
        self.connections.pop(channel, None)
        self._silent.pop(channel, None)
        self._spoken.pop(channel, None)
        self._handshaking.pop(channel, None)

    def _evict(self, channel: Channel, limit: str, value: int) -> None:
        self.closed(channel)
        channel.abort()
        if channel.task is not None:
            channel.task.cancel()
        self._count_eviction(limit, value)

    def _count_eviction(self, limit: str, value: int) -> None:
        self.evicted_total += 1
        self.evicted[limit] += 1
        if self.evicted_total == 1 or self.evicted_total % 1000 == 0:
            log.warning("http_connection_evicted", limit=limit, value=value, evicted_total=self.evicted_total)

    def _begin_handshake(self, channel: Channel) -> None:
        if len(self._handshaking) >= self._max_handshakes:
            victim = next(iter(self._handshaking))  # the oldest handshake in progress
            self._evict(victim, "handshakes", self._max_handshakes)
        self._handshaking[channel] = None

    # one connection

    async def _run(self, channel: Channel) -> None:
        try:
            context = self._tls() if self._tls is not None else None
            if context is not None:
                try:
                    async with asyncio.timeout(self._handshake_timeout):
                        await channel.start_tls(context, lambda: self._begin_handshake(channel))
                except TimeoutError:
                    self.handshake_timeouts_total += 1
                    raise
                except PlainHttpOnTls:
                    channel.write_raw(PLAIN_ON_TLS)
                    await self._linger(channel)
                    async with asyncio.timeout(self._write_timeout):
                        await channel.close()
                    return
                finally:
                    self._handshaking.pop(channel, None)
                if self._peer_check is not None and channel.tls is not None and not self._peer_check(channel.tls):
                    channel.abort()
                    return
            await self._serve(channel)
            # flush what is still buffered (a large body to an HTTP/1.0 client), then FIN
            async with asyncio.timeout(self._write_timeout):
                await channel.close()
        except (TimeoutError, OSError):
            channel.abort()  # the client went away, was too slow or failed the handshake: nothing to tell it
        except asyncio.CancelledError:  # close() or eviction: the task ends here
            channel.abort()
        except Exception as exc:  # noqa: BLE001 (a bug here must cost one connection, never the daemon)
            log.error("http_connection_failed", error=repr(exc))
            channel.abort()
        finally:
            self.closed(channel)

    async def _serve(self, channel: Channel) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        while True:
            channel.since, channel.reading, channel.busy = time.monotonic(), False, False
            try:
                request, close = await self._read_request(conn, channel)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    body = f"{HTTPStatus(status).phrase}\n".encode()  # never the client's bytes
                    await self._send(conn, channel, Response(status, body), head=False, close=True)
                    await self._linger(channel)
                return
            if request is None:
                return
            channel.busy = True  # never evicted while its answer is made
            try:
                response = await self._handler(request)
            except Exception as exc:  # noqa: BLE001 (a handler's bug is a 500 for its request, never a dead server)
                log.error("http_handler_failed", path=request.path, error=repr(exc))
                response = Response(500, b"internal error\n")
            # a client slow to take the answer is an idle served connection for eviction, not a busy one
            channel.busy, channel.served, channel.since = False, channel.served + 1, time.monotonic()
            await self._send(conn, channel, response, head=request.method == "HEAD", close=close)
            if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # HTTP/1.0, Connection: close, an ambiguous body framing ...
            conn.start_next_cycle()

    async def _linger(self, channel: Channel, limit: int = 1 << 16) -> None:
        """Read (and drop) what the client still sends, for up to a second: closing with unread input would
        reset the connection and could destroy the error response before the client reads it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while limit > 0 and (left := end - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    data = await channel.recv()
            except (TimeoutError, OSError):
                return
            if not data:
                return
            limit -= len(data)

    async def _read_request(self, conn: h11.Connection, channel: Channel) -> tuple[Request | None, bool]:
        """The next whole request (its body read and dropped) and whether the connection must close after it;
        None when the client closed or went idle."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set at the first byte of a request
        request: h11.Request | None = None
        close = continued = False
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None and (request is not None or conn.trailing_data[0]):
                    deadline = loop.time() + self._request_timeout
                if conn.they_are_waiting_for_100_continue and not continued:
                    continued = True
                    channel.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")) or b""
                    )
                timeout = self._keepalive_timeout if deadline is None else deadline - loop.time()
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):  # cheaper than wait_for: no task per read
                        data = await channel.recv()
                except TimeoutError:
                    if deadline is None:
                        return None, True  # idle connection
                    raise h11.RemoteProtocolError("request not received in time", error_status_hint=408) from None
                if deadline is None and data:
                    deadline = loop.time() + self._request_timeout
                    channel.reading = True
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                close = self._check_head(event)
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self._max_body:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                channel.reading = False
                return _request(request, channel.peer), close
            else:  # ConnectionClosed; PAUSED cannot happen: the cycle is restarted after each response
                return None, True

    def _check_head(self, event: h11.Request) -> bool:
        """Reject what must not be served (RemoteProtocolError); True when the connection must close after it."""
        if not event.http_version.startswith(b"1."):
            raise h11.RemoteProtocolError("unsupported HTTP version", error_status_hint=505)
        if len(event.headers) > self._max_headers or _head_size(event) > self._max_head:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        names = {name for name, _ in event.headers}
        length = next((v for n, v in event.headers if n == b"content-length"), b"0")
        if length.isdigit() and int(length) > self._max_body:
            raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        return b"content-length" in names and b"transfer-encoding" in names

    async def _send(self, conn: h11.Connection, channel: Channel, r: Response, *, head: bool, close: bool) -> None:
        headers = [
            (b"Content-Type", r.content_type.encode()),
            (b"Content-Length", str(len(r.body)).encode()),
            (b"Date", self._date()),
            (b"Server", self._server_header),
        ]
        headers += [(k.encode(), v.encode()) for k, v in r.headers]
        if self._extra_headers is not None:
            headers += [(k.encode(), v.encode()) for k, v in self._extra_headers()]
        if close:
            headers.append((b"Connection", b"close"))
        reason = _reason(r.status)
        channel.answering()
        pieces: list[bytes] = [conn.send(h11.Response(status_code=r.status, headers=headers, reason=reason)) or b""]
        if r.body and not head:  # a HEAD response has no body, only its length
            pieces += conn.send_with_data_passthrough(h11.Data(data=r.body)) or []  # the cached body, not a copy
        pieces.append(conn.send(h11.EndOfMessage()) or b"")
        # Written in slices as the client takes them: a client that does not read holds at most a slice beyond
        # the transport's high-water mark, not a copy of the whole body (16 such clients of an 8 MiB body held
        # 98 MiB when it was written at once).
        async with asyncio.timeout(self._write_timeout):
            for piece in pieces:
                view = memoryview(piece)
                for at in range(0, len(view), WRITE_SLICE):
                    channel.write(view[at : at + WRITE_SLICE])
                    if channel.buffered() >= WRITE_SLICE:
                        await channel.drain()
            if channel.buffered():  # the usual scrape went straight to the socket
                await channel.drain()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _request(event: h11.Request, peer: str) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:  # h11 gives names lower-cased
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):  # absolute form: the path after the authority
        target = "/" + rest.partition("/")[2]
    return Request(event.method.decode("latin-1"), target.partition("?")[0], headers, peer)


def _head_size(event: h11.Request) -> int:
    """The size of the request head as sent, near enough (h11 bounds only a head that arrives in pieces)."""
    return len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in event.headers)
