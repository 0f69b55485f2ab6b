"""Carbon budgets as Prometheus alerting rules: ``carbond budgets render FILE``.

A budgets file::

    budgets:
      - name: ml-team                     # [A-Za-z0-9_-]+, unique
        selector: {pod_namespace: ml}      # label matchers (equality); empty or host only: node emissions
        grams: 50000                       # CO2e allowed per period
        period: 30d                        # a Prometheus duration: 7d, 30d, 4w ...

Selectors on cgroup labels (pod_namespace, pod_name, unit, cgroup, container_name ...) use
``carbond_cgroup_emissions_grams_total``; host-only selectors use the node's ``carbond_emissions_grams_total``.
Each budget gives: a warning at 80 % spent and a critical at 100 % over the rolling period, and two burn-rate
alerts (as for SLO error budgets): *fast* when the last hour (and last 5 minutes) burn at 14.4x the sustainable
rate, which would spend the whole budget in about 2 days of a 30-day period; *slow* when the last 6 hours (and
last 30 minutes) burn faster than the budget allows, so the period's budget would run out before the period ends.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from carbond.config import load_model
from carbond.errors import ConfigError

CGROUP_LABELS = frozenset(
    {"cgroup", "unit", "pod_uid", "pod_namespace", "pod_name", "container_id", "container_name", "kind"}
)
_DURATION = re.compile(r"^(\d+)([smhdwy])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)]
    selector: dict[str, str] = {}
    grams: Annotated[float, Field(gt=0)]
    period: str = "30d"

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        if not _DURATION.match(v):
            raise ValueError("not a duration like 30d, 4w or 720h")
        return v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for label in v:
            if not _LABEL.match(label):
                raise ValueError(f"{label!r} is not a label name")
        return v

    @property
    def period_seconds(self) -> int:
        m = _DURATION.match(self.period)
        assert m is not None
        return int(m.group(1)) * _SECONDS[m.group(2)]


class BudgetsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    budgets: list[Budget]


def load(path: Path) -> BudgetsFile:
    source = str(path)
    parsed = load_model(path, BudgetsFile, "budgets file")
    names = [b.name for b in parsed.budgets]
    if len(set(names)) != len(names):
        raise ConfigError(source, [("budgets", "budget names must be unique")])
    return parsed


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def spent_expr(b: Budget, window: str) -> str:
    cgroup = any(label in CGROUP_LABELS for label in b.selector)
    metric = "carbond_cgroup_emissions_grams_total" if cgroup else "carbond_emissions_grams_total"
    matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(b.selector.items()))
    return f"sum(increase({metric}{{{matchers}}}[{window}]))"


def rate_expr(b: Budget, window: str) -> str:
    return spent_expr(b, window).replace("increase(", "rate(", 1)


def render(budgets: BudgetsFile) -> dict[str, Any]:
    groups = []
    for b in budgets.budgets:
        allowed_per_s = b.grams / b.period_seconds
        labels = {"budget": b.name}
        desc = f"Carbon budget {b.name}: {b.grams:g} g CO2e per {b.period}"
        burn = {w: f"({rate_expr(b, w)} / {allowed_per_s:.12g})" for w in ("5m", "30m", "1h", "6h")}
        rules: list[dict[str, Any]] = [
            {"record": "carbond:budget_spent_grams", "expr": spent_expr(b, b.period), "labels": labels},
            {"record": "carbond:budget_grams", "expr": f"vector({b.grams:g})", "labels": labels},
            {
                "alert": "CarbonBudgetNearlySpent",
                "expr": f"{spent_expr(b, b.period)} > {0.8 * b.grams:g}",
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{desc}: more than 80 % spent",
                    "description": "{{ $value | humanize }} g spent over the period.",
                },
            },
            {
                "alert": "CarbonBudgetExhausted",
                "expr": f"{spent_expr(b, b.period)} > {b.grams:g}",
                "labels": {**labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{desc}: exhausted",
                    "description": "{{ $value | humanize }} g spent over the period.",
                },
            },
            {
                "alert": "CarbonBudgetFastBurn",
                "expr": f"{burn['1h']} > 14.4 and {burn['5m']} > 14.4",
                "labels": {**labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{desc}: burning 14.4x faster than sustainable",
                    "description": "At this rate the budget is gone in about 1/14 of the period.",
                },
            },
            {
                "alert": "CarbonBudgetSlowBurn",
                "expr": f"{burn['6h']} > 1 and {burn['30m']} > 1",
                "for": "30m",
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{desc}: would run out before the period ends",
                    "description": "Emissions over the last 6 h exceed the budget's sustainable rate.",
                },
            },
        ]
        groups.append({"name": f"carbond-budget-{b.name}", "rules": rules})
    return {"groups": groups}


def render_text(budgets: BudgetsFile, source: str) -> str:
    header = f"# Rendered by `carbond budgets render {source}`: do not edit by hand.\n"
    return header + yaml.safe_dump(render(budgets), sort_keys=False, width=200)


def add_cli(subparsers: Any) -> None:
    budgets = subparsers.add_parser("budgets", help="carbon budgets")
    sub = budgets.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write Prometheus alerting rules for a budgets file")
    r.add_argument("file", metavar="FILE")
    r.add_argument("-o", "--output", metavar="OUT", help="write here instead of standard output")


def run_cli(args: Any) -> int:
    text = render_text(load(Path(args.file)), Path(args.file).name)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0
