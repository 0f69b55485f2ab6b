"""The rule files: promtool checks and unit tests, the committed renderings, and no window beyond the retention."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carbond import budgets
from carbond.errors import ConfigError
from tests.harness.tools import require_tool

ROOT = Path(__file__).parent.parent.parent
RULES = ROOT / "deploy" / "prometheus"
PROMETHEUSRULE = ROOT / "deploy" / "kubernetes" / "components" / "kube-prometheus-stack" / "prometheusrule.yaml"
PROMETHEUSRULE_HEADER = (
    "# deploy/prometheus/carbond.rules.yml as a PrometheusRule: do not edit by hand; regenerate with\n"
    "# pytest tests/deploy/test_prometheus_rules.py --update-golden\n"
)
RETENTION_S = 10 * 86400  # kube-prometheus-stack's default; a plain Prometheus keeps 15d
_RANGE = re.compile(r"\[(\d+[smhdwy](?:\d+[smhdwy])*)(?::[^\]]*)?\]")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def render_budgets(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "carbond", "budgets", "render", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def run_promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", "prometheus")
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["carbond.rules.yml", "budgets.rules.yml"])
def test_promtool_check_rules(name: str) -> None:
    out = run_promtool("check", "rules", str(RULES / name))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_rule_unit_tests_fire_and_resolve() -> None:
    out = run_promtool("test", "rules", "rules.test.yml", "budgets.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_committed_budget_rules_are_rendered_from_the_example() -> None:
    rendered = budgets.render_text(
        budgets.load(RULES / "budgets.example.yaml"), "carbond budgets render budgets.example.yaml"
    )
    assert rendered == (RULES / "budgets.rules.yml").read_text()


def test_committed_prometheusrule_is_the_rules_file(request: pytest.FixtureRequest) -> None:
    rendered = budgets.rules_as_prometheus_rule(RULES / "carbond.rules.yml", "carbond", PROMETHEUSRULE_HEADER)
    if request.config.getoption("--update-golden"):
        PROMETHEUSRULE.write_text(rendered)
    assert PROMETHEUSRULE.read_text() == rendered, "run this test with --update-golden"


def duration_s(text: str) -> int:
    return sum(int(n) * _UNIT_S[u] for n, u in re.findall(r"(\d+)([smhdwy])", text))


def windows(expr: str) -> list[int]:
    return [duration_s(m) for m in _RANGE.findall(expr)]


def test_no_expression_reads_beyond_the_retention() -> None:
    """Rules and dashboard alike: a [30d] window would silently cover what a 10d or 15d retention kept."""
    exprs = [
        r["expr"]
        for name in ("carbond.rules.yml", "budgets.rules.yml")
        for g in yaml.safe_load((RULES / name).read_text())["groups"]
        for r in g["rules"]
    ]
    dash = json.loads((ROOT / "grafana" / "carbond.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert windows("sum_over_time(x[863999s:1h]) + increase(y[1d]) + z[1h30m]") == [863999, 86400, 5400]
    too_long = [e for e in exprs if any(w > RETENTION_S for w in windows(e))]
    assert too_long == []
    assert not [e for e in exprs if "30d" in e]


def test_budget_longer_than_the_retention_is_checked_pro_rata() -> None:
    b = budgets.Budget(name="m", selector={"pod_namespace": "ml"}, grams=30000, period="30d")
    rules = budgets.render(budgets.BudgetsFile(budgets=[b]))["groups"][0]["rules"]
    by_name = {r.get("record") or r["alert"]: r["expr"] for r in rules}
    assert by_name["carbond:budget_grams"] == "vector(10000)"  # 10 of 30 days
    assert "[863999s:1h]" in by_name["carbond:budget_spent_grams"]
    assert by_name["CarbonBudgetExhausted"].endswith("> 10000")
    full = budgets.render(budgets.BudgetsFile(budgets=[b]), retention_s=30 * 86400)["groups"][0]["rules"]
    assert {r.get("record"): r["expr"] for r in full}["carbond:budget_grams"] == "vector(30000)"


def test_budget_selector_picks_the_metric() -> None:
    ns = budgets.Budget(name="a", selector={"pod_namespace": "ml"}, grams=10)
    host = budgets.Budget(name="b", selector={"host": "n1"}, grams=10)
    team = budgets.Budget(name="t", selector={"host": "n1", "team": "search"}, grams=10)
    assert 'carbond_cgroup_emissions_grams_total{pod_namespace="ml"}' in budgets.spent_expr(ns, "1h")
    assert 'carbond_emissions_grams_total{host="n1"}[7d]' in budgets.spent_expr(host, "7d")
    assert 'carbond_cgroup_emissions_grams_total{host="n1",team="search"}' in budgets.spent_expr(team, "1h")
    assert budgets.Budget(name="c", grams=1, period="4w").period_seconds == 28 * 86400


def test_every_budget_series_and_alert_carries_its_selector_labels() -> None:
    """Dashboards and alert routes filter budgets on what they count: each rule records the name and the selector."""
    example = budgets.load(RULES / "budgets.example.yaml")
    groups = yaml.safe_load((RULES / "budgets.rules.yml").read_text())["groups"]
    for b, group in zip(example.budgets, groups, strict=True):
        assert len(group["rules"]) == 7, b.name
        for rule in group["rules"]:
            labels = {k: v for k, v in rule["labels"].items() if k != "severity"}
            assert labels == {"budget": b.name, **b.selector}, (b.name, rule.get("record") or rule["alert"])
    physics = next(g for g in groups if g["name"] == "carbond-budget-slurm-physics")
    assert physics["rules"][0]["labels"] == {"budget": "slurm-physics", "slurm_account": "physics"}


def test_a_selector_value_with_braces_is_a_literal_alert_label(tmp_path: Path) -> None:
    """Alert labels are Go templates: a value with ``{{`` reaches the alert as written, and the rules still load."""
    source = tmp_path / "budgets.yaml"
    source.write_text("budgets:\n  - {name: t, selector: {team: 'a{{b}}'}, grams: 1, period: 1h}\n")
    (tmp_path / "r.yml").write_text(budgets.render_text(budgets.load(source), "budgets.yaml"))
    rules = yaml.safe_load((tmp_path / "r.yml").read_text())["groups"][0]["rules"]
    assert {r["labels"]["team"] for r in rules if "record" in r} == {"a{{b}}"}
    test = {
        "rule_files": ["r.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'carbond_cgroup_emissions_grams_total{host="n1",team="a{{b}}"}', "values": "0+10x100"}
                ],
                "promql_expr_test": [
                    {
                        "expr": 'ALERTS{alertname="CarbonBudgetNearlySpent"}',
                        "eval_time": "30m",
                        "exp_samples": [
                            {
                                "labels": 'ALERTS{alertname="CarbonBudgetNearlySpent",alertstate="firing",budget="t",'
                                'severity="warning",team="a{{b}}"}',
                                "value": 1,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "t.yml").write_text(yaml.safe_dump(test))
    out = run_promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheusrule_format_holds_the_same_rules(tmp_path: Path) -> None:
    out = render_budgets(str(RULES / "budgets.example.yaml"), "--format", "prometheusrule")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# Rendered by `carbond budgets render budgets.example.yaml --format prometheusrule`")
    obj = yaml.safe_load(out.stdout)
    assert (obj["apiVersion"], obj["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "carbond"
    assert obj["spec"] == yaml.safe_load((RULES / "budgets.rules.yml").read_text())
    groups = tmp_path / "groups.yml"
    groups.write_text(yaml.safe_dump(obj["spec"]))
    check = run_promtool("check", "rules", str(groups))
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("retention", ["1x", "30m"])
def test_bad_retention_exits_2(retention: str) -> None:
    out = render_budgets(str(RULES / "budgets.example.yaml"), "--retention", retention)
    assert out.returncode == 2
    assert "--retention" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("budgets:\n  - {name: a, grams: -1}\n", "budgets.0.grams"),
        ("budgets:\n  - {name: a, grams: 1, period: monthly}\n", "budgets.0.period"),
        ("budgets:\n  - {name: a, grams: 1, selectr: {}}\n", "budgets.0.selectr"),
        ("budgets:\n  - {name: 'a b', grams: 1}\n", "budgets.0.name"),
    ],
)
def test_bad_budgets_exit_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "b.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        budgets.load(p)
    assert key in [k for k, _ in info.value.problems]
    out = render_budgets(str(p))
    assert out.returncode == 2
    assert key in out.stderr
    assert "Traceback" not in out.stderr
