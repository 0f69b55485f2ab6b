"""The fleet rules: promtool's checks and unit tests (two clusters' series as the central receiver holds them), and
the shape every fleet rule keeps: aggregated by cluster, no window beyond 5 minutes, names apart from the
single-Prometheus rules so both files load side by side."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.harness.tools import require_tool

ROOT = Path(__file__).parents[2]
FLEET = ROOT / "deploy" / "prometheus"


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
    fleet = [r for r in rules("fleet.rules.yml") if "record" in r]  # alerts: test_fleet_agent.py
    assert fleet
    for r in fleet:
        assert r["record"].startswith("fleet_cluster"), r["record"]
        assert re.match(r"^(max |count |sum |avg )by \(cluster\b", r["expr"]), r["record"]
        assert set(re.findall(r"\[([^\]]+)\]", r["expr"])) <= {"5m"}, r["record"]
    single = {r.get("record") for r in rules("carbond.rules.yml")}
    assert not single & {r["record"] for r in fleet}


def test_the_agent_keeps_the_daemonsets_pods_on_their_metrics_port() -> None:
    """Debian's Prometheus cannot run Kubernetes discovery here: the shipped relabelling is checked against the
    DaemonSet it must find (its pod label and port name), and the agent keeps only carbond's series."""
    agent = yaml.safe_load((FLEET / "fleet-agent.yml").read_text())
    [scrape] = agent["scrape_configs"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in scrape["relabel_configs"] if r.get("action") == "keep"}
    ds = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "agent" / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]
    name = pod["metadata"]["labels"]["app.kubernetes.io/name"]
    ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == name
    assert keep[("__meta_kubernetes_pod_container_port_name",)] in ports
    [rw] = agent["remote_write"]
    keep_series = {"source_labels": ["__name__", "job"], "regex": "carbond_.*;.*|up;carbond", "action": "keep"}
    assert rw["write_relabel_configs"] == [keep_series]  # evaluated on series in test_fleet_agent.py
    assert agent["global"]["external_labels"] == {"cluster": "CLUSTER_NAME"}
