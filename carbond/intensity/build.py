"""The factory the composition root calls: ``intensity`` config section -> a running-ready intensity source.

    source = await build_source(cfg.intensity, cfg.resolved_state_dir())
    await source.start()          # background refreshes (no-op for fixed values)
    ...  monitor reads source.current() each tick; the exporter may read values(), forecast(), providers()
    await source.close()

- ``override_g_per_kwh`` set: a fixed value (provider ``override``, source ``config``), nothing else runs;
- ``providers: [static]``: the static table's value, fixed;
- otherwise a :class:`~carbond.intensity.cache.CachedIntensity` over the live providers, with the static value as
  the end of the chain when ``static`` is listed.

``zone: auto`` is resolved here (instance metadata, 1 s timeouts), so this coroutine may take about a second.

The HTTP client (aiohttp) and the live providers are imported only when the config needs them: a daemon on the
static tables does not carry their memory.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from carbond.intensity import FixedIntensity, ManagedIntensity
from carbond.intensity.config import IntensityConfig
from carbond.intensity.static import StaticProvider
from carbond.intensity.timezone import TimezoneCountry, locate
from carbond.logs import get_logger
from carbond.model import Intensity, ZoneSource

log = get_logger("carbond.intensity")

CONFIG: ZoneSource = "config"

if TYPE_CHECKING:
    import aiohttp

    from carbond.intensity.http import LiveProvider


def zone_from_timezone(found: TimezoneCountry) -> tuple[str, ZoneSource]:
    """The zone for an unset ``intensity.zone`` and where it came from: the time zone's country (``timezone``), else
    the world average (``default``, warned once)."""
    if found.country is not None:
        log.info(
            "zone_from_timezone",
            zone=found.country,
            zone_source="timezone",
            timezone=found.tz,
            source=found.how,
            key="intensity.zone",
        )
        return found.country, "timezone"
    log.warning(
        "zone_unknown",
        zone="world",
        zone_source="default",
        timezone=found.tz or None,
        reason="no intensity.zone configured and the time zone names no country",
        key="intensity.zone",
    )
    return "world", "default"


def live_providers(cfg: IntensityConfig, zone: str) -> list[LiveProvider]:
    """The chain's network providers, in order, each with only its own settings."""
    from carbond.intensity.electricitymaps import ElectricityMaps
    from carbond.intensity.ukgrid import UkGrid
    from carbond.intensity.watttime import WattTime

    out: list[LiveProvider] = []
    for name in cfg.providers:
        if name == "electricitymaps":
            em = cfg.electricitymaps
            out.append(ElectricityMaps(em.base_url, em.zone or zone, em.token_file, em.token_env, cfg.timeout_secs))
        elif name == "watttime":
            wt = cfg.watttime
            out.append(
                WattTime(
                    wt.base_url, wt.region or zone, wt.username, wt.password_file, wt.password_env, cfg.timeout_secs
                )
            )
        elif name == "ukgrid":
            uk = cfg.ukgrid
            out.append(UkGrid(uk.base_url, uk.region_id, uk.postcode, cfg.timeout_secs))
    return out


async def build_source(
    cfg: IntensityConfig,
    state_dir: Path | None,
    *,
    session: aiohttp.ClientSession | None = None,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> ManagedIntensity:
    """The intensity source for ``cfg``; ``state_dir`` None disables the persisted cache.

    ``session`` (default: one the source creates in ``start()`` and closes in ``close()``), ``clock`` (wall
    seconds) and ``rng`` (backoff jitter) are for tests.
    """
    zone, zone_source = cfg.zone, CONFIG
    if "zone" not in cfg.model_fields_set:
        zone, zone_source = zone_from_timezone(locate())
    if zone.strip().lower() == "auto":
        from carbond.intensity.location import resolve_zone

        zone, zone_source = await resolve_zone(zone, cfg.fallback_zone, cfg.metadata, session)
    if cfg.override_g_per_kwh is not None:
        value = Intensity(
            g_per_kwh=cfg.override_g_per_kwh, provider="override", zone=zone, observed_at=0.0, source="config"
        )
        return FixedIntensity(value, zone_source)
    static = StaticProvider(zone).value() if "static" in cfg.providers else None
    if not any(name != "static" for name in cfg.providers):
        assert static is not None  # the config requires a provider; static is the only non-live one
        return FixedIntensity(static, zone_source)
    from carbond.intensity.cache import CachedIntensity
    from carbond.intensity.persist import FILE_NAME

    live = live_providers(cfg, zone)
    return CachedIntensity(
        live,
        static=static,
        signal=cfg.signal,
        refresh_s=cfg.refresh_secs,
        max_age_s=cfg.max_age_secs,
        retry_min_s=cfg.retry_min_secs,
        forecast=cfg.forecast,
        cache_file=state_dir / FILE_NAME if state_dir is not None else None,
        session=session,
        clock=clock,
        rng=rng,
        zone=zone,
        zone_source=zone_source,
    )
