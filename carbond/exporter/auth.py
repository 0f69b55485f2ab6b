"""Basic auth for /metrics: bcrypt checks scheduled so that a password flood cannot lock valid scrapers out.

- bcrypt runs on :class:`BcryptPool` (two threads of its own), never on the default executor the sensors'
  blocking reads use: a flood of wrong passwords cannot starve a GPU read into a timeout.
- Admission before the hash: each client address (an IPv4 address, or an IPv6 /64) has a bucket of failed logins
  (:class:`FailureLimiter`, ten at once, then one a second). A check takes a token *before* it is queued and gets
  it back when the password was right, so concurrent requests from one address cannot run more checks than the
  bucket allows; an address without tokens gets 429 without any bcrypt work.
- Two classes of checks, each queue bounded: an address that has not failed within its bucket's refill time
  (and has no other check pending) is *trusted*, first come first served; an address that failed is *failing*,
  one check queued per address and served round robin, on at most ``workers - 1`` threads. Trusted checks always
  start before failing ones, so floods from addresses that have failed never delay a first login from one that
  has not by more than the check of a failing address already running on the thread it needs.
- Per user: the checks of one user (every unknown user name counts as one user) hold at most ``workers - 1``
  threads, so a flood against one user, even at a cost of 18 (20 s a check), leaves a thread to the others.
- A check that could not start within ``max_wait_s`` is answered 429: every login is answered in bounded time.
- Wrong or missing credentials get the same 401 whatever was wrong. An unknown user is checked against a dummy
  hash of the highest configured cost, but at most :data:`DUMMY_MAX_COST` (exporter-toolkit's fixed dummy is
  cost 10): unknown users get their 401 in about 0.1 s whatever the file holds, at the price of telling users
  of a higher cost apart by timing. The pool makes one dummy per cost for the life of the process.
- Good credentials are remembered (a SHA-256 of user, stored hash and password, as exporter-toolkit keys its
  cache) so a scrape every few seconds does not pay bcrypt's cost each time, flood or not. The memory outlives
  reloads, since a changed or removed hash can never match an entry again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from carbond.exporter.http import Request, Response

T = TypeVar("T")

UNAUTHORIZED = Response(401, b"unauthorized\n", headers=(("WWW-Authenticate", 'Basic realm="carbond"'),))
TOO_MANY = Response(429, b"too many failed logins\n", headers=(("Retry-After", "1"),))
#: bcrypt ignores bytes beyond 72 (and the bcrypt package refuses them): longer passwords never match.
BCRYPT_MAX = 72
#: The highest cost of the dummy hash unknown users are checked against (about 0.1 s).
DUMMY_MAX_COST = 10
#: Reasons a login is refused, the label values of carbond_http_logins_refused_total.
REASONS = ("missing", "wrong", "rate_limited", "busy", "rate_limit")


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    lane: str
    client: str
    trusted: bool
    started: asyncio.Future[None]
    done: asyncio.Future[T] = field(init=False)

    def __post_init__(self) -> None:
        self.done = self.started.get_loop().create_future()


class BcryptPool:
    """Runs bcrypt checks on ``workers`` threads of its own, scheduled as the module docstring says."""

    def __init__(
        self,
        workers: int = 2,
        queue: int = 32,
        trusted_queue: int = 64,
        max_wait_s: float = 10.0,
    ) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="carbond-bcrypt")
        self._workers = workers
        self._share = max(workers - 1, 1)  # threads one user, or the failing class, may hold
        self._failing_max, self._trusted_max, self._max_wait = queue, trusted_queue, max_wait_s
        self._trusted: deque[_Job[Any]] = deque()
        self._failing: OrderedDict[str, _Job[Any]] = OrderedDict()  # client -> its one queued check
        self._pending_trusted: set[str] = set()  # clients with a trusted check queued or running
        self._running = 0
        self._running_failing = 0
        self._lanes: Counter[str] = Counter()
        self._verified: OrderedDict[bytes, None] = OrderedDict()  # good logins, least recently used first
        self._dummies: dict[int, bytes] = {}  # cost -> a hash of no password, made once
        self._dummy_lock = threading.Lock()
        self._preparing: set[int] = set()
        self.refused: Counter[str] = Counter()  # reason -> logins refused (outlives reloads)
        self._closed = False

    def trusted(self, client: str) -> bool:
        """No check of this client is queued or running in the trusted class."""
        return client not in self._pending_trusted

    async def run(self, fn: Callable[[], T], lane: str = "", client: str = "", trusted: bool = False) -> T | None:
        """``fn``'s result, or None when it could not be queued or did not start within ``max_wait_s``."""
        trusted = trusted and client not in self._pending_trusted
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, lane, client, trusted, loop.create_future())
        if trusted:
            if len(self._trusted) >= self._trusted_max:
                return None
            self._trusted.append(job)
            self._pending_trusted.add(client)
        else:
            if len(self._failing) >= self._failing_max or client in self._failing:
                return None
            self._failing[client] = job
        self._dispatch()
        try:
            async with asyncio.timeout(self._max_wait):
                await asyncio.shield(job.started)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not job.started.done():
                self._forget(job)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return None
            if isinstance(exc, asyncio.CancelledError):
                raise
        return await asyncio.shield(job.done)

    def _forget(self, job: _Job[Any]) -> None:
        if job.trusted:
            with contextlib.suppress(ValueError):
                self._trusted.remove(job)
            self._pending_trusted.discard(job.client)
        elif self._failing.get(job.client) is job:
            del self._failing[job.client]

    def _next(self) -> _Job[Any] | None:
        for job in self._trusted:
            if self._lanes[job.lane] < self._share:
                self._trusted.remove(job)
                return job
        if self._running_failing >= self._share:
            return None
        for client, job in self._failing.items():
            if self._lanes[job.lane] < self._share:
                del self._failing[client]
                return job
        return None

    def _dispatch(self) -> None:
        while not self._closed and self._running < self._workers and (job := self._next()) is not None:
            self._start(job)

    def _start(self, job: _Job[Any]) -> None:
        self._running += 1
        self._running_failing += not job.trusted
        self._lanes[job.lane] += 1
        job.started.set_result(None)
        future = asyncio.get_running_loop().run_in_executor(self._executor, job.fn)

        def finished(f: asyncio.Future[Any]) -> None:
            self._running -= 1
            self._running_failing -= not job.trusted
            self._lanes[job.lane] -= 1
            if job.trusted:
                self._pending_trusted.discard(job.client)
            if f.cancelled():
                job.done.cancel()
            elif (exc := f.exception()) is not None:
                job.done.set_exception(exc)
            else:
                job.done.set_result(f.result())
            self._dispatch()

        future.add_done_callback(finished)

    def verified(self, key: bytes) -> bool:
        """Whether a login of this key (see :meth:`BasicAuth.check`) was checked good before."""
        if key not in self._verified:
            return False
        self._verified.move_to_end(key)
        return True

    def remember(self, key: bytes, limit: int = 1024) -> None:
        self._verified[key] = None
        self._verified.move_to_end(key)
        while len(self._verified) > limit:
            self._verified.popitem(last=False)

    def dummy(self, cost: int) -> bytes:
        """The dummy hash of ``cost`` (made here the first time: call it on the pool, never on the event loop)."""
        with self._dummy_lock:
            hashed = self._dummies.get(cost)
            if hashed is None:
                import bcrypt

                hashed = self._dummies[cost] = bcrypt.hashpw(b"not a password", bcrypt.gensalt(cost))
            return hashed

    def prepare_dummy(self, cost: int) -> None:
        """Make the dummy hash of ``cost`` on the pool now, unless it exists or is being made (start-up and reload
        work: at most one job per cost, however many reloads ask)."""
        if cost in self._dummies or cost in self._preparing:
            return
        self._preparing.add(cost)
        self._executor.submit(self.dummy, cost)

    def close(self) -> None:
        self._closed = True  # what is queued is answered 429 once its wait is over
        self._executor.shutdown(wait=False, cancel_futures=True)


class FailureLimiter:
    """A token bucket of failed logins per client: ``burst`` at once, then ``per_s`` a second. A client is an IPv4
    address, or an IPv6 /64 (one host usually has a whole /64 to draw fresh addresses from). A client that failed
    is *failing* until its bucket had the time to refill (``burst / per_s`` seconds)."""

    def __init__(
        self, burst: float = 10, per_s: float = 1.0, clients: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst, self._rate, self._max = burst, per_s, clients
        self._clock = clock
        self._memory = burst / per_s if per_s > 0 else math.inf
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._failed_at: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def client(peer: str) -> str:
        if ":" not in peer:
            return peer
        try:
            return str(ipaddress.IPv6Network((peer, 64), strict=False))
        except ValueError:
            return peer

    def _tokens(self, peer: str) -> float:
        tokens, at = self._buckets.get(peer, (self._burst, self._clock()))
        return min(self._burst, tokens + (self._clock() - at) * self._rate)

    def _set(self, peer: str, tokens: float) -> None:
        self._buckets[peer] = (tokens, self._clock())
        self._buckets.move_to_end(peer)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)

    def allowed(self, peer: str) -> bool:
        peer = self.client(peer)
        return peer not in self._buckets or self._tokens(peer) >= 1

    def take(self, peer: str) -> bool:
        """Charge one failure ahead of a check; False (nothing charged) when the client has none left."""
        peer = self.client(peer)
        tokens = self._tokens(peer)
        if tokens < 1:
            return False
        self._set(peer, tokens - 1)
        return True

    def refund(self, peer: str) -> None:
        """Give back what :meth:`take` charged: the check did not fail."""
        peer = self.client(peer)
        if peer in self._buckets:
            self._set(peer, min(self._burst, self._tokens(peer) + 1))

    def mark_failed(self, peer: str) -> None:
        """A check charged by :meth:`take` failed: the client is failing for a while."""
        peer = self.client(peer)
        self._failed_at[peer] = self._clock()
        self._failed_at.move_to_end(peer)
        while len(self._failed_at) > self._max:
            self._failed_at.popitem(last=False)

    def failed(self, peer: str) -> None:
        """A failed login not charged ahead: charge it now and mark the client failing."""
        p = self.client(peer)
        self._set(p, max(self._tokens(p) - 1, 0.0))
        self.mark_failed(peer)

    def failing(self, peer: str) -> bool:
        at = self._failed_at.get(self.client(peer))
        return at is not None and self._clock() - at < self._memory


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


class BasicAuth:
    """Checks a request's ``Authorization`` header against the users' bcrypt hashes."""

    def __init__(self, users: dict[str, str], pool: BcryptPool, limiter: FailureLimiter) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._pool, self._limiter = pool, limiter
        self._hashes = {u: h.encode() for u, h in users.items()}
        self.dummy_cost = min(max((_cost(h) for h in self._hashes.values()), default=10), DUMMY_MAX_COST)
        if self._hashes:  # made on the pool now, ready before the first unknown user
            pool.prepare_dummy(self.dummy_cost)

    def _check(self, user: str, password: bytes) -> bool:
        hashed = self._hashes.get(user)
        ok = self._bcrypt.checkpw(password[:BCRYPT_MAX], hashed or self._pool.dummy(self.dummy_cost))
        return ok and hashed is not None and len(password) <= BCRYPT_MAX

    def _refuse(self, reason: str, response: Response) -> Response:
        self._pool.refused[reason] += 1
        return response

    async def check(self, request: Request) -> Response | None:
        """None when the request may pass; otherwise the answer (401, or 429 for a client over its limit)."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return self._refuse("missing", UNAUTHORIZED)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return self._refuse("missing", UNAUTHORIZED)
        raw_user, _, password = decoded.partition(b":")
        user = raw_user.decode("utf-8", "replace")
        if not user:
            return self._refuse("missing", UNAUTHORIZED)
        hashed = self._hashes.get(user, b"")
        key = hashlib.sha256(user.encode() + b"\0" + hashed + b"\0" + password).digest()
        if hashed and self._pool.verified(key):  # the common case, a scrape with good credentials: no thread hop
            return None
        client = self._limiter.client(request.peer)
        trusted = not self._limiter.failing(client)
        if not self._limiter.take(client):
            return self._refuse("rate_limited", TOO_MANY)
        try:
            ok = await self._pool.run(
                lambda: self._check(user, password), lane=user if hashed else "", client=client, trusted=trusted
            )
        finally:
            self._limiter.refund(client)  # held while the check ran; charged for good below when it said no
        if ok is None:
            return self._refuse("busy", TOO_MANY)
        if ok:
            self._pool.remember(key)
            return None
        self._limiter.failed(client)
        return self._refuse("wrong", UNAUTHORIZED)
