"""Basic auth for /metrics: bcrypt checks on a bounded pool of their own, and failed logins rate-limited.

- bcrypt runs on :class:`BcryptPool` (two threads, a short queue), never on the default executor the sensors'
  blocking reads use: a flood of wrong passwords cannot starve a GPU read into a timeout.
- A client (by IP address) that keeps failing gets 429 without any bcrypt work once its burst is spent
  (:class:`FailureLimiter`); a full pool answers 429 too.
- Wrong or missing credentials get the same 401 whatever was wrong, after the same bcrypt work: an unknown user is
  checked against a dummy hash of the highest cost among the configured users. The pool makes one dummy hash per
  cost for the life of the process, so reloads (SIGHUP) never queue bcrypt work ahead of the logins.
- Good credentials are remembered (a SHA-256 of user, stored hash and password, as exporter-toolkit keys its
  cache) so a scrape every few seconds does not pay bcrypt's cost each time. The memory outlives reloads, since
  a changed or removed hash can never match an entry again: a revoked password stops working at the reload,
  while a scraper whose entry is unchanged keeps passing without bcrypt work, even when a wrong-password flood
  fills the pool just after a reload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from carbond.exporter.http import Request, Response

T = TypeVar("T")

UNAUTHORIZED = Response(401, b"unauthorized\n", headers=(("WWW-Authenticate", 'Basic realm="carbond"'),))
TOO_MANY = Response(429, b"too many failed logins\n", headers=(("Retry-After", "1"),))
#: bcrypt ignores bytes beyond 72 (and the bcrypt package refuses them): longer passwords never match.
BCRYPT_MAX = 72


class BcryptPool:
    """At most ``workers`` bcrypt checks at once and ``queue`` waiting; beyond that, no check (None)."""

    def __init__(self, workers: int = 2, queue: int = 8) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="carbond-bcrypt")
        self._slots = workers + queue
        self._used = 0
        self._verified: OrderedDict[bytes, None] = OrderedDict()  # good logins, least recently used first
        self._dummies: dict[int, bytes] = {}  # cost -> a hash of no password, made once
        self._dummy_lock = threading.Lock()
        self._preparing: set[int] = set()

    async def run(self, fn: Callable[[], T]) -> T | None:
        if self._used >= self._slots:
            return None
        self._used += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._used -= 1

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
        work, outside the bound: at most one job per cost, however many reloads ask)."""
        if cost in self._dummies or cost in self._preparing:
            return
        self._preparing.add(cost)
        self._executor.submit(self.dummy, cost)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FailureLimiter:
    """A token bucket of failed logins per client: ``burst`` at once, then ``per_s`` a second. A client is an IPv4
    address, or an IPv6 /64 (one host usually has a whole /64 to draw fresh addresses from)."""

    def __init__(
        self, burst: float = 10, per_s: float = 1.0, clients: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst, self._rate, self._max = burst, per_s, clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

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

    def allowed(self, peer: str) -> bool:
        peer = self.client(peer)
        return peer not in self._buckets or self._tokens(peer) >= 1

    def failed(self, peer: str) -> None:
        peer = self.client(peer)
        self._buckets[peer] = (max(self._tokens(peer) - 1, 0.0), self._clock())
        self._buckets.move_to_end(peer)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


class BasicAuth:
    """Checks a request's ``Authorization`` header against the users' bcrypt hashes."""

    def __init__(self, users: dict[str, str], pool: BcryptPool, limiter: FailureLimiter) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._pool, self._limiter = pool, limiter
        self._hashes = {u: h.encode() for u, h in users.items()}
        self.dummy_cost = max((_cost(h) for h in self._hashes.values()), default=10)
        if self._hashes:  # made on the pool now, ready before the first unknown user (a second at cost 14)
            pool.prepare_dummy(self.dummy_cost)

    def _check(self, user: str, password: bytes) -> bool:
        hashed = self._hashes.get(user)
        ok = self._bcrypt.checkpw(password[:BCRYPT_MAX], hashed or self._pool.dummy(self.dummy_cost))
        return ok and hashed is not None and len(password) <= BCRYPT_MAX

    async def check(self, request: Request) -> Response | None:
        """None when the request may pass; otherwise the answer (401, or 429 for a client over its limit)."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return UNAUTHORIZED
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return UNAUTHORIZED
        raw_user, _, password = decoded.partition(b":")
        user = raw_user.decode("utf-8", "replace")
        if not user:
            return UNAUTHORIZED
        hashed = self._hashes.get(user, b"")
        key = hashlib.sha256(user.encode() + b"\0" + hashed + b"\0" + password).digest()
        if hashed and self._pool.verified(key):  # the common case, a scrape with good credentials: no thread hop
            return None
        if not self._limiter.allowed(request.peer):
            return TOO_MANY
        ok = await self._pool.run(lambda: self._check(user, password))
        if ok is None:
            return TOO_MANY
        if ok:
            self._pool.remember(key)
            return None
        self._limiter.failed(request.peer)
        return UNAUTHORIZED
