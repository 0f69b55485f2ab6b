"""Carbon budgets as Prometheus rules: ``carbond budgets render FILE [--format rules|prometheusrule]``.

A budgets file::

    budgets:
      - name: ml-team                     # [A-Za-z0-9_-]+, unique
        selector: {pod_namespace: ml}      # label matchers (equality); empty or host only: node emissions
        grams: 50000                       # CO2e allowed per period
        period: 30d                        # a Prometheus duration: 7d, 30d, 4w ...

Selectors on any label but ``host`` (pod_namespace, pod_name, unit, team, project, label_* ...; for Slurm
``slurm_account``, ``slurm_partition``, ``slurm_user``, the first two where ``attribution.slurm.labels`` puts them on
the series) use ``carbond_cgroup_emissions_grams_total``; host-only selectors use the node's
``carbond_emissions_grams_total``. A label those series do not carry (``namespace`` for ``pod_namespace``) is
rejected with the valid names.

Each budget records its hourly spending (``carbond:budget_spent_grams:increase1h``) and sums its values at the
hour boundaries of a window that never exceeds the Prometheus retention (``--retention``, default 10d as
kube-prometheus-stack; a plain Prometheus keeps 15d): no expression asks for data the server no longer has, and
none rereads days of raw samples every minute. Whole hours count (the hour in progress once it ends; before the
first whole hour, the hour so far). When the period is longer than the retention, the window is the retention and
the budget's share of it is pro rata (a 30-day budget is checked over the last 10 days against 10/30 of it). A
warning fires at 80 % of that share, a critical at 100 %, and two burn-rate alerts (as for SLO error budgets)
compare short-window rates with the sustainable rate (grams per period): *fast* when the last hour (and last 5
minutes) burn at 14.4x, which would spend the whole budget in about 2 days of a 30-day period; *slow* when the
last 6 hours (and last 30 minutes) burn faster than the budget allows.

Every recorded series and alert carries ``budget`` (the name) and the selector's labels
(``{budget="slurm-physics", slurm_account="physics"}``), so dashboards and alert routes filter budgets on the
labels they count, whatever their names.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from carbond.config import load_model
from carbond.errors import ConfigError
from carbond.exporter.families import BY_NAME

DEFAULT_RETENTION_S = 10 * 86400  # kube-prometheus-stack's default retention (a plain Prometheus keeps 15d)
_DURATION = re.compile(r"^(\d+)([smhdwy])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: The series budgets count, from their declarations (a renamed family fails here, at import).
CGROUP_EMISSIONS = BY_NAME["carbond_cgroup_emissions_grams_total"]
NODE_EMISSIONS = BY_NAME["carbond_emissions_grams_total"]
#: The Slurm labels a budget may select on (per account, partition or user; a job's own ID makes no budget).
SLURM_SELECTOR_LABELS = ["slurm_account", "slurm_partition", "slurm_user"]
#: The labels of the cgroup emissions series (and ``host`` of the node's); a selector on any other name matches no
#: series and the budget would never fire. None is ``budget`` or ``severity``, the labels the rules add.
SELECTOR_LABELS = ["host", *CGROUP_EMISSIONS.labels, *SLURM_SELECTOR_LABELS]


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
            if label not in SELECTOR_LABELS and not label.startswith("label_"):
                near = (
                    difflib.get_close_matches(label, SELECTOR_LABELS, n=1, cutoff=0.5)
                    or [n for n in SELECTOR_LABELS if label in n][:1]
                )
                raise ValueError(
                    f"{label!r} is not a label of carbond's emissions series"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; valid: {', '.join(SELECTOR_LABELS)} and the copied Kubernetes labels label_*"
                )
        return v

    @property
    def period_seconds(self) -> int:
        return duration_seconds(self.period)


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


def selector_expr(b: Budget) -> str:
    """The emissions counter a budget counts, with its matchers."""
    cgroup = any(label != "host" for label in b.selector)
    metric = CGROUP_EMISSIONS.name if cgroup else NODE_EMISSIONS.name
    matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(b.selector.items()))
    return f"{metric}{{{matchers}}}"


def spent_expr(b: Budget, window: str) -> str:
    return f"sum(increase({selector_expr(b)}[{window}]))"


def rate_expr(b: Budget, window: str) -> str:
    return f"sum(rate({selector_expr(b)}[{window}]))"


def series_labels(b: Budget) -> dict[str, str]:
    """The labels of a budget's recorded series and alerts: its name, then its selector's labels."""
    return {"budget": b.name, **dict(sorted(b.selector.items()))}


def _template_literal(value: str) -> str:
    """``value`` as a Go template that expands to itself (alert labels are templates; ``{{`` would start one)."""
    return value.replace("{{", '{{ "{{" }}')


def duration_seconds(text: str) -> int:
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 4w or 720h")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def hours_sum(series: str, window_s: int) -> str:
    """The sum of an hourly-increase series' values at the hour boundaries of the last ``window_s`` (one second
    short, so that a window ending on a boundary still counts window/1h hours, not one more)."""
    return f"sum_over_time({series}[{window_s - 1}s:1h])"


def _window_text(seconds: int) -> str:
    for unit in ("w", "d", "h"):
        if seconds % _SECONDS[unit] == 0:
            return f"{seconds // _SECONDS[unit]}{unit}"
    return f"{seconds}s"


def render(budgets: BudgetsFile, retention_s: int = DEFAULT_RETENTION_S) -> dict[str, Any]:
    groups = []
    for b in budgets.budgets:
        allowed_per_s = b.grams / b.period_seconds
        window_s = min(b.period_seconds, retention_s)
        share = b.grams * window_s / b.period_seconds
        window = b.period if window_s == b.period_seconds else _window_text(window_s)
        labels = series_labels(b)
        alert_labels = {k: _template_literal(v) for k, v in labels.items()}
        desc = f"Carbon budget {b.name}: {b.grams:g} g CO2e per {b.period}"
        if window_s < b.period_seconds:
            desc += f" ({share:.6g} g pro rata over the last {window}, the retention)"
        spent = f'carbond:budget_spent_grams{{budget="{b.name}"}}'
        hourly = f'carbond:budget_spent_grams:increase1h{{budget="{b.name}"}}'
        burn = {w: f"({rate_expr(b, w)} / {allowed_per_s:.12g})" for w in ("5m", "30m", "1h", "6h")}
        rules: list[dict[str, Any]] = [
            {"record": "carbond:budget_spent_grams:increase1h", "expr": spent_expr(b, "1h"), "labels": labels},
            {  # before the first whole hour (a new budget or server) the hour so far is all there is
                "record": "carbond:budget_spent_grams",
                "expr": f"{hours_sum(hourly, window_s)} or {hourly}",
                "labels": labels,
            },
            {"record": "carbond:budget_grams", "expr": f"vector({share:.12g})", "labels": labels},
            {
                "alert": "CarbonBudgetNearlySpent",
                "expr": f"{spent} > {0.8 * share:.12g}",
                "labels": {**alert_labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{desc}: more than 80 % spent",
                    "description": f"{{{{ $value | humanize }}}} g spent over the last {window}.",
                },
            },
            {
                "alert": "CarbonBudgetExhausted",
                "expr": f"{spent} > {share:.12g}",
                "labels": {**alert_labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{desc}: exhausted",
                    "description": f"{{{{ $value | humanize }}}} g spent over the last {window}.",
                },
            },
            {
                "alert": "CarbonBudgetFastBurn",
                "expr": f"{burn['1h']} > 14.4 and {burn['5m']} > 14.4",
                "labels": {**alert_labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{desc}: burning 14.4x faster than sustainable",
                    "description": "At this rate the budget is gone in about 1/14 of the period.",
                },
            },
            {
                "alert": "CarbonBudgetSlowBurn",
                "expr": f"{burn['6h']} > 1 and {burn['30m']} > 1",
                "for": "30m",
                "labels": {**alert_labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{desc}: would run out before the period ends",
                    "description": "Emissions over the last 6 h exceed the budget's sustainable rate.",
                },
            },
        ]
        groups.append({"name": f"carbond-budget-{b.name}", "rules": rules})
    return {"groups": groups}


def prometheus_rule(name: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Rule groups as a prometheus-operator PrometheusRule object (kube-prometheus-stack)."""
    labels = {"app.kubernetes.io/name": "carbond", "app.kubernetes.io/part-of": "carbond"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "labels": labels},
        "spec": {"groups": groups},
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: each rule spells its labels out
        return True


def rules_as_prometheus_rule(rules_file: Path, name: str, header: str) -> str:
    """A Prometheus rule file as a PrometheusRule object, with ``header`` (comment lines) on top."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return header + yaml.dump(prometheus_rule(name, groups), Dumper=_Dumper, sort_keys=False, width=200)


def render_text(budgets: BudgetsFile, command: str, fmt: str = "rules", retention_s: int = DEFAULT_RETENTION_S) -> str:
    header = f"# Rendered by `{command}`: do not edit by hand.\n"
    doc = render(budgets, retention_s)
    if fmt == "prometheusrule":
        doc = prometheus_rule("carbond-budgets", doc["groups"])
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=200)


def add_cli(subparsers: Any) -> None:
    budgets = subparsers.add_parser("budgets", help="carbon budgets")
    sub = budgets.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write Prometheus recording and alerting rules for a budgets file")
    r.add_argument("file", metavar="FILE")
    r.add_argument("-o", "--output", metavar="OUT", help="write here instead of standard output")
    r.add_argument(
        "--format",
        choices=["rules", "prometheusrule"],
        default="rules",
        help="a Prometheus rule file (default) or a PrometheusRule object for prometheus-operator",
    )
    r.add_argument(
        "--retention",
        default="10d",
        metavar="DURATION",
        help="the longest window the rules may read (default 10d, kube-prometheus-stack's retention)",
    )


def run_cli(args: Any) -> int:
    try:
        retention_s = duration_seconds(args.retention)
    except ValueError as exc:
        raise ConfigError("--retention", [("retention", str(exc))]) from None
    if retention_s < 3600:
        raise ConfigError("--retention", [("retention", "must be at least 1h")])
    name = Path(args.file).name
    command = f"carbond budgets render {name}"
    if args.format != "rules":
        command += f" --format {args.format}"
    if args.retention != "10d":
        command += f" --retention {args.retention}"
    text = render_text(load(Path(args.file)), command, args.format, retention_s)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0
