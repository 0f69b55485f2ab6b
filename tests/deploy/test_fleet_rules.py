"""The fleet rules: promtool's checks and unit tests (two clusters' series as the central receiver holds them), and
the shape every fleet rule keeps: aggregated by cluster, no window beyond 5 minutes, names apart from the
single-Prometheus rules so both files load side by side."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.harness.tools import require_tool

FLEET = Path(__file__).parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool", "prometheus"), *args], cwd=FLEET, capture_output=True, text=True)


def rules(name: str) -> list[dict[str, str]]:
    return [r for g in yaml.safe_load((FLEET / name).read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_and_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "fleet.rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "fleet.rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    central = promtool("check", "config", "fleet-central.yml")
    assert central.returncode == 0, central.stdout + central.stderr


def test_every_fleet_rule_keeps_cluster_and_short_windows() -> None:
    fleet = rules("fleet.rules.yml")
    assert fleet
    for r in fleet:
        assert r["record"].startswith("fleet_cluster"), r["record"]
        assert re.match(r"^(max |count |sum |avg )by \(cluster\b", r["expr"]), r["record"]
        assert set(re.findall(r"\[([^\]]+)\]", r["expr"])) <= {"5m"}, r["record"]
    single = {r.get("record") for r in rules("carbond.rules.yml")}
    assert not single & {r["record"] for r in fleet}
