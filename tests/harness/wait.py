"""Waiting for events instead of sleeping: poll a predicate until it holds or a deadline passes.

A fixed ``sleep`` is either too short on a busy machine (the test fails) or too long on a quiet one (the suite
crawls). ``eventually`` polls with a growing interval (5 ms doubling to ``max_interval``) and returns as soon as the
predicate gives a truthy value; the timeout is a bound for a stuck test, never the expected duration, so it is
generous (a 2-core machine running other work can be ten times slower than a quiet one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: The default bound: long enough for a loaded 2-core CI machine, short enough that a stuck test ends.
DEFAULT_TIMEOUT_S = 30.0


class NotYet(AssertionError):
    """The predicate never held within the timeout; carries the last value it returned (or raised)."""


def _describe(what: str, timeout: float, last: object) -> str:
    return f"{what or 'condition'} not met within {timeout:g} s (last: {last!r})"


def eventually(
    predicate: Callable[[], T | None],
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    what: str = "",
    max_interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; raise :class:`NotYet` after ``timeout``.

    Exceptions listed in ``ignore`` (a server not listening yet: ``OSError``) count as "not yet".
    """
    deadline = time.monotonic() + timeout
    interval = 0.005
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise NotYet(_describe(what, timeout, last))
        time.sleep(interval)
        interval = min(interval * 2, max_interval)


async def eventually_async(
    predicate: Callable[[], T | Awaitable[T | None] | None],
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    what: str = "",
    max_interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """:func:`eventually` for a running event loop: the predicate may be a coroutine function; the loop keeps running
    between polls, so tasks under test make progress."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    interval = 0.005
    last: object = None
    while True:
        try:
            got = predicate()
            value = await got if isinstance(got, Awaitable) else got
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if loop.time() >= deadline:
            raise NotYet(_describe(what, timeout, last))
        await asyncio.sleep(interval)
        interval = min(interval * 2, max_interval)


class GapClock:
    """``time.monotonic`` that remembers the longest gap between two of its calls.

    Handed to a background writer as its clock (``PowercapWriter(watts, clock=GapClock())``), it bounds how stale
    the writer's last value can be when another process reads it: the writer calls the clock once per write, so a
    value is never older than the longest gap. On a busy machine that gap is the scheduling delay of the writer's
    thread, which a test then turns into the tolerance of a rate measured over a short interval.
    """

    def __init__(self) -> None:
        self._last: float | None = None
        self._max_gap_s = 0.0
        self.calls = 0

    def __call__(self) -> float:
        now = time.monotonic()
        if self._last is not None:
            self._max_gap_s = max(self._max_gap_s, now - self._last)
        self._last = now
        self.calls += 1
        return now

    def max_gap_s(self, timeout: float = DEFAULT_TIMEOUT_S) -> float:
        """The longest gap so far, once the writer has called the clock again (so a gap in progress now counts)."""
        calls = self.calls
        eventually(lambda: self.calls > calls, timeout, what="the writer's next call of its clock")
        return self._max_gap_s
