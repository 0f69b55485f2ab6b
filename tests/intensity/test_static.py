from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from carbond.data.regions import NORDIC_ZONES, owid_mix_intensity
from carbond.intensity.static import StaticProvider, lookup, lookup_country, rows


@pytest.mark.parametrize("zone", ["FR", "FRA", "fr", " fra "])
def test_alpha2_and_alpha3_any_case(zone: str) -> None:
    found = lookup_country(zone)
    assert found is not None
    assert found.zone == "FR"
    assert 30 < found.g_per_kwh < 100  # France's nuclear-heavy grid
    assert found.factor_type == "lifecycle"
    assert found.source == "owid"
    assert found.year is not None


def test_countries_differ_as_they_should() -> None:
    fr, de, pl = (lookup_country(z) for z in ("FR", "DE", "PL"))
    assert fr
    assert de
    assert pl
    assert fr.g_per_kwh < de.g_per_kwh < pl.g_per_kwh


def test_zero_intensity_country_gets_its_mix() -> None:
    """OWID reports 0 g/kWh for the Central African Republic, which generates 0.15 TWh, all hydro: its mix x the
    per-source factors (hydro 26 g/kWh), not 0 and not the world average."""
    caf = lookup_country("CAF")
    assert caf is not None
    assert caf == lookup("CF")
    assert caf.g_per_kwh == pytest.approx(26.0)
    assert caf.source == "owid-mix"
    assert caf.year == 2022
    assert caf.factor_type == "lifecycle"


def test_mix_intensity_weights_each_source() -> None:
    factors = {"coal": 995, "natural_gas": 743, "petroleum": 816, "nuclear": 29, "hydroelectricity": 26}
    factors |= {"solar": 48, "wind": 26, "geothermal": 38}
    entry = {"hydroelectricity_TWh": 0.15, "carbon_intensity": 0.0}
    assert owid_mix_intensity(entry, factors) == pytest.approx(26.0)
    entry = {"coal_TWh": 1.0, "hydroelectricity_TWh": 1.0, "biofuel_TWh": 2.0}
    assert owid_mix_intensity(entry, factors) == pytest.approx((995 + 26 + 2 * 230) / 4)
    assert owid_mix_intensity({"coal_TWh": 0.0}, factors) is None


def test_finland_one_value() -> None:
    """FI is a bidding zone and a country: FI, FIN and fi give the one country row."""
    fi, fin = lookup("FI"), lookup("fin")
    assert fi is not None
    assert fi == fin == lookup_country("FI")
    assert fi.source == "owid"
    assert fi.g_per_kwh == pytest.approx(79.158)
    assert sum(r.intensity.zone == "FI" for r in rows("zones")) == 1


@pytest.mark.parametrize(
    ("zone", "g", "city"),
    [
        ("SE1", 15.0, "Luleå"),
        ("SE2", 15.0, "Sundsvall"),
        ("SE3", 20.0, "Stockholm"),
        ("SE4", 37.0, "Malmö"),
        ("NO1", 24.0, "Oslo"),
        ("NO2", 29.0, "Kristiansand"),
        ("NO3", 28.0, "Trondheim"),
        ("NO4", 49.0, "Tromsø"),
        ("NO5", 25.0, "Bergen"),
    ],
)
def test_nordic_bidding_zones(zone: str, g: float, city: str) -> None:
    """Electricity Maps' 2025 yearly average per zone (lifecycle), with the zone's area in its name."""
    found = lookup(zone)
    assert found is not None
    assert found.g_per_kwh == g
    assert (found.source, found.year, found.factor_type) == ("electricitymaps", 2025, "lifecycle")
    name = {r.intensity.zone: r.name for r in rows("zones")}[zone]
    assert city in name
    assert dict(NORDIC_ZONES.values())[zone] == name


def test_nordic_zones_differ() -> None:
    """No placeholder shared by every zone: the south of Sweden imports from continental grids, NO4 burns gas."""
    se = [lookup(f"SE{i}").g_per_kwh for i in range(1, 5)]  # type: ignore[union-attr]
    no = [lookup(f"NO{i}").g_per_kwh for i in range(1, 6)]  # type: ignore[union-attr]
    assert len(set(se + no)) > 4
    assert max(se) == se[3]
    assert max(no) == no[3]


@pytest.mark.parametrize(("state", "lb_per_mwh"), [("US-CA", 394.769), ("US-TX", 771.179), ("US-VT", 52.239)])
def test_us_states_are_egrid2023_co2e(state: str, lb_per_mwh: float) -> None:
    """eGRID2023 state CO2e total output emission rates (STC2ERTA), lb/MWh x 0.45359237, labelled with the year."""
    found = lookup(state)
    assert found is not None
    assert found.g_per_kwh == pytest.approx(lb_per_mwh * 0.45359237, abs=0.01)
    assert (found.source, found.year, found.factor_type) == ("egrid-2023", 2023, "direct")


def test_every_us_state_and_dc() -> None:
    """eGRID gives each state and DC (US-XX); Electricity Maps' US zones (US-CAL-CISO ...) are listed beside them."""
    us = [r for r in rows("zones") if r.intensity.zone.startswith("US-")]
    states = [r for r in us if r.intensity.source == "egrid-2023"]
    assert len(states) == 51
    assert {len(r.intensity.zone) for r in states} == {5}
    assert {r.intensity.zone for r in states} >= {"US-CA", "US-DC", "US-TX", "US-WY"}
    assert all(len(r.intensity.zone) > 5 and r.intensity.year for r in us if r.intensity.source != "egrid-2023")


@pytest.mark.asyncio
async def test_unknown_zone_is_world_with_one_warning() -> None:
    p = StaticProvider("XX")
    with capture_logs() as logs:
        a = await p.current()
        b = await p.current()
    assert a.zone == b.zone == "world"
    assert a.g_per_kwh == 475.0
    assert [e["event"] for e in logs] == ["unknown_zone"]
    assert logs[0]["zone"] == "XX"


@pytest.mark.asyncio
async def test_world_is_known() -> None:
    with capture_logs() as logs:
        w = await StaticProvider("world").current()
    assert w.g_per_kwh == 475.0
    assert logs == []
