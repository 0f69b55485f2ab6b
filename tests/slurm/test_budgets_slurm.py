"""Carbon budgets per Slurm account: ``slurm_account`` selectors render rules over the jobs' cgroup series, whose
recorded series and alerts carry the account's label, and promtool runs them against series that come and go with
the jobs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from carbond import budgets
from carbond.cli import main

RULES = Path(__file__).parents[2] / "deploy" / "prometheus"


def test_a_slurm_account_selects_the_cgroup_emissions() -> None:
    b = budgets.Budget(name="physics", selector={"slurm_account": "physics", "host": "n1"}, grams=100)
    assert budgets.spent_expr(b, "1h") == (
        'sum(increase(carbond_cgroup_emissions_grams_total{host="n1",slurm_account="physics"}[1h]))'
    )
    for label in ("slurm_partition", "slurm_user"):
        assert label in budgets.Budget(name="x", selector={label: "v"}, grams=1).selector


def test_a_misspelt_slurm_label_is_rejected_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("budgets:\n  - {name: a, selector: {slurm_acount: physics}, grams: 1}\n")
    assert main(["budgets", "render", str(f)]) == 2
    err = capsys.readouterr().err
    assert "budgets.0.selector" in err
    assert "did you mean 'slurm_account'?" in err


def test_an_account_budget_renders_valid_rules(tmp_path: Path, promtool: str) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("budgets:\n  - {name: chem, selector: {slurm_account: chem}, grams: 5000, period: 7d}\n")
    out = tmp_path / "rules.yml"
    assert main(["budgets", "render", str(f), "-o", str(out)]) == 0
    rules = yaml.safe_load(out.read_text())["groups"][0]["rules"]
    assert rules[0]["expr"] == 'sum(increase(carbond_cgroup_emissions_grams_total{slurm_account="chem"}[1h]))'
    # every series and alert names the account, for dashboards and alert routes to match on
    assert [r["labels"]["slurm_account"] for r in rules] == ["chem"] * len(rules)
    checked = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_shipped_account_budget_fires_over_its_jobs_series(promtool: str) -> None:
    example = budgets.load(RULES / "budgets.example.yaml")
    assert "slurm-physics" in [b.name for b in example.budgets]
    tests = yaml.safe_load((RULES / "budgets.test.yml").read_text())["tests"]
    assert any("Slurm account" in t["name"] for t in tests)
    ran = subprocess.run(
        [promtool, "test", "rules", "budgets.test.yml"], cwd=RULES, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
