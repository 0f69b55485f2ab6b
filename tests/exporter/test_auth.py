"""Basic auth under a wrong-password flood: its own bounded pool, failed logins limited, equal work for all."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import bcrypt
import pytest

from carbond.exporter.auth import BasicAuth, BcryptPool, FailureLimiter
from carbond.exporter.http import Request
from carbond.exporter.live import LiveWebConfig
from carbond.exporter.server import start_server
from tests.harness.snapshots import frozen_snapshot


def request(user: str, password: str, peer: str = "127.0.0.1") -> Request:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return Request("GET", "/metrics", {"authorization": f"Basic {token}"}, peer)


def test_the_dummy_hash_for_unknown_users_has_the_highest_configured_cost() -> None:
    users = {"a": bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode(), "b": bcrypt.hashpw(b"y", bcrypt.gensalt(6)).decode()}
    pool = BcryptPool()
    try:
        auth = BasicAuth(users, pool, FailureLimiter())
        assert auth.dummy_cost == 6
        assert pool.dummy(auth.dummy_cost).startswith(b"$2b$06$")
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_unknown_users_and_wrong_passwords_cost_the_same_bcrypt_work() -> None:
    users = {"prom": bcrypt.hashpw(b"right", bcrypt.gensalt(9)).decode()}
    pool = BcryptPool()
    auth = BasicAuth(users, pool, FailureLimiter(burst=100))
    try:
        await auth.check(request("nobody", "x"))  # makes the dummy hash once

        async def timed(user: str) -> float:
            t0 = time.perf_counter()
            refused = await auth.check(request(user, "wrong"))
            assert refused is not None
            assert refused.status == 401
            return time.perf_counter() - t0

        unknown = min([await timed("nobody") for _ in range(3)])
        wrong = min([await timed("prom") for _ in range(3)])
        assert 0.5 < unknown / wrong < 2.0  # cost 10 against 12 was 4x faster
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_a_wrong_password_flood_leaves_the_default_executor_free_and_is_limited(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b'right', bcrypt.gensalt(10)).decode()}'\n")
    snap = await frozen_snapshot()
    live = LiveWebConfig(web)
    server = await start_server(lambda: snap, "127.0.0.1", 0, live)
    loop = asyncio.get_running_loop()

    async def attempt(password: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        token = base64.b64encode(f"prom:{password}".encode()).decode()
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        return int(line.split()[1])

    try:
        assert await attempt("right") == 200  # cached from now on
        flood = [asyncio.create_task(attempt(f"wrong{i}")) for i in range(40)]
        await asyncio.sleep(0.05)
        t0 = loop.time()
        await loop.run_in_executor(None, time.sleep, 0)  # what a GPU read waits for
        assert loop.time() - t0 < 0.1
        statuses = await asyncio.gather(*flood)
        assert set(statuses) <= {401, 429}
        assert statuses.count(429) >= 20
        assert await attempt("right") == 200  # the scraper's cached credentials pass through the flood
    finally:
        await server.close()
        live.close()


@pytest.mark.asyncio
async def test_reloads_do_not_queue_bcrypt_work_ahead_of_logins(tmp_path: Path) -> None:
    """Each reload made a new dummy hash on the two bcrypt threads, outside the pool's bound: 40 SIGHUPs at cost 12
    kept both threads busy for seconds, and a scraper's login waited behind them. One dummy per cost now."""
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b'right', bcrypt.gensalt(12)).decode()}'\n")
    live = LiveWebConfig(web)
    try:
        for _ in range(40):
            assert live.reload()
        t0 = time.perf_counter()
        assert live.auth is not None
        assert await live.auth.check(request("prom", "right")) is None
        assert time.perf_counter() - t0 < 2.0
    finally:
        live.close()


def test_the_failure_limiter_refills_and_forgets_old_clients() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=2, per_s=1.0, clients=2, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    assert not limiter.allowed("a")
    assert limiter.allowed("b")
    now[0] = 1.0
    assert limiter.allowed("a")
    limiter.failed("b")
    limiter.failed("c")  # three clients in a table of two: the least recent one goes
    assert limiter.allowed("a")


@pytest.mark.asyncio
async def test_a_good_login_stays_remembered_across_a_reload_while_a_revoked_one_does_not(tmp_path: Path) -> None:
    """Just after a reload a wrong-password flood fills the bcrypt pool: the scraper, whose user and password did
    not change, passes without bcrypt work (the memory was dropped at each reload, and it got 429 until the flood
    ended). A changed hash is never matched by what was remembered."""
    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")
    live = LiveWebConfig(web)
    try:
        assert live.auth is not None
        assert await live.auth.check(request("prom", "right")) is None
        web.write_text(f"basic_auth_users:\n  prom: '{hashed}'\n  other: '{hashed}'\n")
        assert live.reload()
        auth = live.auth
        assert auth is not None
        flood = [asyncio.create_task(auth.check(request("prom", f"wrong{i}", f"10.0.0.{i}"))) for i in range(12)]
        await asyncio.sleep(0)  # every slot of the pool taken
        # not remembered, but from an address that has not failed: checked ahead of the flood's queued checks
        assert await auth.check(request("other", "right", "10.0.1.1")) is None
        assert await auth.check(request("prom", "right")) is None
        await asyncio.gather(*flood)
        web.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b'new', bcrypt.gensalt(4)).decode()}'\n")
        assert live.reload()
        assert live.auth is not None
        refused = await live.auth.check(request("prom", "right"))
        assert refused is not None
        assert refused.status == 401
    finally:
        live.close()


def test_failed_logins_from_one_ipv6_64_share_a_bucket() -> None:
    limiter = FailureLimiter(burst=2, per_s=0.0)
    limiter.failed("2001:db8::1")
    limiter.failed("2001:db8::ffff:2")  # another address of the same /64
    assert not limiter.allowed("2001:db8::3")
    assert limiter.allowed("2001:db8:0:1::1")
    assert limiter.allowed("10.0.0.1")
