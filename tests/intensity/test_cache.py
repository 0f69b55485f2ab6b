"""The cache: last good value, growing age, fallback chain, persistence across restarts, backoff, Retry-After."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from carbond.intensity.cache import CachedIntensity
from carbond.intensity.electricitymaps import ElectricityMaps
from carbond.intensity.persist import FILE_NAME
from carbond.intensity.static import lookup
from carbond.intensity.ukgrid import UkGrid
from carbond.intensity.watttime import WattTime
from carbond.sensors.rapl import MAX_POWER_W
from carbond.testing.provider_fakes import FakeElectricityMaps, FakeUkGrid, FakeWattTime
from tests.harness.monitors import build_monitor
from tests.harness.wait import eventually_async

pytestmark = pytest.mark.asyncio
GB = lookup("GB")


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def cache(
    providers: list[object], session: aiohttp.ClientSession, clock: Clock, tmp_path: Path | None = None, **kw: object
) -> CachedIntensity:
    return CachedIntensity(
        providers,  # type: ignore[arg-type]
        static=kw.pop("static", GB),  # type: ignore[arg-type]
        session=session,
        clock=clock,
        rng=random.Random(7),
        cache_file=tmp_path / FILE_NAME if tmp_path is not None else None,
        **kw,  # type: ignore[arg-type]
    )


async def test_value_then_growing_age_then_fallback(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with FakeUkGrid(actual=263) as fake:
        c = cache([UkGrid(fake.url)], session, clock, max_age_s=3600)
        assert c.current() == (GB, 0.0)  # before the first refresh: the static end of the chain
        with capture_logs() as logs:
            await c.refresh_once()
            value, age = c.current()
            assert value is not None
            assert (value.provider, value.g_per_kwh, age) == ("ukgrid", 263.0, 0.0)
            fake.fail(503)
            for delta in (600, 600, 1800):
                clock.now += delta
                await c.refresh_once()
                value, age = c.current()
                assert value is not None
                assert value.provider == "ukgrid"
            assert age == 3000
            clock.now += 601
            value, age = c.current()
            assert value == GB
            assert age == 0.0
            fake.ok()
            await c.refresh_once()
            value, _ = c.current()
            assert value is not None
            assert value.provider == "ukgrid"
    events = [e["event"] for e in logs]
    assert events.count("intensity_provider_failed") == 1  # one event when it fails, not one per retry
    assert events.count("intensity_provider_recovered") == 1
    assert "intensity_source_changed" in events
    state = c.providers()[0]
    assert state.up
    assert state.errors_total == 3


async def test_chain_skips_a_dead_provider(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    clock = Clock()
    token = tmp_path / "token"
    token.write_text("t")
    async with FakeElectricityMaps(token="t") as em, FakeUkGrid(actual=200) as uk:
        em.fail(500)
        c = cache([ElectricityMaps(em.url, "GB", token), UkGrid(uk.url)], session, clock)
        await c.refresh_once(0)
        await c.refresh_once(1)
        value, _ = c.current()
        assert value is not None
        assert value.provider == "ukgrid"
        em.ok()
        await c.refresh_once(0)
        value, _ = c.current()
        assert value is not None
        assert value.provider == "electricitymaps"
        assert value.g_per_kwh == 103.0


async def test_without_static_and_without_value_there_is_none(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid() as fake:
        fake.fail(500)
        c = cache([UkGrid(fake.url)], session, Clock(), static=None)
        await c.refresh_once()
        value, age = c.current()
    assert value is None
    assert math.isnan(age)


async def test_restart_serves_the_persisted_value_at_once(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    clock = Clock()
    async with FakeUkGrid(actual=140) as fake:
        first = cache([UkGrid(fake.url)], session, clock, tmp_path)
        await first.refresh_once()
    saved = json.loads((tmp_path / FILE_NAME).read_text())
    assert saved["providers"]["ukgrid"]["value"]["g_per_kwh"] == 140.0
    clock.now += 120  # the daemon was down two minutes; the provider is gone now
    second = cache([UkGrid(fake.url)], session, clock, tmp_path)
    value, age = second.current()
    assert value is not None
    assert (value.provider, value.g_per_kwh, age) == ("ukgrid", 140.0, 120.0)
    await second.refresh_once()  # connection refused: still served
    assert second.current()[0] == value
    other_region = cache([UkGrid(fake.url, region_id=3)], session, clock, tmp_path)
    assert other_region.current()[0] == GB  # a value saved for another region is not reused


async def test_corrupt_cache_file_is_ignored(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"version": 1, "providers": {"ukgrid": {"value": {"g_per_kwh": 1e9}}}}')
    with capture_logs() as logs:
        c = cache([UkGrid("http://127.0.0.1:9")], session, Clock(), tmp_path)
    assert c.current()[0] == GB
    assert [e["event"] for e in logs] == ["intensity_cache_entry_ignored"]
    (tmp_path / FILE_NAME).write_text("{not json")
    with capture_logs() as logs:
        cache([UkGrid("http://127.0.0.1:9")], session, Clock(), tmp_path)
    assert [e["event"] for e in logs] == ["intensity_cache_unreadable"]


async def test_backoff_grows_with_jitter_and_honours_retry_after(session: aiohttp.ClientSession) -> None:
    async with FakeUkGrid() as fake:
        fake.fail(500)
        c = cache([UkGrid(fake.url)], session, Clock(), refresh_s=600, retry_min_s=10)
        delays = [await c.refresh_once() for _ in range(8)]
        assert all(5 <= d <= 10 for d in delays[:1])
        assert all(10 <= d <= 20 for d in delays[1:2])
        assert delays[3] > delays[1]
        assert all(d <= 600 for d in delays)
        assert delays[-1] >= 300
        fake.fail(429, retry_after="1800")
        assert await c.refresh_once() == 1800.0
        fake.ok()
        assert 540 <= await c.refresh_once() <= 660  # back to the refresh interval


async def test_marginal_is_exported_but_not_used_for_emissions(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("pw")
    async with FakeWattTime(password="pw") as fake:
        wt = WattTime(fake.url, "CAISO_NORTH", "carbond", pw)
        avg = cache([wt], session, Clock())
        await avg.refresh_once()
        assert avg.current() == (GB, 0.0)
        assert [(v.provider, v.signal) for v, _ in avg.values()] == [("watttime", "marginal"), ("static", "average")]
        assert avg.forecast() is None  # no forecast of the average signal
        marginal = cache([wt], session, Clock(), signal="marginal")
        await marginal.refresh_once()
        value, _ = marginal.current()
        assert value is not None
        assert value.signal == "marginal"
        assert value.g_per_kwh == pytest.approx(475.55, 0.01)
        fc = marginal.forecast()
        assert fc is not None
        assert fc.g_per_kwh == pytest.approx(500 * 0.45359237)
        assert 3000 < fc.starts_in_s <= 3600
        assert fc.signal == "marginal"


async def test_forecast_lowest_window_of_the_next_24h(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with FakeUkGrid() as fake:
        c = cache([UkGrid(fake.url)], session, clock)
        await c.refresh_once()
    fc = c.forecast()
    assert fc is not None
    assert (fc.g_per_kwh, fc.provider, fc.zone) == (150.0, "ukgrid", "GB")
    half_hour = time.time() // 1800 * 1800
    assert fc.starts_at == half_hour + 3600
    assert fc.starts_in_s == pytest.approx(fc.starts_at - clock.now)
    clock.now = fc.starts_at + 60  # inside the window: it starts now
    fc2 = c.forecast()
    assert fc2 is not None
    assert fc2.starts_in_s == 0.0


async def test_background_refresh_and_a_hanging_provider_never_blocks(tmp_path: Path) -> None:
    async with FakeUkGrid(actual=99) as fake:
        c = CachedIntensity([UkGrid(fake.url, timeout_s=5)], static=GB, refresh_s=0.05, cache_file=tmp_path / "c")
        await c.start()
        try:
            await eventually_async(lambda: c.current()[0] != GB, what="the fetched value")
            value, _ = c.current()
            assert value is not None
            assert value.g_per_kwh == 99.0
            fake.hang(30)
            asked = len(fake.requests)
            await eventually_async(lambda: len(fake.requests) > asked, what="a refresh stuck on the network")
            started = time.perf_counter()
            for _ in range(1000):
                value, _ = c.current()
            assert time.perf_counter() - started < 0.5
            assert value is not None
            assert value.g_per_kwh == 99.0
        finally:
            await c.close()
    assert (tmp_path / "c").exists()


async def test_secrets_never_reach_logs_or_states(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    secret = "s3cr3t-token-value"
    token = tmp_path / "token"
    token.write_text(secret)
    async with FakeElectricityMaps(token="other") as em, FakeWattTime(password="other") as wt:
        c = cache([ElectricityMaps(em.url, "FR", token), WattTime(wt.url, "CAISO_NORTH", "u", token)], session, Clock())
        with capture_logs() as logs:
            await c.refresh_once(0)
            await c.refresh_once(1)
    text = repr(logs) + repr(c.providers())
    assert "HTTP 401" in text
    assert secret not in text


async def test_cache_write_failure_is_counted_and_reaches_the_persist_errors_metric(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from carbond.sensors.fake import FakeDevice, FakeSensor
    from carbond.state import Persistence, StateStore
    from carbond.testing.clock import ManualClock

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    async with FakeUkGrid(actual=263) as fake:
        c = cache([UkGrid(fake.url)], session, Clock(), tmp_path=blocker)
        with capture_logs() as logs:
            await c.refresh_once()
    assert c.current()[0] is not None
    assert c.current()[0].g_per_kwh == 263.0
    assert c.persist_errors == 1
    assert [e["event"] for e in logs].count("intensity_cache_save_failed") == 1
    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await sensor.start()
    mon = build_monitor(
        sensor,
        host="n",
        interval_s=1,
        intensity=c,
        clock=clock,
        persistence=Persistence(StateStore(tmp_path / "state"), "n", "b", max_power_w=MAX_POWER_W),
    )
    assert (await mon.tick()).health.state_persist_errors == 1
