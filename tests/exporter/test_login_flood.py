"""Password floods cannot lock valid scrapers out: the guarantees SECURITY.md states, under concurrent floods.

- a valid user's first login is served within a few seconds while many addresses flood wrong passwords;
- unknown users get their 401 in bounded time, even with an expensive user in the file;
- admission before the hash: concurrent requests from one address run no more checks than its bucket allows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from pathlib import Path

import bcrypt
import pytest

from carbond.exporter.auth import BasicAuth, BcryptPool, FailureLimiter
from carbond.exporter.http import Request
from carbond.exporter.live import LiveWebConfig
from carbond.exporter.server import start_server
from tests.harness.snapshots import frozen_snapshot
from tests.harness.wait import eventually_async

#: A bound for a loaded 2-core machine; the design's figure is one bcrypt check (about 0.1 s at cost 10).
FIRST_LOGIN_S = 5.0


def token(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def fake_hash(cost: int) -> str:
    """A well-formed bcrypt hash of the given cost that no password matches (making a real one at cost 16 would
    take as long as checking it)."""
    return f"$2b${cost:02d}$" + "abcdefghijklmnopqrstuu" + "A" * 31


async def get(port: int, user: str, password: str, source: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token(user, password)}\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), 60)
    finally:  # closed whatever happened (a reset, a cancelled flood task): no socket left to the collector
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(line.split()[1]), time.perf_counter() - t0


@pytest.mark.asyncio
async def test_first_logins_are_served_while_ten_addresses_flood_wrong_passwords(tmp_path: Path) -> None:
    """12 wrong-password loops from each of 10 addresses; 20 users log in for the first time, from addresses of
    their own: every one is served (it was 0 of 20, all 429)."""
    users = {f"u{i}": bcrypt.hashpw(f"pw{i}".encode(), bcrypt.gensalt(8)).decode() for i in range(20)}
    users["prom"] = bcrypt.hashpw(b"right", bcrypt.gensalt(10)).decode()
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items()))
    snap = await frozen_snapshot()
    live = LiveWebConfig(web)
    server = await start_server(lambda: snap, "127.0.0.1", 0, live)
    stop = asyncio.Event()

    async def loop(source: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(OSError):  # a flooding client refused or reset by the server's limits
                await get(server.port, "prom" if n % 2 else f"nobody{n}", f"wrong{n}", source)

    flood = [asyncio.create_task(loop(f"127.0.2.{a}")) for a in range(1, 11) for _ in range(12)]
    try:
        await eventually_async(lambda: live.refused_logins()["wrong"] >= 10, 30, what="the flood under way")
        results = await asyncio.gather(*(get(server.port, f"u{i}", f"pw{i}", f"127.0.3.{i + 1}") for i in range(20)))
        assert [status for status, _ in results] == [200] * 20
        assert max(took for _, took in results) < FIRST_LOGIN_S
        refused = live.refused_logins()
        assert refused["rate_limited"] + refused["busy"] > 0
        assert refused["wrong"] > 0
    finally:
        stop.set()
        await asyncio.gather(*flood, return_exceptions=True)
        await server.close()
        live.close()


def request(user: str, password: str, peer: str) -> Request:
    return Request("GET", "/metrics", {"authorization": f"Basic {token(user, password)}"}, peer)


@pytest.mark.asyncio
async def test_an_expensive_user_under_a_flood_delays_neither_unknown_users_nor_other_first_logins() -> None:
    """A cost-16 user (about 5 s a check here, 20 s at cost 18) flooded from 20 addresses: unknown users still get
    their 401 and another user's first login its pass in well under a second of bcrypt work (with the cost-18
    user, unknown users waited 16-80 s and first logins got 429)."""
    pool = BcryptPool()
    users = {"slow": fake_hash(16), "prom": bcrypt.hashpw(b"right", bcrypt.gensalt(8)).decode()}
    auth = BasicAuth(users, pool, FailureLimiter())
    try:
        assert auth.dummy_cost == 10  # bounded, whatever the highest cost in the file
        flood = [asyncio.create_task(auth.check(request("slow", "x", f"10.1.0.{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # the flood is queued first
        t0 = time.perf_counter()
        unknown = await auth.check(request("nobody", "x", "10.2.0.1"))
        took_unknown = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert await auth.check(request("prom", "right", "10.2.0.2")) is None
        took_login = time.perf_counter() - t0
        assert unknown is not None
        assert unknown.status == 401
        assert took_unknown < FIRST_LOGIN_S
        assert took_login < FIRST_LOGIN_S
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_concurrent_requests_from_one_address_run_no_more_checks_than_its_bucket() -> None:
    """Failures were charged after the check, so 46 checks ran in 11 s where the limit allows 21."""
    pool = BcryptPool()
    auth = BasicAuth({"prom": bcrypt.hashpw(b"right", bcrypt.gensalt(6)).decode()}, pool, FailureLimiter())
    try:
        t0 = time.monotonic()
        answers = await asyncio.gather(*(auth.check(request("prom", f"w{i}", "10.3.0.1")) for i in range(60)))
        elapsed = time.monotonic() - t0
        statuses = [a.status for a in answers if a is not None]
        assert len(statuses) == 60
        assert set(statuses) <= {401, 429}
        assert statuses.count(401) <= 10 + elapsed * 1.0 + 1  # burst, plus what refilled meanwhile
        assert pool.refused["wrong"] == statuses.count(401)
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_a_trusted_check_goes_before_queued_checks_of_failing_addresses() -> None:
    """Scheduling alone: with one thread busy, failing addresses' checks wait behind a first login."""
    pool = BcryptPool(workers=2)
    limiter = FailureLimiter()
    auth = BasicAuth({"prom": bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()}, pool, limiter)
    order: list[str] = []
    try:
        for i in range(8):
            limiter.failed(f"10.4.0.{i}")  # eight addresses that failed before
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def blocked(name: str) -> str:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(30)
            order.append(name)
            return name

        hold = asyncio.create_task(pool.run(lambda: blocked("held"), lane="x", client="10.9.9.9", trusted=True))
        waiting = [
            asyncio.create_task(pool.run(lambda i=i: f"failing{i}", lane="y", client=f"10.4.0.{i}")) for i in range(8)
        ]
        await asyncio.sleep(0)
        first = asyncio.create_task(pool.run(lambda: "first login", lane="z", client="10.5.0.1", trusted=True))
        assert await asyncio.wait_for(first, 10) == "first login"
        assert not hold.done()
        gate.set()
        await asyncio.gather(hold, *waiting)
        del auth
    finally:
        pool.close()
