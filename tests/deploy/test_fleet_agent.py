"""The fleet agent as shipped: its Kubernetes manifests rendered and validated like the DaemonSet, its discovery
relabelling evaluated on the target label sets Prometheus's Kubernetes pod discovery produces (Debian's Prometheus
lacks that discovery, so `promtool check config` cannot load the job: the relabel rules are run here with
Prometheus's semantics instead), what its remote write forwards, and the fleet health alerts under promtool."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.deploy.test_kubernetes import K8S, K8S_VERSION, ROOT
from tests.deploy.test_kubernetes_installs import install
from tests.harness.tools import require_tool

PROM = ROOT / "deploy" / "prometheus"
AGENT = yaml.safe_load((PROM / "fleet-agent.yml").read_text())

Labels = dict[str, str]


def relabel(labels: Labels, configs: list[dict[str, Any]]) -> Labels | None:
    """Prometheus's relabelling (model/relabel): None when the target or series is dropped."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        regex = re.compile(f"^(?:{c.get('regex', '(.*)')})$")
        m = regex.match(value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            target = m.expand(c.get("replacement", "$1").replace("$", "\\"))
            if target:
                labels[c["target_label"]] = target
            else:
                labels.pop(c["target_label"], None)
        if action == "labelmap":
            for name, v in list(labels.items()):
                if mm := regex.match(name):
                    labels[mm.expand(c.get("replacement", "$1").replace("$", "\\"))] = v
    return labels


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: dict[str, Any], namespace: str, name: str, node: str, ip: str, phase: str) -> list[Labels]:
    """One target per declared container port, labelled as the documented `role: pod` discovery labels it."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ready": "true" if phase == "Running" else "false",
        "__meta_kubernetes_pod_host_ip": "10.0.0.1",
        "__meta_kubernetes_pod_controller_kind": "DaemonSet",
    }
    for k, v in pod["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{sanitize(k)}"] = v
        meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(k)}"] = "true"
    out = []
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            out.append(
                {
                    **meta,
                    "__address__": f"{ip}:{p['containerPort']}",
                    "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_init": "false",
                    "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP"),
                    "job": "carbond",
                }
            )
    return out


def rendered() -> list[dict[str, Any]]:
    return install("energy-meter", components=["namespace", "gpu", "fleet-agent"])


def test_agent_manifests_validate_and_carry_the_shipped_config() -> None:
    docs = rendered()
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("carbond-fleet-agent-")]
    assert cm["data"]["fleet-agent.yml"] == (PROM / "fleet-agent.yml").read_text()
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    assert {v["name"]: v.get("configMap", {}).get("name") for v in pod["volumes"]}["config"] == cm["metadata"]["name"]
    assert "--enable-feature=agent" in pod["containers"][0]["args"]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    agent_role = roles["carbond:energy-meter:fleet-agent"]
    assert agent_role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    (binding,) = [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "carbond:energy-meter:fleet-agent"
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "carbond-fleet-agent", "namespace": "energy-meter"}
    ]
    assert (K8S / "components" / "fleet-agent" / "fleet-agent.yml").read_text() == (
        PROM / "fleet-agent.yml"
    ).read_text()


def test_discovery_keeps_every_carbond_pod_once_and_names_its_node() -> None:
    docs = rendered()
    (job,) = AGENT["scrape_configs"]
    pods = [(d["metadata"]["name"], d["spec"]["template"]) for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    port = {"name": "metrics", "containerPort": 9100}  # an unrelated exporter's port of the same name
    unrelated = {"metadata": {"labels": {"app.kubernetes.io/name": "node-exporter"}}, "spec": {"containers": []}}
    unrelated["spec"]["containers"].append({"name": "x", "ports": [port]})
    candidates = []
    for i, (owner, pod) in enumerate([*pods, ("node-exporter", unrelated)]):
        candidates += pod_targets(pod, "energy-meter", f"{owner}-{i}", f"node-{i}", f"10.1.0.{i}", "Running")
    done = pod_targets(dict(pods)["carbond"], "energy-meter", "carbond-old", "node-9", "10.1.0.9", "Succeeded")
    kept = [t for t in (relabel(c, job["relabel_configs"]) for c in candidates + done) if t is not None]
    by_address = {t["__address__"]: t for t in kept}
    ports = {owner: pod["spec"]["containers"][0]["ports"][0]["containerPort"] for owner, pod in pods}
    assert set(by_address) == {
        f"10.1.0.{i}:{ports[o]}" for i, (o, _) in enumerate(pods) if o in ("carbond", "carbond-gpu")
    }
    assert {"carbond", "carbond-gpu"} <= {o for o, _ in pods}
    for i, (owner, _) in enumerate(pods):
        if owner in ("carbond", "carbond-gpu"):
            t = by_address[f"10.1.0.{i}:{ports[owner]}"]
            assert t["host"] == t["instance"] == f"node-{i}"  # up{host=...} names the node carbond names itself
    assert job["honor_labels"] is True  # carbond's own host label stays on its series


def test_remote_write_forwards_carbond_series_and_their_up_only() -> None:
    (rw,) = AGENT["remote_write"]
    series = {
        "carbond_node_power_watts": ({"__name__": "carbond_node_power_watts", "job": "carbond"}, True),
        "carbond_build_info": ({"__name__": "carbond_build_info", "job": "carbond", "version": "0.1.0"}, True),
        "up of carbond": ({"__name__": "up", "job": "carbond", "host": "n1"}, True),
        "up of another job": ({"__name__": "up", "job": "kubelet"}, False),
        "scrape_duration_seconds": ({"__name__": "scrape_duration_seconds", "job": "carbond"}, False),
        "prometheus_tsdb_head_series": ({"__name__": "prometheus_tsdb_head_series", "job": "carbond"}, False),
    }
    for what, (labels, forwarded) in series.items():
        assert (relabel(labels, rw["write_relabel_configs"]) is not None) is forwarded, what


def test_the_agent_config_loads_in_prometheus_but_for_kubernetes_discovery(tmp_path: Path) -> None:
    """`promtool check config` on the shipped file with only its discovery swapped for a static target."""
    promtool = require_tool("promtool", "prometheus")
    cfg = copy.deepcopy(AGENT)
    (job,) = cfg["scrape_configs"]
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:9875"]}]
    (tmp_path / "agent.yml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [promtool, "check", "config", "--agent", str(tmp_path / "agent.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_fleet_health_alerts_under_promtool() -> None:
    promtool = require_tool("promtool", "prometheus")
    out = subprocess.run(
        [promtool, "test", "rules", "fleet.health.test.yml"], cwd=PROM, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
