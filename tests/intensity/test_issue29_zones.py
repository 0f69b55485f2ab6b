"""Issue 29, zones and cloud regions through the CLI: Electricity Maps' and WattTime's names reach their rows,
unknown sub-zones are rejected (exit 2) with close matches, and every cloud region has a source and a year."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from carbond import cli


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], zone: str) -> tuple[int, str]:
    path = tmp_path / "carbond.yaml"
    path.write_text(yaml.safe_dump({"intensity": {"zone": zone}}))
    capsys.readouterr()
    code = cli.main(["check-config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    ("zone", "suggested"),
    [
        ("US-ZZ", ["US-"]),
        ("us-californa", ["US-CA"]),
        ("US-CX", ["US-"]),
        ("SE5", ["SE1", "SE2", "SE3", "SE4"]),
    ],
)
def test_unknown_sub_zones_are_rejected_with_close_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], zone: str, suggested: list[str]
) -> None:
    code, text = check(tmp_path, capsys, zone)
    assert code == 2, text
    near = text.split("close matches:", 1)[1]
    assert all(s in near for s in suggested), text
    assert "SWE" not in near
    assert "SLE" not in near


@pytest.mark.parametrize(
    ("zone", "g_per_kwh", "source"),
    [
        ("SE-SE3", 20.0, "electricitymaps"),  # Electricity Maps' name of carbond's SE3
        ("NO-NO1", 24.0, "electricitymaps"),
        ("US-CAL-CISO", 208.0, "electricitymaps"),
        ("CAISO_NORTH", 208.0, "electricitymaps"),  # WattTime's region: its operator's zone
        ("ERCOT_EASTTX", 363.0, "electricitymaps"),
        ("DE-BY", None, "owid"),  # a real subdivision without a row: its country
    ],
)
def test_provider_spellings_reach_their_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], zone: str, g_per_kwh: float | None, source: str
) -> None:
    code, text = check(tmp_path, capsys, zone)
    assert code == 0, text
    from carbond.intensity.static import lookup

    found = lookup(zone)
    assert found is not None
    assert found.source == source
    assert found.year is not None
    assert g_per_kwh is None or found.g_per_kwh == pytest.approx(g_per_kwh)


@pytest.mark.parametrize("provider", ["aws", "azure", "gcp"])
def test_every_cloud_region_has_a_source_and_a_year(capsys: pytest.CaptureFixture[str], provider: str) -> None:
    capsys.readouterr()
    assert cli.main(["zones", "--provider", provider, "--top", "0", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows
    assert all(r["year"] and r["source"] for r in rows)
    assert not {r["source"] for r in rows} & {"ccf", "mlco2"}


@pytest.mark.parametrize(
    ("region", "low", "high"),
    [("aws:eu-north-1", 15, 40), ("azure:westeurope", 200, 320), ("gcp:europe-west1", 90, 160)],
)
def test_stale_cloud_rows_are_replaced(
    capsys: pytest.CaptureFixture[str], region: str, low: float, high: float
) -> None:
    provider = region.partition(":")[0]
    capsys.readouterr()
    assert cli.main(["zones", "--provider", provider, "--top", "0", "--format", "json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["zone"] == region]
    assert low <= row["g_per_kwh"] <= high
    assert row["year"] >= 2023
