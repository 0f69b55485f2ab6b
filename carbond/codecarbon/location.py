"""CodeCarbon's location keywords (``country_iso_code``, ``region``, ``cloud_provider`` ...) as carbond's zone."""

from __future__ import annotations

import logging

log = logging.getLogger("carbond.codecarbon")


def zone_of(
    country_iso_code: str | None = None,
    region: str | None = None,
    cloud_provider: str | None = None,
    cloud_region: str | None = None,
    country_2letter_iso_code: str | None = None,
) -> str | None:
    """carbond's intensity zone for CodeCarbon's location keywords (None: keep the config's)."""
    if cloud_provider:
        if not cloud_region:
            raise ValueError("cloud_region must be given with cloud_provider (e.g. cloud_region='eu-west-3')")
        return f"{cloud_provider.strip().lower()}:{cloud_region.strip().lower()}"
    country = (country_2letter_iso_code or country_iso_code or "").strip().upper()
    if not country:
        return None
    from carbond.intensity.static import rows

    table = rows("zones")
    if len(country) == 3:  # alpha-3, as CodeCarbon takes it
        from carbond.job.report import location

        found = location(country)
        alpha2 = next((r.intensity.zone for r in table if r.name == found["country_name"]), None)
        country = alpha2 or country
    if region:
        want = region.strip().lower()
        for r in table:
            z = r.intensity.zone
            if z.upper().startswith(country + "-") and (r.name.lower() == want or z.split("-", 1)[1].lower() == want):
                return z
        log.warning(
            "carbond.codecarbon: region %r not in carbond's tables for %s: the country's figure", region, country
        )
    return country
