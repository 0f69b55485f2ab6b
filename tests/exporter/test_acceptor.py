"""The accept loop (carbond.exporter.listen.Acceptor): silent arrivals parked below the limit, closed at it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from carbond.exporter.listen import Acceptor
from tests.harness.skips import skip_or_fail
from tests.harness.wait import eventually_async

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Recorder(asyncio.Protocol):
    def __init__(self, made: list[Recorder]) -> None:
        self._made = made
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._made.append(self)


@asynccontextmanager
async def accepting(limit: int) -> AsyncIterator[tuple[Acceptor, list[Recorder], list[int], int]]:
    """An Acceptor on 127.0.0.1 with a one-second deferred accept; at ``limit`` transports (parked ones counted)
    a silent arrival is dropped. Yields it, the protocols made, a one-item list of drops, and the port."""
    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        skip_or_fail("TCP_DEFER_ACCEPT is Linux's")
    made: list[Recorder] = []
    dropped = [0]

    def drop() -> None:
        dropped[0] += 1

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    acceptor = Acceptor(lambda: Recorder(made), lambda: len(made) + acceptor.parked >= limit, drop, adopt_batch=1)
    acceptor.start([listener], 1)
    try:
        assert acceptor.deferring
        yield acceptor, made, dropped, listener.getsockname()[1]
    finally:
        acceptor.close()
        listener.close()
        for protocol in made:
            if protocol.transport is not None:
                protocol.transport.close()


async def connect(port: int, first: bytes = b"") -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
    return reader, writer


@pytest.mark.asyncio
async def test_silent_arrivals_get_a_transport_below_the_limit_and_are_closed_at_it() -> None:
    async with accepting(limit=2) as (acceptor, made, dropped, port):
        clients = [await connect(port) for _ in range(4)]  # silent: handed over after the deferred wait
        await eventually_async(lambda: len(made) == 2 and dropped[0] == 2, 15, what="2 let in, 2 dropped")
        assert acceptor.parked == 0
        # the two dropped ones see their connection end (the kernel's order, not necessarily the connect order)
        reads = [asyncio.create_task(reader.read(1)) for reader, _ in clients]
        await eventually_async(lambda: sum(r.done() for r in reads) == 2, 5, what="2 connections ended")
        assert [r.result() for r in reads if r.done()] == [b"", b""]
        assert all(not p.transport.is_closing() for p in made if p.transport is not None)
        for read in reads:
            read.cancel()
        for _, writer in clients:
            writer.close()


@pytest.mark.asyncio
async def test_a_client_that_speaks_first_is_let_in_at_once_past_the_limit() -> None:
    """The limit for speaking clients is the server's (it evicts another); the accept loop hands them over
    without waiting for the deferred accept and without asking the limit."""
    async with accepting(limit=0) as (_, made, dropped, port):
        _, writer = await connect(port, b"GET / HTTP/1.1\r\n\r\n")
        await eventually_async(lambda: len(made) == 1, 0.9, what="the speaking client handed over within a second")
        assert dropped[0] == 0
        writer.close()


@pytest.mark.asyncio
async def test_parked_connections_are_closed_with_the_acceptor() -> None:
    async with accepting(limit=8) as (acceptor, made, _, port):
        assert not acceptor.drop_parked()  # nothing parked
        clients = [await connect(port) for _ in range(3)]
        await eventually_async(lambda: len(made) + acceptor.parked == 3, 15, what="3 silent arrivals taken")
        acceptor.close()
        assert acceptor.parked == 0
        for _, writer in clients:
            writer.close()
