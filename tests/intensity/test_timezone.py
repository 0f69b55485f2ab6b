"""intensity.zone left unset: the country of the machine's time zone, else the world average with one warning."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from carbond.config import parse
from carbond.errors import ConfigError
from carbond.exporter.families import INTENSITY
from carbond.exporter.family import collect_all
from carbond.intensity import build
from carbond.intensity.build import build_source, zone_from_timezone
from carbond.intensity.config import IntensityConfig
from carbond.intensity.timezone import country_of, locate, system_timezone
from carbond.model import IntensityState
from tests.harness.skips import skip_or_fail
from tests.harness.snapshots import frozen_snapshot

ZONE_TAB = "# comment\nFR\t+4852+00220\tEurope/Paris\nUS\t+404251-0740023\tAmerica/New_York\n"
ZONE1970 = "#\nCH,DE,LI\t+4723+00832\tEurope/Zurich\nFR,MC\t+4852+00220\tEurope/Paris\n"


@pytest.fixture
def tzdb(tmp_path: Path) -> tuple[str, ...]:
    (tmp_path / "zoneinfo").mkdir()
    (tmp_path / "zoneinfo/zone.tab").write_text(ZONE_TAB)
    (tmp_path / "zoneinfo/zone1970.tab").write_text(ZONE1970)
    return (str(tmp_path / "zoneinfo"),)


def test_timezone_from_tz_then_etc_timezone_then_the_localtime_link(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    assert system_timezone({"TZ": ":Europe/Paris"}, etc) == ("Europe/Paris", "$TZ")
    assert system_timezone({}, etc) == ("", "")
    os.symlink("/usr/share/zoneinfo/America/New_York", etc / "localtime")
    assert system_timezone({}, etc)[0] == "America/New_York"
    (etc / "timezone").write_text("Europe/Zurich\n")
    assert system_timezone({}, etc)[0] == "Europe/Zurich"


def test_country_from_zone_tab_else_the_first_of_zone1970(tzdb: tuple[str, ...], tmp_path: Path) -> None:
    assert country_of("Europe/Paris", tzdb) == "FR"
    assert country_of("America/New_York", tzdb) == "US"
    assert country_of("Europe/Zurich", tzdb) == "CH"  # only in zone1970.tab, whose first country is the zone's
    for tz in ("UTC", "Etc/UTC", "Etc/GMT+2", "Mars/Olympus", ""):
        assert country_of(tz, tzdb) is None
    assert locate({"TZ": "Europe/Paris"}, tmp_path, tzdb).country == "FR"


def test_unset_zone_is_the_timezones_country_else_world_with_one_warning(tzdb: tuple[str, ...]) -> None:
    with capture_logs() as logs:
        assert zone_from_timezone(locate({"TZ": "Europe/Paris"}, Path("/nonexistent"), tzdb)) == ("FR", "timezone")
        assert zone_from_timezone(locate({"TZ": "Etc/UTC"}, Path("/nonexistent"), tzdb)) == ("world", "default")
    info, warning = logs
    assert info["event"] == "zone_from_timezone"
    assert info["timezone"] == "Europe/Paris"
    assert info["zone_source"] == "timezone"
    assert warning["zone_source"] == "default"
    assert warning["log_level"] == "warning"
    assert warning["key"] == "intensity.zone"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("env", "zone", "source"),
    [({"TZ": "Europe/Paris"}, "FR", "timezone"), ({"TZ": "UTC"}, "world", "default")],
)
async def test_where_the_zone_came_from_reaches_the_source_and_metrics(
    env: dict[str, str], zone: str, source: str, tzdb: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset zone: the source says ``timezone`` or ``default``; a configured one ``config``; the exporter shows
    it as ``carbond_location_info{zone, source}``."""
    monkeypatch.setattr(build, "locate", lambda: locate(env, Path("/nonexistent"), tzdb))
    unset = await build_source(IntensityConfig(), None)
    assert (unset.zone, unset.zone_source) == (zone, source)
    configured = await build_source(IntensityConfig(zone="SE3"), None)
    assert (configured.zone, configured.zone_source) == ("SE3", "config")
    state = IntensityState(configured.current()[0], 0.0, zone=configured.zone, zone_source=configured.zone_source)
    snap = await frozen_snapshot()
    families = {f.name: f for f in collect_all(INTENSITY, replace(snap, intensity=state))}
    (sample,) = families["carbond_location_info"].samples
    assert sample.labels["zone"] == "SE3"
    assert sample.labels["source"] == "config"
    assert sample.value == 1.0
    bare = replace(snap, intensity=IntensityState(None, 0.0))
    assert "carbond_location_info" not in {f.name for f in collect_all(INTENSITY, bare)}


def test_the_system_tz_database_is_found() -> None:
    if not any(Path(p, "zone1970.tab").exists() for p in __import__("zoneinfo").TZPATH):
        skip_or_fail("no system tz database (Debian package tzdata)")
    assert country_of("Europe/Paris") == "FR"
    assert country_of("Asia/Tokyo") == "JP"


@pytest.mark.parametrize(
    ("zone", "near"), [("FRR", "FR"), ("aws:eu-west-33", "aws:eu-west-3"), ("Frnace", ""), ("SE5", "SE")]
)
def test_unknown_zone_is_a_config_error_naming_the_key_and_close_matches(zone: str, near: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"intensity": {"zone": zone}})
    (key, message) = info.value.problems[0]
    assert key == "intensity.zone"
    assert f"unknown zone {zone!r}" in message
    assert near in message


@pytest.mark.parametrize("zone", ["FR", "FRA", "US-CA", "CA-QC", "SE3", "aws:eu-west-3", "world", "auto", "US-TX"])
def test_known_zones_pass(zone: str) -> None:
    assert parse({"intensity": {"zone": zone}}).intensity.zone == zone
