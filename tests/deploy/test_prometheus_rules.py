from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carbond import budgets
from carbond.errors import ConfigError
from tests.harness.tools import require_tool

RULES = Path(__file__).parent.parent.parent / "deploy" / "prometheus"


@pytest.mark.parametrize("name", ["carbond.rules.yml", "budgets.rules.yml"])
def test_promtool_check_rules(name: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    out = subprocess.run([promtool, "check", "rules", str(RULES / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_rule_unit_tests_fire_and_resolve() -> None:
    promtool = require_tool("promtool", "prometheus")
    out = subprocess.run(
        [promtool, "test", "rules", "rules.test.yml", "budgets.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_committed_budget_rules_are_rendered_from_the_example() -> None:
    rendered = budgets.render_text(budgets.load(RULES / "budgets.example.yaml"), "budgets.example.yaml")
    assert rendered == (RULES / "budgets.rules.yml").read_text()


def test_budget_selector_picks_the_metric() -> None:
    ns = budgets.Budget(name="a", selector={"pod_namespace": "ml"}, grams=10)
    host = budgets.Budget(name="b", selector={"host": "n1"}, grams=10)
    assert 'carbond_cgroup_emissions_grams_total{pod_namespace="ml"}' in budgets.spent_expr(ns, "30d")
    assert 'carbond_emissions_grams_total{host="n1"}[7d]' in budgets.spent_expr(host, "7d")
    assert budgets.Budget(name="c", grams=1, period="4w").period_seconds == 28 * 86400


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
    out = subprocess.run(
        [sys.executable, "-m", "carbond", "budgets", "render", str(p)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and key in out.stderr and "Traceback" not in out.stderr
