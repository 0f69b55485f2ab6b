"""The fleet dashboard's fixed figures follow carbond's own: the equivalents' constants of the job reports, and the
greenest-region hint of the shipped intensity tables. A table update that changes a greenest zone fails here; then
``pytest tests/deploy/test_fleet_dashboard.py --update-golden`` rewrites the two hint panels of
grafana/carbond-fleet.json from the tables (review the diff). Its queries are run by test_fleet_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import pytest

from carbond.intensity.static import ZoneRow, rows
from carbond.job.report import CAR_G_PER_KM, HOUSEHOLD_G_PER_DAY

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "grafana" / "carbond-fleet.json"
HINT = "Greenest-region hint"
WHAT_IF = "Emissions rate if run in the greenest zone"
CLOUDS = {"aws": "AWS", "gcp": "GCP", "azure": "Azure"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panel(doc: dict[str, Any], title: str) -> dict[str, Any]:
    [found] = [p for p in doc["panels"] if p["title"] == title]
    return found


def greenest(table: Literal["zones", "aws", "gcp", "azure"], factor: str | None = None) -> ZoneRow:
    found = [r for r in rows(table) if factor is None or r.intensity.factor_type == factor]
    return min(found, key=lambda r: (r.intensity.g_per_kwh, r.intensity.zone))


def _line(r: ZoneRow) -> str:
    i = r.intensity
    return f"`{i.zone}` ({r.name}): {i.g_per_kwh:g} g/kWh, {i.factor_type}, {i.source}" + (
        f" {i.year}" if i.year else ""
    )


def hint_panels() -> tuple[str, str, str]:
    """(the hint's markdown, the what-if panel's description and query), from the shipped tables."""
    best = greenest("zones", "lifecycle")
    g, zone = best.intensity.g_per_kwh, best.intensity.zone
    text = "\n".join(
        [
            "**Greenest zones in carbond's shipped tables** "
            "(`carbond zones`, `carbond zones --provider aws|gcp|azure`):",
            "",
            "- zones (countries, US states, Canadian provinces, Nordic bidding zones): "
            f"{_line(best)}; {_line(greenest('zones', 'direct'))}",
            *[f"- {label}: {_line(greenest(table))}" for table, label in CLOUDS.items()],  # type: ignore[arg-type]
            "",
            "Compare like with like: `direct` factors count combustion only, `lifecycle` also building and fuel "
            f"chains. The panel beside this one charges each node's operational emissions at {g:g} g/kWh ({zone}, "
            "lifecycle) instead of its own zone's intensity: what moving the same work there would emit.",
        ]
    )
    description = (
        f"Each cluster's operational emissions per hour, recomputed at the greenest shipped zone's {g:g} g/kWh "
        f"({zone}: {best.name}), beside the emissions rate by cluster above."
    )
    expr = (
        'sum by (cluster) (rate(carbond_emissions_grams_total{cluster=~"$cluster"}[5m]) * on (cluster, host) '
        f'group_left () ({g:g} / max by (cluster, host) (carbond_grid_intensity_grams_per_kwh{{signal="average"}}))) '
        "* 3600"
    )
    return text, description, expr


def test_greenest_region_hint_matches_the_shipped_tables(update_golden: bool) -> None:
    doc = dashboard()
    text, description, expr = hint_panels()
    hint, what_if = panel(doc, HINT), panel(doc, WHAT_IF)
    if update_golden:
        hint["options"]["content"] = text
        what_if["description"] = description
        what_if["targets"][0]["expr"] = expr
        DASHBOARD.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    hint_now = (hint["options"]["content"], what_if["description"], what_if["targets"][0]["expr"])
    assert hint_now == (text, description, expr), "pytest tests/deploy/test_fleet_dashboard.py --update-golden"


def test_equivalents_use_the_job_reports_constants() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    car = [e for e in exprs if re.search(rf"\) / {CAR_G_PER_KM:g}$", e)]
    household = [e for e in exprs if e.endswith(f"/ ({HOUSEHOLD_G_PER_DAY * 365:g} / 365)")]
    assert len(car) == 2
    assert len(household) == 2


def test_every_panel_has_a_place_and_a_unique_id() -> None:
    doc = dashboard()
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "cluster", "team", "project"]


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
