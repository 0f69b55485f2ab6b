"""The listening side of the /metrics server: sockets, the kernel's deferred accept, and the accept loop.

asyncio binds the sockets (:meth:`carbond.exporter.http.HttpServer.start`); the accept loop is :class:`Acceptor`,
not asyncio's, because a flood of clients that reconnect as fast as they are dropped must cost as little as
possible per connection, and a scraper's connection must not wait behind them:

- on Linux a connection that sends nothing is handed over by the kernel only after ``defer_s``
  (TCP_DEFER_ACCEPT, see :func:`tune_listener`); such a silent arrival at the connection limit is closed as it is
  accepted, before any transport or task is made for it;
- below the limit a silent arrival is *parked*: held as a bare socket (it counts towards the limit) and given its
  transport a few per turn of the event loop, after the connections whose request is already in the kernel, which
  are given theirs at once. When 2,000 silent clients are handed over at once, the first 1,024 of them no longer
  make a scrape behind them wait for 1,024 transports and tasks (about 0.2 s); a parked socket is also the
  cheapest connection to drop for a new one (see :meth:`Acceptor.drop_parked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
from asyncio.trsock import TransportSocket
from collections import deque
from collections.abc import Callable, Sequence

#: Connections taken from the kernel per turn of the event loop. An arrival costs an accept and a look at its
#: pending bytes (plus a close or a place in the parked queue), tens of microseconds: a burst of 256 holds the loop
#: for a few milliseconds, while a scraper's connection queued behind a burst is reached sooner.
ACCEPT_BATCH = 256
#: Parked connections given a transport per turn of the event loop.
ADOPT_BATCH = 16
#: Connections the kernel queues before accept() (capped by net.core.somaxconn): a full queue drops new SYNs, and
#: a dropped SYN costs its client a one-second retransmission, a scraper's as much as a flooder's.
LISTEN_BACKLOG = 4096
#: Seconds a connection that sends nothing waits in the kernel before it is accepted (see :func:`tune_listener`).
DEFER_ACCEPT_S = 3

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def pending_bytes(fd: int) -> int:
    """Bytes the kernel holds for the socket ``fd`` that nobody has read yet (FIONREAD); 0 when it cannot tell."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


class Acceptor:
    """Accepts from the listening sockets and hands connections to asyncio with ``protocol`` as their protocol.

    ``at_limit()`` is asked for each silent arrival (when the accept is deferred): True closes it at once and calls
    ``dropped()``. The caller counts :attr:`parked` among its open connections."""

    def __init__(
        self,
        protocol: ProtocolFactory,
        at_limit: Callable[[], bool],
        dropped: Callable[[], None],
        *,
        batch: int = ACCEPT_BATCH,
        adopt_batch: int = ADOPT_BATCH,
    ) -> None:
        self._protocol = protocol
        self._at_limit = at_limit
        self._dropped = dropped
        self._batch, self._adopt_batch = batch, adopt_batch
        self._listeners: list[socket.socket] = []
        self._adopting: set[asyncio.Task[None]] = set()  # accepted sockets being given a transport
        self._parked: deque[socket.socket] = deque()  # silent arrivals waiting for a transport, oldest first
        self._draining: asyncio.Handle | None = None
        self.deferring = False  # the kernel hands over a silent connection only after defer_s

    @property
    def parked(self) -> int:
        return len(self._parked)

    def start(self, sockets: Sequence[socket.socket | TransportSocket], defer_s: int) -> None:
        """Accept from (duplicates of) ``sockets``, asyncio's listening sockets, with the accept deferred by
        ``defer_s`` where the kernel can."""
        loop = asyncio.get_running_loop()
        self._listeners = [listener.dup() for listener in sockets]
        self.deferring = all([tune_listener(listener, defer_s) for listener in self._listeners])
        for listener in self._listeners:
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        """Stop accepting; close the parked connections and stop those being given a transport."""
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None
        while self._parked:
            self._parked.popleft().close()
        for adopting in list(self._adopting):
            adopting.cancel()

    def drop_parked(self) -> bool:
        """Close the oldest parked connection (silent for at least the deferred accept's wait, and without a
        transport yet: the cheapest to drop); False when none is parked."""
        if not self._parked:
            return False
        self._parked.popleft().close()
        return True

    def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self._batch):
            try:
                # the bare descriptor: socket.accept() would make a socket object (and look up its family and
                # type as enums) for each arrival, a third of the cost of one closed at once
                fd, _ = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # as asyncio does: say so (carbond.logs makes it one event per streak) and retry in a second,
                # since the listening socket stays readable
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": exc, "socket": listener}
                )
                loop.remove_reader(listener.fileno())
                loop.call_later(1.0, self._resume, listener)
                return
            if self.deferring and pending_bytes(fd) == 0:  # handed over silent after the deferred wait
                if self._at_limit():
                    self._dropped()
                    os.close(fd)
                    continue
                self._parked.append(socket.socket(fileno=fd))
                if self._draining is None:
                    self._draining = loop.call_soon(self._drain)
                continue
            self._adopt(socket.socket(fileno=fd))

    def _drain(self) -> None:
        self._draining = None
        for _ in range(min(self._adopt_batch, len(self._parked))):
            self._adopt(self._parked.popleft())
        if self._parked:
            self._draining = asyncio.get_running_loop().call_soon(self._drain)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, conn)
        except (OSError, asyncio.CancelledError):  # the client left at once, or the server is closing
            conn.close()

    def _resume(self, listener: socket.socket) -> None:
        if listener in self._listeners:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)


def tune_listener(listener: socket.socket | TransportSocket, defer_s: int = DEFER_ACCEPT_S) -> bool:
    """Defer the accept of connections until they send something (Linux's TCP_DEFER_ACCEPT) and let the kernel
    queue LISTEN_BACKLOG connections.

    A client that connects and sends nothing reaches the server only after ``defer_s`` (the kernel resends its
    SYN-ACK, then hands the connection over): a flood of silent connections that reopen as soon as they are dropped
    then reaches the server at most once per ``defer_s`` per client, and a scraper's connection, request sent,
    does not wait in the accept queue behind them. HTTP and TLS clients speak first, so no client waits for it.
    True when the accept is deferred."""
    deferred = False
    defer = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if defer is not None and defer_s > 0:
        with contextlib.suppress(OSError):
            listener.setsockopt(socket.IPPROTO_TCP, defer, defer_s)
            deferred = True
    with contextlib.suppress(OSError), listener.dup() as dup:  # listen() again: only the queue length changes
        dup.listen(LISTEN_BACKLOG)
    return deferred


def dual_stack_socket(port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket | None:
    """A listening socket on ``::`` that takes IPv4 too (IPV6_V6ONLY off; asyncio and Linux's
    ``bindv6only`` sysctl would make it IPv6 only); None where the kernel has no IPv6, OSError on a bind failure
    (the port in use)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # IPv6 present but switched off
            return None
        raise
    return sock
