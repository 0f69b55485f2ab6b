"""Static tables, config, the factory, zone auto-detection and ``carbond zones``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from carbond import zones
from carbond.data.regions import ccf_tonnes
from carbond.intensity import FixedIntensity
from carbond.intensity.build import build_source
from carbond.intensity.cache import CachedIntensity
from carbond.intensity.config import IntensityConfig, MetadataConfig
from carbond.intensity.location import detect_cloud_zone
from carbond.intensity.static import lookup, lookup_country
from carbond.testing.provider_fakes import FakeMetadata, FakeUkGrid
from tests.harness.wait import eventually_async


@pytest.mark.parametrize(
    ("zone", "key", "source", "factor"),
    [
        ("US-CA", "US-CA", "egrid-2023", "direct"),
        ("ca-qc", "CA-QC", "canada-mix-2023", "lifecycle"),
        ("SE3", "SE3", "electricitymaps", "lifecycle"),
        ("NO1", "NO1", "electricitymaps", "lifecycle"),
        ("FI", "FI", "owid", "lifecycle"),  # a bidding zone and a country: the country row, as for FIN
        ("aws:eu-west-3", "aws:eu-west-3", "owid (FR)", "lifecycle"),  # AWS publishes none: the region's grid
        ("gcp:europe-west1", "gcp:europe-west1", "google-2024", "direct"),  # Google 2024 wins over CCF and mlco2
        ("azure:West Europe", "azure:westeurope", "owid (NL)", "lifecycle"),
        ("azure:canadaeast", "azure:canadaeast", "canada-mix-2023 (CA-QC)", "lifecycle"),  # Quebec's grid
        ("DE-BY", "DE", "owid", "lifecycle"),  # unknown sub-zone: its country
    ],
)
def test_static_zones(zone: str, key: str, source: str, factor: str) -> None:
    found = lookup(zone)
    assert found is not None
    assert (found.zone, found.source, found.factor_type) == (key, source, factor)
    assert 0 < found.g_per_kwh < 1500


def test_static_values() -> None:
    ca = lookup("US-CA")
    assert ca is not None
    assert ca.g_per_kwh == pytest.approx(394.769 * 0.45359237, abs=0.01)
    assert ca.year == 2023
    qc, ab = lookup("CA-QC"), lookup("CA-AB")
    assert qc
    assert ab
    assert qc.g_per_kwh < 50 < 500 < ab.g_per_kwh
    assert lookup("gcp:europe-west1").g_per_kwh == 103.37  # type: ignore[union-attr]
    assert lookup("FI") == lookup("FIN") == lookup_country("FI")
    assert lookup("world").g_per_kwh == 475.0
    assert lookup("XX") is None


def test_ccf_cells_that_lost_their_decimal_point() -> None:
    assert ccf_tonnes("000077") == pytest.approx(77.0)
    assert ccf_tonnes("000402") == pytest.approx(402.0)
    assert ccf_tonnes("0.000052") == pytest.approx(52.0)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"providers": ["static", "ukgrid"]}, "providers"),
        ({"providers": ["ukgrid", "ukgrid"]}, "providers"),
        ({"providers": ["bogus"]}, "providers"),
        ({"signal": "marginal"}, "signal"),
        ({"electricitymaps": {"token_file": "/t", "token_env": "T"}}, "electricitymaps"),
        ({"ukgrid": {"region_id": 18}}, "ukgrid.region_id"),
        ({"ukgrid": {"base_url": "ftp://x"}}, "ukgrid.base_url"),
        ({"override_g_per_kwh": 2500}, "override_g_per_kwh"),
        ({"providers": ["electricitymaps", "static"], "zone": "auto"}, "electricitymaps.zone"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_config_rejects(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as err:
        IntensityConfig.model_validate(doc)
    assert key.split(".")[-1] in str(err.value)


@pytest.mark.asyncio
async def test_build_source_variants(tmp_path: Path) -> None:
    fixed = await build_source(IntensityConfig(zone="FR", override_g_per_kwh=12.5), tmp_path)
    assert isinstance(fixed, FixedIntensity)
    value, age = fixed.current()
    assert value is not None
    assert (value.g_per_kwh, value.provider, value.zone, age) == (12.5, "override", "FR", 0.0)
    static = await build_source(IntensityConfig(zone="SE3"), None)
    assert static.current()[0] == lookup("SE3")
    assert static.providers() == ()
    async with FakeUkGrid(actual=150) as fake:
        cfg = IntensityConfig.model_validate(
            {"zone": "GB", "providers": ["ukgrid", "static"], "ukgrid": {"base_url": fake.url}, "refresh_secs": 1}
        )
        live = await build_source(cfg, tmp_path)
        assert isinstance(live, CachedIntensity)
        await live.start()
        try:
            got = await eventually_async(
                lambda: v if (v := live.current()[0]) is not None and v.provider == "ukgrid" else None,
                what="the GB value",
            )
            assert got.g_per_kwh == 150.0
            assert [s.provider for s in live.providers()] == ["ukgrid"]
        finally:
            await live.close()
    assert (tmp_path / "intensity-cache.json").exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cloud", "region", "zone"),
    [
        ("aws", "eu-west-3", "aws:eu-west-3"),
        ("gcp", "europe-west1", "gcp:europe-west1"),
        ("azure", "westeurope", "azure:westeurope"),
    ],
)
async def test_zone_auto_detects_the_cloud(cloud: str, region: str, zone: str) -> None:
    async with FakeMetadata(cloud, region) as meta, aiohttp.ClientSession() as session:
        cfg = MetadataConfig(aws_url=meta.url, gcp_url=meta.url, azure_url=meta.url, timeout_secs=1)
        assert await detect_cloud_zone(cfg, session) == zone
        source = await build_source(IntensityConfig(zone="auto", metadata=cfg), None, session=session)
    value = source.current()[0]
    assert value is not None
    assert value.zone == zone
    assert value.provider == "static"
    assert (source.zone, source.zone_source) == (zone, "metadata")


@pytest.mark.asyncio
async def test_zone_auto_off_cloud_uses_the_fallback() -> None:
    dead = "http://127.0.0.1:9"
    cfg = MetadataConfig(aws_url=dead, gcp_url=dead, azure_url=dead, timeout_secs=0.5)
    source = await build_source(IntensityConfig(zone="auto", fallback_zone="CA-QC", metadata=cfg), None)
    assert source.current()[0] == lookup("CA-QC")
    assert (source.zone, source.zone_source) == ("CA-QC", "fallback")


def _zones(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser()
    zones.add_cli(parser.add_subparsers(dest="command"))
    assert zones.run_cli(parser.parse_args(["zones", *argv])) == 0
    return capsys.readouterr().out


def test_zones_cli(capsys: pytest.CaptureFixture[str]) -> None:
    out = _zones(["--provider", "aws", "--top", "3"], capsys).splitlines()
    # AWS publishes no per-region figures: each region has its grid's, all lifecycle factors here, so one table
    assert out[0] == "lifecycle factors (generation, building and fuel chain):"
    assert len(out) == 5
    assert out[1].split() == ["rank", "zone", "g/kWh", "factor", "source", "year", "name"]
    assert [line.split()[1] for line in out[2:]] == ["aws:eu-north-1", "aws:ca-central-1", "aws:eu-west-3"]
    assert out[2].split()[4:7] == ["electricitymaps", "(SE3)", "2025"]  # the grid zone and the year on every row
    rows = json.loads(_zones(["--provider", "gcp", "--top", "0", "--format", "json"], capsys))
    assert rows[0]["zone"] == "gcp:europe-north2"
    assert len(rows) == 44
    assert [r["g_per_kwh"] for r in rows] == sorted(r["g_per_kwh"] for r in rows)
    default = _zones([], capsys).splitlines()  # like with like: one ranking per factor type, ten of each
    assert default[0].startswith("lifecycle factors")
    assert default[2].split()[1] in {"SE1", "SE2"}
    assert default[13].startswith("direct factors")
    assert len(default) == 25
    assert {line.split()[3] for line in default[2:12]} == {"lifecycle"}
    assert {line.split()[3] for line in default[15:]} == {"direct"}
    azure = json.loads(_zones(["--provider", "azure", "--factor", "direct", "--format", "json"], capsys))
    assert {r["factor_type"] for r in azure} == {"direct"}
    assert azure[0]["rank"] == 1
    everything = json.loads(_zones(["--top", "0", "--format", "json"], capsys))
    assert sum(r["zone"] == "FI" for r in everything) == 1
    assert {"US-CA", "CA-QC", "SE3", "FR"} <= {r["zone"] for r in everything}
