"""The fleet topology end to end (deploy/prometheus/fleet.md): three carbond daemons with their own host names in two
clusters, one Debian Prometheus in agent mode per cluster (the shipped fleet-agent.yml) remote-writing to a central
Prometheus with the remote-write receiver (fleet-central.yml) that evaluates fleet.rules.yml. Every fleet rule and
every query of grafana/carbond-fleet.json must return data on the central one, with the teams, projects and
namespaces the daemons' labels give.

Debian builds Prometheus without Kubernetes discovery, so the agents keep the shipped remote_write section and
external label but scrape static targets. Bounded: about 11 s here, 50 s at most for the data to arrive.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import budgets
from carbond.testing.cgroupfs import CgroupTree, CgroupWriter
from carbond.testing.fixture_host import ServedInThread
from carbond.testing.kube_fake import FakeKubernetes, FakePod
from carbond.testing.procfs import ProcTree
from tests.deploy.test_prometheus_e2e import query
from tests.harness.daemon import Daemon, free_port
from tests.harness.tools import require_tool
from tests.harness.wait import NotYet, eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
FLEET = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "grafana" / "carbond-fleet.json"
#: The bound on the data reaching the central Prometheus through the agents: a few seconds quiet, for a stuck test.
DEADLINE_S = 120.0
UIDS = ("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "11111111-2222-3333-4444-555555555555")
CIDS = ("ab" * 32, "cd" * 32)


def pod_cgroup(i: int) -> str:
    uid = UIDS[i].replace("-", "_")
    return f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{CIDS[i]}.scope"


def kube() -> FakeKubernetes:
    """The same two pods on each Kubernetes node: a trainer of team ml (project bert) and a shop web server."""
    k = FakeKubernetes(token="fleet-token")
    for node in ("node-a1", "node-b1"):
        k.pods.append(
            FakePod(UIDS[0], "trainer-0", "ml", node, {"t": f"containerd://{CIDS[0]}"}, labels={"project": "bert"})
        )
        k.pods.append(
            FakePod(
                UIDS[1],
                "web-0",
                "shop",
                node,
                {"w": f"containerd://{CIDS[1]}"},
                labels={"team": "web", "project": "checkout"},
            )
        )
    k.namespaces = {"ml": {"team": "ml"}, "shop": {}}
    return k


def agent_flag(prometheus: str) -> str:
    """``--enable-feature=agent`` before Prometheus 3, ``--agent`` from 3 on."""
    out = subprocess.run([prometheus, "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"version (\d+)\.", out.stdout + out.stderr)
    return "--agent" if m and int(m.group(1)) >= 3 else "--enable-feature=agent"


#: fleet rule -> (its labels, "value/value" of each series it must give): ml from the namespace label, web from the
#: pod's own, data from the systemd unit pattern; namespaces only where pod names are read (not node-a2)
ROLL_UPS = {
    "fleet_cluster_team:carbond_emissions_grams:rate5m": (
        ("cluster", "team"),
        {"a/ml", "a/web", "a/data", "b/ml", "b/web"},
    ),
    "fleet_cluster_project:carbond_emissions_grams:rate5m": (
        ("cluster", "team", "project"),
        {"a/ml/bert", "a/web/checkout", "a/data/warehouse", "b/ml/bert", "b/web/checkout"},
    ),
    "fleet_cluster_namespace:carbond_emissions_grams:rate5m": (
        ("cluster", "pod_namespace"),
        {"a/ml", "a/shop", "b/ml", "b/shop"},
    ),
    "fleet_cluster_zone:carbond_grid_intensity_grams_per_kwh:avg": (("cluster", "zone"), {"a/FR", "a/DE", "b/SE1"}),
}


def panel_exprs() -> list[tuple[str, str]]:
    """Every query of the fleet dashboard, its variables at All and the range at 10 minutes."""
    dash = json.loads(DASHBOARD.read_text())
    subst = {"$cluster": ".*", "$team": ".*", "$project": ".*", "$__range_s": "600", "$__range": "10m"}
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            out.append((panel["title"], expr))
    return out


def rules() -> list[tuple[str, str]]:
    doc = yaml.safe_load((FLEET / "fleet.rules.yml").read_text())
    return [(r["record"], r["expr"]) for g in doc["groups"] for r in g["rules"] if "record" in r]  # not the alerts


@contextlib.contextmanager
def prometheus(tmp: Path, name: str, config: dict[str, Any], *flags: str) -> Iterator[str]:
    """A Prometheus process on loopback; yields its URL."""
    binary = require_tool("prometheus", "prometheus")
    port = free_port()
    (tmp / f"{name}.yml").write_text(yaml.safe_dump(config))
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / f'{name}.yml'}", f"--web.listen-address=127.0.0.1:{port}", *flags],
        stdout=log,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def agent_config(cluster: str, targets: list[str], central: str) -> dict[str, Any]:
    """The shipped agent config: its remote_write and external label kept, static targets, 1 s intervals."""
    cfg = yaml.safe_load((FLEET / "fleet-agent.yml").read_text())
    assert cfg["global"]["external_labels"] == {"cluster": "CLUSTER_NAME"}
    cfg["global"] = {"scrape_interval": "1s", "external_labels": {"cluster": cluster}}
    [scrape] = cfg["scrape_configs"]
    cfg["scrape_configs"] = [{"job_name": scrape["job_name"], "static_configs": [{"targets": targets}]}]
    [rw] = cfg["remote_write"]
    rw["url"] = f"{central}/api/v1/write"
    rw["queue_config"]["batch_send_deadline"] = "1s"
    return cfg


def central_config(tmp: Path) -> dict[str, Any]:
    """The shipped central config and its rules, evaluated every second (the cardinality group too), and a team's
    carbon budget across clusters (``carbond budgets render``)."""
    cfg = yaml.safe_load((FLEET / "fleet-central.yml").read_text())
    assert cfg["rule_files"] == ["fleet.rules.yml"]
    doc = yaml.safe_load((FLEET / "fleet.rules.yml").read_text())
    for group in doc["groups"]:
        group.pop("interval", None)
    (tmp / "fleet.rules.yml").write_text(yaml.safe_dump(doc))
    cfg["global"]["evaluation_interval"] = "1s"
    (tmp / "budgets.yaml").write_text("budgets:\n  - {name: team-ml, selector: {team: ml}, grams: 1000, period: 30d}\n")
    (tmp / "budgets.rules.yml").write_text(budgets.render_text(budgets.load(tmp / "budgets.yaml"), "budgets.yaml"))
    cfg["rule_files"] = [str(tmp / "fleet.rules.yml"), str(tmp / "budgets.rules.yml")]
    return cfg


def values(base: str, expr: str, *labels: str) -> dict[str, float]:
    """``expr`` at the central one: "value/value" of ``labels`` of each series -> its value."""
    result = query(base, expr)["data"]["result"]
    return {"/".join(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


def test_fleet_rules_and_dashboard_on_the_central_prometheus(tmp_path: Path) -> None:
    prom = require_tool("prometheus", "prometheus")
    proc = ProcTree(tmp_path / "proc")
    tree = CgroupTree(tmp_path / "cg")
    tree.add(pod_cgroup(0), cpus=0.3, memory_bytes=2 << 30)
    tree.add(pod_cgroup(1), cpus=0.1, memory_bytes=1 << 30)
    tree.add("system.slice/postgresql.service", cpus=0.2, memory_bytes=1 << 30)
    tree.add("system.slice/ssh.service", cpus=0.05)
    token = tmp_path / "token"
    token.write_text("fleet-token")
    central_cfg = central_config(tmp_path)

    def daemon(name: str, attribution: dict[str, Any], zone: str) -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir()
        cfg = {
            "host_name": name,
            "measure_power_secs": 1,
            "sensors": ["fake"],
            "fake": {"devices": [{"device": "package-0", "kind": "cpu", "watts": 60.0}]},
            "intensity": {"zone": zone},
            "paths": {"procfs": str(tmp_path / "proc"), "cgroupfs": str(tmp_path / "cg")},
            "attribution": attribution,
        }
        return Daemon(workdir, cfg)

    def kubernetes(node: str) -> dict[str, Any]:
        return {
            "enabled": True,
            "api_url": kube_url,
            "node_name": node,
            "token_file": str(token),
            "ca_file": None,
            "refresh_secs": 1,
        }

    units = [{"match": "postgresql*.service", "team": "data", "project": "warehouse"}]
    with ServedInThread(kube()) as kube_server, CgroupWriter(tree, proc, busy=0.5):
        kube_url = kube_server.url
        labels = {"pods": ["team", "project"], "namespaces": ["team"]}
        with (
            daemon("node-a1", {"kubernetes": kubernetes("node-a1"), "labels": labels}, "FR") as a1,
            daemon("node-a2", {"units": units}, "DE") as a2,
            daemon(
                "node-b1", {"kubernetes": kubernetes("node-b1"), "labels": labels, "granularity": "namespace"}, "SE1"
            ) as b1,
            prometheus(
                tmp_path,
                "central",
                central_cfg,
                "--web.enable-remote-write-receiver",
                f"--storage.tsdb.path={tmp_path / 'central-tsdb'}",
            ) as central,  # fmt: skip
            prometheus(
                tmp_path,
                "agent-a",
                agent_config("a", [f"127.0.0.1:{a1.port}", f"127.0.0.1:{a2.port}"], central),
                agent_flag(prom),
                f"--storage.agent.path={tmp_path / 'agent-a'}",
            ),  # fmt: skip
            prometheus(
                tmp_path,
                "agent-b",
                agent_config("b", [f"127.0.0.1:{b1.port}"], central),
                agent_flag(prom),
                f"--storage.agent.path={tmp_path / 'agent-b'}",
            ),  # fmt: skip
        ):
            budget = 'carbond:budget_spent_grams:increase1h{budget="team-ml"}'
            wanted = [(f"rule {name}", name) for name, _ in rules()] + panel_exprs() + [("team budget", budget)]
            missing, wrong = [title for title, _ in wanted], ["not queried yet"]

            def arrived() -> bool:
                """Every query answers, with every node's names and labels (missing and wrong say what lacks)."""
                nonlocal missing, wrong
                missing = [t for t, e in wanted if not query(central, e).get("data", {}).get("result")]
                wrong = [e for e, (labels, want) in ROLL_UPS.items() if set(values(central, e, *labels)) != want]
                return not (missing or wrong)

            # the central Prometheus answers a 503 page (not JSON) until it is up
            with contextlib.suppress(NotYet):
                eventually(arrived, DEADLINE_S, max_interval=1.0, ignore=(OSError, ValueError))
            logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-1500:] for n in ("central", "agent-a")}
            assert missing == [], f"no data on the central Prometheus for {missing}\n{logs}"
            for expr, (labels, want) in ROLL_UPS.items():
                assert set(values(central, expr, *labels)) == want, expr

            assert values(central, "fleet_cluster:carbond_nodes:count", "cluster") == {"a": 2.0, "b": 1.0}
            power = values(central, "fleet_cluster:carbond_power_watts:sum", "cluster")
            assert power == pytest.approx({"a": 120.0, "b": 60.0}, rel=0.05)
            # node-b1 runs at namespace granularity: its cgroup series are per namespace, not per container
            b1 = values(central, 'count by (cgroup) (carbond_cgroup_emissions_grams_total{host="node-b1"})', "cgroup")
            # (kubepods: pods added up before their names arrived, if a tick came first)
            assert set(b1) - {"kubepods"} == {
                "namespace/ml",
                "namespace/shop",
                "system.slice",
                "(idle)",
                "(unattributed)",
            }
            # a team's budget counts its emissions in both clusters
            spent = values(central, budget, "budget")["team-ml"]
            ml = values(central, 'sum(increase(carbond_cgroup_emissions_grams_total{team="ml"}[1h]))')[""]
            assert spent > 0
            assert spent == pytest.approx(ml, rel=0.5)
            assert set(
                values(central, 'sum by (cluster) (carbond_cgroup_emissions_grams_total{team="ml"})', "cluster")
            ) == {"a", "b"}
