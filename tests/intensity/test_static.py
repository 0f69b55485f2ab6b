from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from carbond.intensity.static import StaticProvider, lookup_country


@pytest.mark.parametrize("zone", ["FR", "FRA", "fr", " fra "])
def test_alpha2_and_alpha3_any_case(zone: str) -> None:
    found = lookup_country(zone)
    assert found is not None and found.zone == "FR"
    assert 30 < found.g_per_kwh < 100  # France's nuclear-heavy grid
    assert found.factor_type == "lifecycle" and found.source == "owid" and found.year is not None


def test_countries_differ_as_they_should() -> None:
    fr, de, pl = (lookup_country(z) for z in ("FR", "DE", "PL"))
    assert fr and de and pl
    assert fr.g_per_kwh < de.g_per_kwh < pl.g_per_kwh


def test_zero_intensity_country_is_not_served() -> None:
    assert lookup_country("CAF") is None  # upstream reports 0 g/kWh: not a value to report emissions with


@pytest.mark.asyncio
async def test_unknown_zone_is_world_with_one_warning() -> None:
    p = StaticProvider("XX")
    with capture_logs() as logs:
        a = await p.current()
        b = await p.current()
    assert a.zone == b.zone == "world" and a.g_per_kwh == 475.0
    assert [e["event"] for e in logs] == ["unknown_zone"]
    assert logs[0]["zone"] == "XX"


@pytest.mark.asyncio
async def test_world_is_known() -> None:
    with capture_logs() as logs:
        w = await StaticProvider("world").current()
    assert w.g_per_kwh == 475.0 and logs == []
