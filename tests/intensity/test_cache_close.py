"""Shutdown keeps the last fetched intensity: close() finishes or makes the save of a value already published."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from carbond.intensity.cache import CachedIntensity
from carbond.intensity.http import ForecastPoint
from carbond.intensity.persist import FILE_NAME, CacheFile
from carbond.intensity.static import lookup
from carbond.model import Intensity
from tests.harness.wait import eventually_async

pytestmark = pytest.mark.asyncio
GB = lookup("GB")


class SlowForecast:
    """A provider whose value comes at once and whose forecast never does (a provider slow on its second URL)."""

    name = "ukgrid"
    key = "GB"

    def __init__(self) -> None:
        self.fetched = 0
        self.forecast_asked = asyncio.Event()

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        self.fetched += 1
        return Intensity(g_per_kwh=123.0, provider=self.name, zone="GB", observed_at=time.time())

    async def fetch_forecast(self, session: aiohttp.ClientSession) -> tuple[ForecastPoint, ...]:
        self.forecast_asked.set()
        await asyncio.Event().wait()
        return ()


class SlowFile(CacheFile):
    """A cache file whose write takes ``seconds`` in its worker thread (a slow disk at shutdown)."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(path)
        self.seconds = seconds
        self.started = False

    def save(self, *args: object, **kw: object) -> None:
        self.started = True
        time.sleep(self.seconds)  # the slow disk itself, in the worker thread
        super().save(*args, **kw)  # type: ignore[arg-type]


async def test_close_during_the_forecast_fetch_saves_the_value_already_served(tmp_path: Path) -> None:
    provider = SlowForecast()
    async with aiohttp.ClientSession() as session:
        c = CachedIntensity([provider], static=GB, session=session, cache_file=tmp_path / FILE_NAME)
        await c.start()
        await asyncio.wait_for(provider.forecast_asked.wait(), 30)
        assert c.current()[0] is not None
        assert c.current()[0].g_per_kwh == 123.0
        assert not (tmp_path / FILE_NAME).exists()
        await c.close()
    saved = CacheFile(tmp_path / FILE_NAME).load()
    assert saved["ukgrid"].value.g_per_kwh == 123.0


async def test_close_waits_for_a_save_in_progress(tmp_path: Path) -> None:
    provider = SlowForecast()
    async with aiohttp.ClientSession() as session:
        c = CachedIntensity([provider], static=GB, session=session, cache_file=tmp_path / FILE_NAME, forecast=False)
        slow = SlowFile(tmp_path / FILE_NAME, 0.5)
        c._file = slow  # the same file, written slowly
        await c.start()
        await eventually_async(lambda: slow.started, what="the save to begin")
        await c.close()  # cancels the refresh task mid-save
    assert CacheFile(tmp_path / FILE_NAME).load()["ukgrid"].value.g_per_kwh == 123.0


async def test_close_is_bounded_when_the_disk_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carbond.intensity import cache as cache_module

    monkeypatch.setattr(cache_module, "CLOSE_SAVE_TIMEOUT_S", 0.2)
    provider = SlowForecast()
    async with aiohttp.ClientSession() as session:
        c = CachedIntensity([provider], static=GB, session=session, cache_file=tmp_path / FILE_NAME, forecast=False)
        slow = SlowFile(tmp_path / FILE_NAME, 3.0)
        c._file = slow
        await c.start()
        await eventually_async(lambda: slow.started, what="the save to begin")
        loop = asyncio.get_running_loop()
        began = loop.time()
        await c.close()
        assert loop.time() - began < 2.5  # the bound, not the disk, ends close()
