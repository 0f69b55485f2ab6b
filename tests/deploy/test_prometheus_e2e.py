"""The real Prometheus server scrapes the real daemon; every dashboard panel and rule expression is evaluated."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import budgets
from carbond.testing.cgroupfs import CgroupTree, CgroupWriter
from carbond.testing.powercap import PowercapWriter, typical_intel
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, free_port
from tests.harness.tools import require_tool
from tests.harness.wait import NotYet, eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent.parent
POD_UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
POD_CGROUP = (
    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/"
    "cri-containerd-" + "ab" * 32 + ".scope"
)


# Grafana's values for the dashboard's variables with everything selected, and its interval variables
SUBST = {"$host": ".*", "$zone": ".*", "$namespace": ".*", "$pod": ".*", "$team": ".*", "$project": ".*"}
SUBST |= {"$__rate_interval": "4s", "$__range": "5m"}
#: How long every panel may take to show data: a few scrapes quiet, many more on a loaded 2-core machine.
PANELS_TIMEOUT_S = 120.0


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title and target refId, the query with the variables substituted), for every target."""
    dash = json.loads((ROOT / "grafana" / "carbond.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for k, v in SUBST.items():
                expr = expr.replace(k, v)
            assert "$" not in expr.replace("$1", ""), f"a variable the test does not know: {expr}"
            out.append((f"{panel['title']} {target['refId']}", expr))
    return out


def rule_exprs(files: list[Path]) -> list[str]:
    return [r["expr"] for f in files for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as err:
        return json.loads(err.read())  # type: ignore[no-any-return]


def check_panels(results: dict[str, dict[str, Any]]) -> None:
    """What the panels show, beyond having data: no double counting, readable legends, pods only."""

    def rows(title: str) -> list[dict[str, Any]]:
        return results[title]["data"]["result"]  # type: ignore[no-any-return]

    kinds = {r["metric"]["kind"] for r in rows("Power by device A")}
    # core/uncore/psys and the platform left out; other (the wall minus the components) stacked with them
    assert kinds <= {"cpu", "dram", "gpu", "ram", "soc", "other"}
    assert {"cpu", "gpu", "other"} <= kinds
    by_device = sum(float(r["value"][1]) for r in rows("Power by device A"))
    node = sum(float(r["value"][1]) for r in rows("Node power A"))
    assert by_device == pytest.approx(node, rel=0.05)  # the stacked devices add up to the node, once
    [wall], [components], [other] = (rows(f"Wall vs components {ref}") for ref in "ABC")
    assert float(wall["value"][1]) == pytest.approx(node, rel=0.05)  # the node is at the wall
    assert float(wall["value"][1]) == pytest.approx(float(components["value"][1]) + float(other["value"][1]), rel=0.05)
    # the uncertainty bands: one standard deviation either side of the figure
    lo, mid, hi = (float(rows(f"Node power {ref}")[0]["value"][1]) for ref in "CAB")
    assert lo <= mid <= hi
    assert hi - lo < mid
    e_lo, e_mid, e_hi = (float(rows(f"Emissions rate (g/h) {ref}")[0]["value"][1]) for ref in "CAB")
    assert e_lo < e_mid < e_hi  # the intensity's band alone makes it non-zero
    names = {r["metric"]["name"] for r in rows("Top workloads by power A")}
    assert "ssh.service" in names, names
    assert not [n for n in names if n.startswith(("system.slice", "kubepods"))], names
    pods = rows("Top pods by emissions (g/h) A")
    assert [r["metric"]["pod"] for r in pods] == [POD_UID]  # a pod without a known name shows its UID
    assert [r["metric"]["pod"] for r in rows("Pod power A")] == [POD_UID]


def test_dashboard_and_rules_against_real_prometheus(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", "prometheus")
    tree = typical_intel(tmp_path / "sys")
    proc = ProcTree(tmp_path / "proc")
    cgroups = CgroupTree(tmp_path / "cg")
    cgroups.add("system.slice/ssh.service", cpus=0.2, memory_bytes=1 << 30)
    cgroups.add(POD_CGROUP, cpus=0.6, memory_bytes=3 << 30)
    cfg = {
        "measure_power_secs": 1,
        "sensors": ["rapl", "fake"],
        "host_name": "e2e-node",
        "pue": 1.2,
        "intensity": {"zone": "FR"},
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc"), "cgroupfs": str(tmp_path / "cg")},
        "fake": {
            "devices": [
                {"device": "gpu-0", "kind": "gpu", "watts": 250.0},
                {"device": "gpu-1", "kind": "gpu", "watts": 120.0},
                # a wall meter above the components (40 + 6 W of RAPL, 370 W of GPUs): the node is at the wall
                {"device": "wall", "kind": "platform", "watts": 500.0},
            ]
        },
    }
    budget_file = tmp_path / "budgets.yaml"
    budget_file.write_text("budgets:\n  - {name: node, selector: {host: e2e-node}, grams: 1000, period: 30d}\n")
    budget_rules = tmp_path / "budgets.rules.yml"
    budget_rules.write_text(budgets.render_text(budgets.load(budget_file), "budgets.yaml"))
    rule_files = [ROOT / "deploy" / "prometheus" / "carbond.rules.yml", budget_rules]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        PowercapWriter({tree.zones[0]: 40.0, tree.zones[3]: 6.0}, period_s=0.02),
        CgroupWriter(cgroups, proc, busy=0.5),
        Daemon(tmp_path, cfg) as d,
    ):
        prom_cfg = tmp_path / "prometheus.yml"
        prom_cfg.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(f) for f in rule_files],
                    "scrape_configs": [
                        {"job_name": "carbond", "static_configs": [{"targets": [f"127.0.0.1:{d.port}"]}]}
                    ],
                }
            )
        )
        log = (tmp_path / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={prom_cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            live = panel_exprs()
            last: list[list[str]] = [[t for t, _ in live]]

            def every_panel() -> dict[str, dict[str, Any]] | None:
                results = {t: query(base, e) for t, e in live}
                last[0] = [t for t, r in results.items() if r.get("status") != "success" or not r["data"]["result"]]
                return None if last[0] else results

            # Prometheus scrapes every 1 s and the rates need a few samples (the bound is for a stuck test); until it is
            # up its API refuses connections or answers a 503 page that is not JSON
            try:
                results = eventually(every_panel, PANELS_TIMEOUT_S, max_interval=1.0, ignore=(OSError, ValueError))
            except NotYet:
                pytest.fail(f"panels without data: {last[0]}")
            for expr in rule_exprs(rule_files):
                r = query(base, expr)
                assert r["status"] == "success", (expr, r)
            check_panels(results)
            gpu = query(base, 'carbond_device_power_watts{kind="gpu", device="gpu-0"}')["data"]["result"]
            assert float(gpu[0]["value"][1]) == pytest.approx(250.0, rel=0.01)
            pod = query(base, f'sum(carbond_cgroup_power_watts{{pod_uid="{POD_UID}"}})')["data"]["result"]
            ssh = query(base, 'sum(carbond_cgroup_power_watts{unit="ssh.service"})')["data"]["result"]
            assert float(pod[0]["value"][1]) > float(ssh[0]["value"][1]) > 0  # 0.6 CPUs against 0.2
        finally:
            prom.terminate()
            prom.wait(15)
            log.close()
