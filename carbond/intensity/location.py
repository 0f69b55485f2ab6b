"""``intensity.zone: auto``: the cloud region from instance metadata, else ``intensity.fallback_zone``.

The three clouds are asked at once, each with its own short timeout (``intensity.metadata.timeout_secs``, 1 s):

- AWS (IMDSv2): ``PUT {aws_url}/latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``, then
  ``GET {aws_url}/latest/meta-data/placement/region`` with ``X-aws-ec2-metadata-token`` -> ``eu-west-3``;
- GCP: ``GET {gcp_url}/computeMetadata/v1/instance/zone`` with ``Metadata-Flavor: Google`` ->
  ``projects/<n>/zones/europe-west1-b`` (the region is the zone without its last part);
- Azure: ``GET {azure_url}/metadata/instance/compute/location?api-version=2021-02-01&format=text`` with
  ``Metadata: true`` -> ``westeurope``.

No geo-IP lookups: off-cloud, the configured fallback is used (and logged). Where the zone came from is exported as
``carbond_location_info{zone, source}``.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp

from carbond.intensity.config import MetadataConfig
from carbond.intensity.http import read_body
from carbond.logs import get_logger
from carbond.model import ZoneSource

log = get_logger("carbond.intensity.location")

_REGION = re.compile(r"^[a-z0-9-]{2,40}$")


async def _text(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], timeout_s: float
) -> str | None:
    try:
        async with session.request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as resp:
            if resp.status != 200:
                return None
            body = await read_body(resp, 4096)
            return body.decode("utf-8", "replace").strip() if body is not None else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _aws(session: aiohttp.ClientSession, base: str, timeout_s: float) -> str | None:
    token = await _text(
        session, "PUT", f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, timeout_s
    )
    if not token:
        return None
    region = await _text(
        session, "GET", f"{base}/latest/meta-data/placement/region", {"X-aws-ec2-metadata-token": token}, timeout_s
    )
    return f"aws:{region}" if region and _REGION.match(region) else None


async def _gcp(session: aiohttp.ClientSession, base: str, timeout_s: float) -> str | None:
    zone = await _text(
        session, "GET", f"{base}/computeMetadata/v1/instance/zone", {"Metadata-Flavor": "Google"}, timeout_s
    )
    if not zone:
        return None
    region = zone.rsplit("/", 1)[-1].rpartition("-")[0]
    return f"gcp:{region}" if _REGION.match(region) else None


async def _azure(session: aiohttp.ClientSession, base: str, timeout_s: float) -> str | None:
    url = f"{base}/metadata/instance/compute/location?api-version=2021-02-01&format=text"
    location = await _text(session, "GET", url, {"Metadata": "true"}, timeout_s)
    return f"azure:{location.lower()}" if location and _REGION.match(location.lower()) else None


async def detect_cloud_zone(cfg: MetadataConfig, session: aiohttp.ClientSession | None = None) -> str | None:
    """``aws:<region>``, ``gcp:<region>`` or ``azure:<region>`` of this instance; None off-cloud."""
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        found = await asyncio.gather(
            _aws(session, cfg.aws_url, cfg.timeout_secs),
            _gcp(session, cfg.gcp_url, cfg.timeout_secs),
            _azure(session, cfg.azure_url, cfg.timeout_secs),
        )
    finally:
        if own:
            await session.close()
    return next((z for z in found if z), None)


async def resolve_zone(
    zone: str, fallback: str, cfg: MetadataConfig, session: aiohttp.ClientSession | None = None
) -> tuple[str, ZoneSource]:
    """``zone`` itself (``config``), or for ``auto`` the detected cloud region (``metadata``), else ``fallback``
    (``fallback``); with where it came from (:data:`carbond.model.ZoneSource`)."""
    if zone.strip().lower() != "auto":
        return zone, "config"
    found = await detect_cloud_zone(cfg, session)
    if found is None:
        log.info(
            "zone_auto_not_found",
            zone=fallback,
            zone_source="fallback",
            reason="no cloud instance metadata answered",
            key="intensity.fallback_zone",
        )
        return fallback, "fallback"
    log.info("zone_auto_detected", zone=found, zone_source="metadata")
    return found, "metadata"
