"""The real Prometheus server scrapes the real daemon; every dashboard panel and rule expression is evaluated."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import budgets
from carbond.testing.daemon import Daemon, free_port
from carbond.testing.powercap import PowercapWriter, typical_intel
from carbond.testing.procfs import ProcTree
from carbond.testing.tools import require_tool

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent.parent
#: Metrics the daemon does not produce yet (attribution has not landed). Kept honest by a test below.
PENDING_METRICS = {
    "carbond_cgroup_power_watts",
    "carbond_cgroup_energy_joules_total",
    "carbond_cgroup_emissions_grams_total",
}


def panel_exprs() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "grafana" / "carbond.json").read_text())
    subst = {"$host": ".*", "$zone": ".*", "$namespace": ".*"}
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            out.append((panel["title"], expr))
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


def test_dashboard_and_rules_against_real_prometheus(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", "prometheus")
    tree = typical_intel(tmp_path / "sys")
    ProcTree(tmp_path / "proc")
    cfg = {
        "measure_power_secs": 1,
        "sensors": ["rapl", "fake"],
        "host_name": "e2e-node",
        "pue": 1.2,
        "intensity": {"zone": "FR"},
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc")},
        "fake": {
            "devices": [
                {"device": "gpu-0", "kind": "gpu", "watts": 250.0},
                {"device": "gpu-1", "kind": "gpu", "watts": 120.0},
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
    with PowercapWriter({tree.zones[0]: 40.0, tree.zones[3]: 6.0}, period_s=0.02), Daemon(tmp_path, cfg) as d:
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
            panels = panel_exprs()
            pending = [(t, e) for t, e in panels if any(m in e for m in PENDING_METRICS)]
            live = [(t, e) for t, e in panels if (t, e) not in pending]
            deadline = time.monotonic() + 45
            missing: list[str] = [t for t, _ in live]
            while time.monotonic() < deadline and missing:
                time.sleep(1)
                try:
                    results = {t: query(base, e) for t, e in live}
                except OSError:
                    continue
                missing = [t for t, r in results.items() if r.get("status") != "success" or not r["data"]["result"]]
            assert missing == [], f"panels without data: {missing}"
            for title, expr in pending:
                r = query(base, expr)
                assert r["status"] == "success", (title, r)
            for expr in rule_exprs(rule_files):
                r = query(base, expr)
                assert r["status"] == "success", (expr, r)
            gpu = query(base, 'carbond_device_power_watts{kind="gpu", device="gpu-0"}')["data"]["result"]
            assert float(gpu[0]["value"][1]) == pytest.approx(250.0, rel=0.01)
            exposition = d.get("/metrics")[1].decode()
        finally:
            prom.terminate()
            prom.wait(15)
            log.close()
    present = set(re.findall(r"^(carbond_\w+?)(?:\{| )", exposition, re.M))
    for metric in PENDING_METRICS:  # when attribution lands, these move out of PENDING and their panels must fill
        assert metric not in present, f"{metric} is produced now: remove it from PENDING_METRICS"
