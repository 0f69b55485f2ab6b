"""One accepted connection of the /metrics server: bytes in and out, plain or TLS, with bounded buffers.

TLS runs here through OpenSSL memory BIOs (:class:`ssl.SSLObject`) rather than asyncio's SSL transport, because:

- the connection exists, is counted and can be evicted from the TCP accept on, before and during its handshake
  (asyncio's ``start_server(ssl=...)`` hands a connection over only after the handshake, so stalled handshakes
  were never counted);
- a connection costs what OpenSSL needs for it, where asyncio's SSL protocol allocates a 256 KiB receive buffer per
  connection, a memory that CPython before 3.11.8 did not return after aborted handshakes (about 300 KB per stalled
  handshake was measured on 3.11.7);
- the first byte tells a TLS client (a handshake record, 0x16) from a plain-HTTP one, who gets a readable 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import resource
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Protocol

#: Raw bytes held for the server before reading from the socket pauses.
MAX_BUFFER = 1 << 15
#: Bytes read from the socket at a time: asyncio reads 256 KiB at a time into a plain protocol, past any bound
#: the protocol keeps, so a connection could hold MAX_BUFFER plus 256 KiB of a client's unread pipelined bytes.
READ_SIZE = 1 << 14
_reads = threading.local()  # one read buffer per event loop thread, copied from at once
TLS_HANDSHAKE_RECORD = 0x16


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard one, as Go programs (node_exporter) do at start; returns the
    soft limit in force. systemd's default soft limit (1024) would otherwise be reached before the connection
    limit, and accept() failing with EMFILE refuses everyone, the scraper included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class Owner(Protocol):
    def opened(self, channel: Channel) -> None: ...

    def spoke(self, channel: Channel) -> None: ...

    def closed(self, channel: Channel) -> None: ...


class PlainHttpOnTls(Exception):
    """The first byte on a TLS port is not a TLS handshake record."""


class Channel(asyncio.BufferedProtocol):
    """The transport's protocol, read and written by one server task.

    ``since``, ``served``, ``reading``, ``busy`` and :meth:`taken_at` describe the connection for the eviction
    policy of :class:`carbond.exporter.http.HttpServer`; ``handshaking`` is true while a TLS handshake is in
    progress.
    """

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.task: asyncio.Task[None] | None = None
        self.since = time.monotonic()
        self.served = 0  # requests answered
        self.reading = False  # a request has begun and is not whole yet
        self.busy = False  # a request is being answered
        self.handshaking = False
        self.silent = True  # nothing received yet
        self._answer_at = 0.0  # when the client of the answer in flight was last seen taking some of it
        self._left: int | None = None  # its bytes not yet acknowledged at the last look (None: not looked yet)
        self._buf = bytearray()
        self._eof = False
        self._paused_reading = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._ssl: ssl.SSLObject | None = None
        self._in = self._out = ssl.MemoryBIO()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self.peer.startswith("::ffff:") and "." in self.peer:  # IPv4 on a dual-stack socket: the IPv4 address
            self.peer = self.peer[7:]
        self._owner.opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf: memoryview | None = getattr(_reads, "buf", None)
        if buf is None:
            buf = _reads.buf = memoryview(bytearray(READ_SIZE))
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        self._buf += _reads.buf[:nbytes]
        if self.silent and nbytes:
            self.silent = False
            self._owner.spoke(self)
        if len(self._buf) > MAX_BUFFER and self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # half-closed: an answer may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._lost.done():
            self._lost.set_result(None)
        self._owner.closed(self)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # the server's side

    @property
    def lost(self) -> bool:
        return self._lost.done()

    async def _wait_data(self) -> None:
        while not self._buf and not self._eof:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _raw(self) -> bytes:
        """The bytes received so far (at least one), or b"" at end of input."""
        await self._wait_data()
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused_reading and self.transport is not None and not self.lost:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    async def start_tls(self, context: ssl.SSLContext, before: Callable[[], None] | None = None) -> None:
        """Run the server side of a TLS handshake (``before`` is called once a client has begun one).
        PlainHttpOnTls when the client speaks something else first; ssl.SSLError (an OSError) when the handshake
        fails; ConnectionResetError when the client leaves."""
        await self._wait_data()
        if not self._buf:
            raise ConnectionResetError("closed before the TLS handshake")
        if self._buf[0] != TLS_HANDSHAKE_RECORD:
            raise PlainHttpOnTls
        if before is not None:
            before()
        self.handshaking = True
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(self._in, self._out, server_side=True)
        try:
            while True:
                data = await self._raw()
                if not data:
                    raise ConnectionResetError("closed during the TLS handshake")
                self._in.write(data)
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
        except ssl.SSLError:
            self._flush()  # the alert that tells the client why
            raise
        finally:
            self.handshaking = False
        self._flush()
        self._ssl = obj

    @property
    def tls(self) -> ssl.SSLObject | None:
        return self._ssl

    async def recv(self) -> bytes:
        """The next bytes of the client's stream (decrypted), or b"" at its end."""
        if self._ssl is None:
            return await self._raw()
        while True:
            try:
                return self._ssl.read(65536)
            except ssl.SSLWantReadError:
                self._flush()  # session tickets and key updates
                data = await self._raw()
                if not data:
                    return b""
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.lost:
            raise ConnectionResetError("connection lost")
        if self._ssl is None:
            self.transport.write(data)
        else:
            self._ssl.write(data)
            self._flush()

    def write_raw(self, data: bytes) -> None:
        """Bytes sent as they are, whatever the channel's TLS state (the 400 for plain HTTP on a TLS port)."""
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def _flush(self) -> None:
        pending = self._out.read()
        if pending and self.transport is not None and not self.lost:
            self.transport.write(pending)

    def answering(self) -> None:
        """An answer is about to be written (see :meth:`taken_at`)."""
        self._answer_at, self._left = time.monotonic(), None

    def unacked(self) -> int:
        """Bytes written and not yet acknowledged by the client: asyncio's buffer and the socket's send queue
        (Linux's SIOCOUTQ counts what is unsent and what is sent but not acknowledged)."""
        if self.transport is None or self.lost:
            return 0
        left = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                left += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return left

    def taken_at(self) -> float | None:
        """While an answer is in flight (bytes of it not acknowledged yet), when its client last took some of it;
        None when nothing is in flight. Progress is seen by comparing what is left with the previous look: the
        first look of an answer counts as progress (how long it has been flowing says nothing about its client
        having stopped), so a client that reads nothing is found stalled at a later look."""
        left = self.unacked()
        if left == 0:
            return None
        if self._left is None or left < self._left:
            self._answer_at = time.monotonic()
        self._left = left
        return self._answer_at

    def held(self) -> int:
        """Bytes received and not yet taken by the server."""
        return len(self._buf)

    def waiting(self) -> int:
        """Bytes the kernel holds for this connection that the event loop has not read yet (FIONREAD): a client
        that sent its request as soon as it connected has spoken, though the server may not have looked."""
        if self.transport is None or self.lost:
            return 0
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
        except (OSError, ValueError):
            return 0

    def buffered(self) -> int:
        return 0 if self.transport is None or self.lost else self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable
        if self.lost:
            raise ConnectionResetError("connection lost")

    async def close(self) -> None:
        """Flush what is buffered, end the stream (TLS: close_notify) and wait until the socket is closed."""
        if self.transport is None or self.lost:
            return
        if self._ssl is not None:
            with contextlib.suppress(ssl.SSLError):  # the peer's close_notify is not waited for
                self._ssl.unwrap()
            self._flush()
        self.transport.close()
        await asyncio.shield(self._lost)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def victim_of(
    candidates: dict[Channel, None], fresh_s: float, stall_s: float, silent: dict[Channel, None] | None = None
) -> Channel | None:
    """The connection to drop for a new one. Never one whose answer is being made. First those that never
    completed a request (idle since accept, dripping a first request, stalled in a TLS handshake) and had
    ``fresh_s`` to send one, oldest first (found near the start of the accept order, without a scan of every
    connection); then those dripping a later request, longest first; then idle served ones, least recently
    used first (an HTTP client retries an idempotent request that meets a closed keep-alive connection), a
    client that took nothing of its answer for ``stall_s`` among them; then the connections younger than
    ``fresh_s``: first one dripping a first request, then the oldest that sent nothing, last one whose bytes
    are received but not yet read (a scraper's request, sent whole as it connected; a connection whose request
    is still in the kernel is one of those, see ``HttpServer._promote_waiting``), so a scraper's new connection
    keeps the moment it needs to send its request however fast others arrive. Last, and only when every
    connection is receiving an answer, the one whose client took nothing for the longest: an answer a client is
    taking (a scrape's body in flight) is never cut for a newcomer while anything else can go.

    ``silent``, when given, holds the connections that have sent nothing yet, in accept order, and
    ``candidates`` the others: the oldest silent connection is found without a scan and goes first once it had
    ``fresh_s``, so a flood of clients that reconnect as fast as they are dropped (all silent) costs one look per
    new connection, not a scan of every open one."""
    now = time.monotonic()
    oldest_silent = next(iter(silent), None) if silent else None
    if oldest_silent is not None and now - oldest_silent.since >= fresh_s:
        return oldest_silent
    best: Channel | None = None
    dripping: Channel | None = None  # young, a first request begun and not whole
    waiting: Channel | None = None  # young, bytes received (or in the kernel) not yet read as a request
    best_key = (3, 0.0)
    flowing: Channel | None = None
    flowing_at = math.inf
    for c in candidates:
        if c.busy:
            continue
        if c.served == 0:
            if now - c.since >= fresh_s:
                return c
            if c.reading:
                dripping = dripping or c
            else:
                waiting = waiting or c
            continue
        key = (1 if c.reading else 2, c.since)
        if key >= best_key:
            continue
        taken = None if c.reading else c.taken_at()
        if taken is not None and now - taken < stall_s:
            if taken < flowing_at:  # receiving its answer: kept unless nothing else can go
                flowing, flowing_at = c, taken
            continue
        best, best_key = c, key
    return best or dripping or oldest_silent or waiting or flowing
