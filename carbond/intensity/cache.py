"""The cached grid-intensity feed: background refreshes, a persisted last good value, an explicit fallback chain.

Each live provider of ``intensity.providers`` refreshes in its own task every ``refresh_s`` (+-10 % jitter). A
failure (timeout, refused connection, 4xx/5xx, invalid JSON, missing fields, a value outside 0-2,000 g/kWh) is
retried after an exponential backoff with equal jitter (``retry_min_s`` doubling up to ``refresh_s``), or after the
server's ``Retry-After`` when it sent one. One log event when a provider starts failing, one when it recovers.

:meth:`CachedIntensity.current` (called every tick) never waits: it walks the chain and serves the first provider
whose value has the configured signal and is at most ``max_age_s`` old (age = time since it was fetched), else the
static table when ``static`` ends the chain, else None. Every good value is written atomically (temp file, fsync,
rename) to ``<state_dir>/intensity-cache.json`` so a restart without network serves it at once, with its true age.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp

from carbond import __version__
from carbond.intensity.config import MAX_AGE_S, REFRESH_S, RETRY_MIN_S
from carbond.intensity.http import ForecastPoint, LiveProvider, ProviderError
from carbond.intensity.persist import CacheFile, Saved
from carbond.logs import get_logger
from carbond.model import Intensity, IntensityForecast, IntensityProviderState, ZoneSource

log = get_logger("carbond.intensity.cache")

FORECAST_HORIZON_S = 24 * 3600.0
MAX_RETRY_AFTER_S = 24 * 3600.0
#: How long close() waits for the last good value to reach the cache file (a save in progress, or one not yet made).
CLOSE_SAVE_TIMEOUT_S = 5.0


@dataclass
class _Slot:
    provider: LiveProvider
    value: Intensity | None = None
    fetched_at: float = math.nan  # wall clock
    forecast: tuple[ForecastPoint, ...] = ()
    up: bool = True
    failing_since: float | None = None
    errors_total: int = 0
    reason: str = ""
    failures: int = 0  # consecutive


class CachedIntensity:
    """An :class:`~carbond.intensity.IntensitySource` over a chain of live providers ending (usually) in static."""

    def __init__(
        self,
        providers: Sequence[LiveProvider],
        *,
        static: Intensity | None,
        signal: Literal["average", "marginal"] = "average",
        refresh_s: float = REFRESH_S,
        max_age_s: float = MAX_AGE_S,
        retry_min_s: float = RETRY_MIN_S,
        forecast: bool = True,
        cache_file: Path | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        zone: str = "",
        zone_source: ZoneSource = "config",
    ) -> None:
        self._zone = zone or (static.zone if static is not None else "")
        self.zone_source: ZoneSource = zone_source
        self._slots = [_Slot(p) for p in providers]
        self._static = static
        self._signal = signal
        self._refresh_s = refresh_s
        self._max_age_s = max_age_s
        self._retry_min_s = min(retry_min_s, refresh_s)
        self._want_forecast = forecast
        self._file = CacheFile(cache_file) if cache_file is not None else None
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._rng = rng or random.Random()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_force: str | None = None
        self._save_lock = asyncio.Lock()
        self._saving: asyncio.Future[None] | None = None  # the file write in flight (it outlives a cancelled task)
        self._dirty = False  # a value was published that the cache file does not hold yet
        self.persist_errors = 0
        self._load()

    @property
    def zone(self) -> str:
        return self._zone

    # ---- reads: every tick and scrape, never waiting --------------------------------------------------------------

    def _fresh(self, slot: _Slot, now: float) -> float | None:
        """The age of the slot's value if it may be served, else None."""
        if slot.value is None:
            return None
        age = max(0.0, now - slot.fetched_at)
        return age if age <= self._max_age_s else None

    def current(self) -> tuple[Intensity | None, float]:
        now = self._clock()
        chosen: tuple[Intensity | None, float] = (self._static, 0.0) if self._static is not None else (None, math.nan)
        for slot in self._slots:
            age = self._fresh(slot, now)
            if age is not None and slot.value is not None and slot.value.signal == self._signal:
                chosen = (slot.value, age)
                break
        self._note_in_force(chosen[0])
        return chosen

    def _note_in_force(self, value: Intensity | None) -> None:
        name = value.provider if value is not None else None
        if name == self._in_force:
            return
        previous, self._in_force = self._in_force, name
        if previous is None:
            return
        order = [s.provider.name for s in self._slots] + ["static"]
        rank = {n: i for i, n in enumerate(order)}
        if name is not None and rank.get(name, len(order)) < rank.get(previous, len(order)):
            log.info("intensity_source_changed", previous=previous, now=name, reason="an earlier provider has a value")
        else:
            log.warning(
                "intensity_source_changed",
                previous=previous,
                now=name,
                reason=f"{previous} has no value younger than max_age ({self._max_age_s:g} s)",
            )

    def values(self) -> tuple[tuple[Intensity, float], ...]:
        """Every value that may be served now with its age: each live provider's (either signal), then static."""
        now = self._clock()
        out = []
        for slot in self._slots:
            age = self._fresh(slot, now)
            if age is not None and slot.value is not None:
                out.append((slot.value, age))
        if self._static is not None:
            out.append((self._static, 0.0))
        return tuple(out)

    def forecast(self) -> IntensityForecast | None:
        """The lowest forecast value of the next 24 h, from the first provider of the configured signal with one."""
        now = self._clock()
        for slot in self._slots:
            if slot.value is None or slot.value.signal != self._signal or self._fresh(slot, now) is None:
                continue
            window = [p for p in slot.forecast if p.ends_at > now and p.starts_at < now + FORECAST_HORIZON_S]
            if window:
                best = min(window, key=lambda p: (p.g_per_kwh, p.starts_at))
                return IntensityForecast(
                    g_per_kwh=best.g_per_kwh,
                    starts_at=best.starts_at,
                    starts_in_s=max(0.0, best.starts_at - now),
                    provider=slot.provider.name,
                    zone=slot.value.zone,
                    signal=slot.value.signal,
                )
        return None

    def providers(self) -> tuple[IntensityProviderState, ...]:
        now = self._clock()
        return tuple(
            IntensityProviderState(
                provider=s.provider.name,
                up=s.up and s.value is not None,
                errors_total=s.errors_total,
                age_s=max(0.0, now - s.fetched_at) if s.value is not None else math.nan,
                reason=s.reason,
            )
            for s in self._slots
        )

    # ---- the background refresh ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks or not self._slots:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": f"carbond/{__version__}"})
        self._tasks = [asyncio.create_task(self._run(s), name=f"intensity-{s.provider.name}") for s in self._slots]

    async def close(self) -> None:
        """Stop the refreshes, then make sure the last good value is on disk: a save cut short by the cancellation
        is waited for, and a value published but not yet saved (shutdown during the forecast fetch) is saved, both
        within CLOSE_SAVE_TIMEOUT_S."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh_once(self, slot_index: int = 0) -> float:
        """One refresh of one provider (what the task does each time); returns the delay before the next."""
        return await self._refresh(self._slots[slot_index])

    async def _run(self, slot: _Slot) -> None:
        while True:
            delay = await self._refresh(slot)
            await asyncio.sleep(delay)

    async def _refresh(self, slot: _Slot) -> float:
        assert self._session is not None, "start() first"
        name = slot.provider.name
        try:
            value = await slot.provider.fetch(self._session)
        except ProviderError as exc:
            return self._failed(slot, exc.reason, exc.retry_after)
        except Exception as exc:  # noqa: BLE001 - a provider bug must not end the refresh task: count it and retry like a failure
            return self._failed(slot, f"unexpected {type(exc).__name__}", None)
        now = self._clock()
        if not slot.up:
            log.info(
                "intensity_provider_recovered",
                provider=name,
                zone=value.zone,
                g_per_kwh=value.g_per_kwh,
                failed_for_s=round(now - (slot.failing_since or now), 3),
            )
        elif slot.value is None:
            log.info("intensity_provider_up", provider=name, zone=value.zone, g_per_kwh=value.g_per_kwh)
        slot.value, slot.fetched_at = value, now
        self._dirty = True
        slot.up, slot.failing_since, slot.reason, slot.failures = True, None, "", 0
        if self._want_forecast:
            await self._refresh_forecast(slot)
        await self._save()
        return self._refresh_s * self._rng.uniform(0.9, 1.1)

    async def _refresh_forecast(self, slot: _Slot) -> None:
        assert self._session is not None
        try:
            slot.forecast = await slot.provider.fetch_forecast(self._session)
        except ProviderError as exc:  # optional data: the value stays good; the old forecast ages out by itself
            log.debug("intensity_forecast_failed", provider=slot.provider.name, reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - optional data: a provider bug must not end the refresh
            log.warning("intensity_forecast_failed", provider=slot.provider.name, reason=type(exc).__name__)

    def _failed(self, slot: _Slot, reason: str, retry_after: float | None) -> float:
        now = self._clock()
        slot.errors_total += 1
        slot.failures += 1
        slot.reason = reason
        backoff = min(self._refresh_s, self._retry_min_s * 2.0 ** min(slot.failures - 1, 30))
        delay = backoff / 2 + self._rng.uniform(0, backoff / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        if slot.up:
            slot.up, slot.failing_since = False, now
            age = self._fresh(slot, now)
            log.warning(
                "intensity_provider_failed",
                provider=slot.provider.name,
                reason=reason,
                serving="cached value" if age is not None else "next provider of the chain",
                cached_age_s=None if age is None else round(age, 3),
                retry_in_s=round(delay, 3),
            )
        else:
            log.debug("intensity_provider_still_failing", provider=slot.provider.name, reason=reason)
        return delay

    # ---- persistence -----------------------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._file is None:
            return
        saved = self._file.load()
        for slot in self._slots:
            entry = saved.get(slot.provider.name)
            if entry is None or entry.key != slot.provider.key:
                continue  # nothing saved, or saved for another zone or region
            slot.value, slot.fetched_at, slot.forecast = entry.value, entry.fetched_at, entry.forecast
            log.info(
                "intensity_cache_loaded",
                provider=slot.provider.name,
                zone=entry.value.zone,
                g_per_kwh=entry.value.g_per_kwh,
                age_s=round(max(0.0, self._clock() - entry.fetched_at), 3),
            )

    async def _save(self) -> None:
        if self._file is None:
            return
        entries = {
            s.provider.name: Saved(s.provider.key, s.value, s.fetched_at, s.forecast)
            for s in self._slots
            if s.value is not None
        }
        async with self._save_lock:
            self._dirty = False
            saving = self._saving = asyncio.ensure_future(asyncio.to_thread(self._file.save, entries))
            saving.add_done_callback(self._saved)
            with contextlib.suppress(OSError):  # counted and logged by _saved
                await asyncio.shield(saving)  # a cancelled refresh leaves the write to finish (close() waits for it)

    def _saved(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or (exc := fut.exception()) is None:
            return
        self._dirty = True  # try again at the next refresh or at close
        self.persist_errors += 1
        assert self._file is not None
        log.warning("intensity_cache_save_failed", path=str(self._file.path), error=type(exc).__name__)

    async def _flush(self) -> None:
        """Wait for a write in flight, then write what is still unsaved; bounded by CLOSE_SAVE_TIMEOUT_S in all."""
        if self._file is None:
            return
        timeout = CLOSE_SAVE_TIMEOUT_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._saving is not None and not self._saving.done():
            await asyncio.wait({self._saving}, timeout=timeout)
        if not self._dirty:
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._save()
        except TimeoutError:
            log.warning("intensity_cache_save_timeout", path=str(self._file.path), timeout_s=timeout)
