"""The fleet dashboard's fixed figures follow carbond's own: the equivalents' constants of the job reports, and the
greenest-region hint of the shipped intensity tables (a table update that changes the greenest zone fails here until
grafana/carbond-fleet.json says so too). Its queries are run by test_fleet_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from carbond.intensity.static import ZoneRow, rows
from carbond.job.report import CAR_G_PER_KM, HOUSEHOLD_G_PER_DAY

ROOT = Path(__file__).parents[2]
DASH = json.loads((ROOT / "grafana" / "carbond-fleet.json").read_text())


def panels(kind: str | None = None) -> list[dict[str, Any]]:
    return [p for p in DASH["panels"] if kind is None or p["type"] == kind]


def greenest(table: Literal["zones", "aws", "gcp", "azure"], factor: str | None = None) -> ZoneRow:
    found = [r for r in rows(table) if factor is None or r.intensity.factor_type == factor]
    return min(found, key=lambda r: (r.intensity.g_per_kwh, r.intensity.zone))


def test_greenest_region_hint_matches_the_shipped_tables() -> None:
    [text] = [p["options"]["content"] for p in panels("text")]
    for table, factor in (("zones", "lifecycle"), ("zones", "direct"), ("aws", None), ("gcp", None), ("azure", None)):
        row = greenest(table, factor)  # type: ignore[arg-type]
        assert f"`{row.intensity.zone}` ({row.name}): {row.intensity.g_per_kwh:g} g/kWh" in text, (table, factor)
    best = greenest("zones", "lifecycle").intensity
    [what_if] = [p for p in panels() if p["title"] == f"Emissions rate if run in {best.zone}"]
    assert f"({best.g_per_kwh:g} / max by (cluster, host)" in what_if["targets"][0]["expr"]


def test_equivalents_use_the_job_reports_constants() -> None:
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    car = [e for e in exprs if re.search(r"\) / 251$", e)]
    household = [e for e in exprs if e.endswith(f"/ ({HOUSEHOLD_G_PER_DAY * 365:g} / 365)")]
    assert CAR_G_PER_KM == 251.0
    assert len(car) == 2 and len(household) == 2  # the fleet's and each team's


def test_every_panel_has_a_place_and_a_unique_id() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for p in panels():
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    variables = [v["name"] for v in DASH["templating"]["list"]]
    assert variables == ["datasource", "cluster", "team", "project"]
