"""Every kustomize variant rendered with kubectl and validated strictly, offline: the core objects against the
Kubernetes schemas, the prometheus-operator objects against the fields of their CRDs (unknown fields rejected) and
promtool; then what makes a variant work in a cluster: one namespace throughout, discovery that finds both
DaemonSets, every node covered once in a mixed CPU/GPU cluster, and the GPU DaemonSet lacking nothing of the base.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from carbond.attribution.kubernetes import endpoint
from tests.deploy.crd_schemas import CRD_SCHEMAS
from tests.harness.tools import require_tool

ROOT = Path(__file__).parent.parent.parent
K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"
OVERLAYS = ["overlays/default", "overlays/gpu", "overlays/kube-prometheus-stack"]
# Variants made here as a user would: another namespace, every component (GPU first, as the README says); "renamed"
# has a namespace of its own (components/namespace), "podmonitor" shares one that exists already.
CUSTOM = {
    "renamed": (
        "energy-meter",
        ["namespace", "gpu", "servicemonitor", "kube-prometheus-stack", "networkpolicy", "priority-class"],
    ),
    "podmonitor": ("observability", ["gpu", "podmonitor", "kube-prometheus-stack", "nvidia-runtimeclass"]),
}
IMAGE = {"name": "carbond", "newName": "registry.example/carbond", "newTag": "0.1.0"}
VARIANTS = ["base", *OVERLAYS, *CUSTOM]
DEPLOYABLE = [*OVERLAYS, *CUSTOM]
CRDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
GPU_LABEL = "nvidia.com/gpu.present"


def kustomize(kubectl: str, target: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    kubectl = require_tool("kubectl", "kubectl")
    if variant not in CUSTOM:
        return kustomize(kubectl, K8S / variant)
    namespace, components = CUSTOM[variant]
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)  # kustomize takes relative paths only
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": [f"{rel}/base"],
            "transformers": [f"{rel}/cluster-names"],
            "components": [f"{rel}/components/{c}" for c in components],
            "images": [IMAGE],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(kubectl, Path(tmp))


def of_kind(variant: str, kind: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for d in render(variant) if d["kind"] == kind]


def one(variant: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(variant, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (variant, kind, name)
    return found[0]


def config_map(variant: str, name: str) -> dict[str, Any]:
    """The generated ConfigMap ``name`` (kustomize suffixes a hash of its content: ``name-<10 characters>``)."""
    (found,) = [d for d in of_kind(variant, "ConfigMap") if d["metadata"]["name"].rpartition("-")[0] == name]
    return found


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_strictly(variant: str, tmp_path: Path) -> None:
    docs = render(variant)
    kinds = [d["kind"] for d in docs]
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} <= set(kinds)
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)
    for doc in docs:
        if doc["kind"] in CRDS:
            if variant != "base":
                jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for i, rule in enumerate(d for d in docs if d["kind"] == "PrometheusRule"):
        groups = tmp_path / f"rules-{i}.yml"
        groups.write_text(yaml.safe_dump(rule["spec"]))
        promtool = require_tool("promtool", "prometheus")
        out = subprocess.run([promtool, "check", "rules", str(groups)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_base_is_for_overlays_and_needs_no_crd() -> None:
    """No namespace in the base (an overlay's `namespace:` sets it everywhere) and no prometheus-operator CRD, so
    that overlays/default applies to any cluster."""
    docs = render("base")
    assert not [d for d in docs if d["metadata"].get("namespace")]
    assert not [d for d in docs if d["kind"] in CRDS]
    assert not [d for d in render("overlays/default") if d["kind"] in CRDS]


@pytest.mark.parametrize("variant", DEPLOYABLE)
def test_one_namespace_throughout(variant: str) -> None:
    docs = render(variant)
    ns = CUSTOM[variant][0] if variant in CUSTOM else "carbond"
    own = variant not in CUSTOM or "namespace" in CUSTOM[variant][1]  # the shipped overlays have their own
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ([ns] if own else [])
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == ns, (d["kind"], d["metadata"])
    (subject,) = one(variant, "ClusterRoleBinding")["subjects"]
    assert (subject["kind"], subject["name"], subject["namespace"]) == ("ServiceAccount", "carbond", ns)
    for ds in of_kind(variant, "DaemonSet"):
        assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "carbond"
    for monitor in of_kind(variant, "ServiceMonitor") + of_kind(variant, "PodMonitor"):
        assert monitor["spec"].get("namespaceSelector", {}).get("matchNames", [ns]) == [ns]


@pytest.mark.parametrize("variant", DEPLOYABLE)
def test_discovery_finds_every_daemonset(variant: str) -> None:
    pods = [ds["spec"]["template"] for ds in of_kind(variant, "DaemonSet")]
    ports = [{p["name"]: p["containerPort"] for c in t["spec"]["containers"] for p in c["ports"]} for t in pods]
    svc = one(variant, "Service")
    assert all(matches(svc["spec"]["selector"], t["metadata"]["labels"]) for t in pods)
    for sm in of_kind(variant, "ServiceMonitor"):
        assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    for pm in of_kind(variant, "PodMonitor"):
        assert all(matches(pm["spec"]["selector"]["matchLabels"], t["metadata"]["labels"]) for t in pods)
        assert all({e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= set(p) for p in ports)
    annotated = [t["metadata"].get("annotations", {}) for t in pods]
    if any(annotated):
        for a, p in zip(annotated, ports, strict=True):
            assert a["prometheus.io/scrape"] == "true"
            assert int(a["prometheus.io/port"]) == p["metrics"]
    mechanisms = [any(annotated), bool(of_kind(variant, "ServiceMonitor")), bool(of_kind(variant, "PodMonitor"))]
    assert mechanisms.count(True) == 1, "nothing would scrape carbond, or it would be scraped twice"


READ_ONLY = {"get", "list", "watch"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_cluster_role_grants_what_carbond_requests_and_only_reads(variant: str) -> None:
    """Every request the API-server source makes (this node's pods; namespaces, for attribution.labels.namespaces)
    is a `list` the ClusterRole grants; the role grants nothing but reads of pods and namespaces."""
    ep = endpoint("apiserver", "node-1", api_url="https://10.0.0.1:6443")
    wanted = {("list", urlsplit(url).path.rsplit("/", 1)[1]) for url in (ep.url, ep.namespaces_url)}
    assert wanted == {("list", "pods"), ("list", "namespaces")}
    granted = set()
    for rule in one(variant, "ClusterRole")["rules"]:
        assert rule["apiGroups"] == [""]
        assert "nonResourceURLs" not in rule
        assert "resourceNames" not in rule
        assert set(rule["verbs"]) <= READ_ONLY, rule
        granted |= {(verb, res) for verb in rule["verbs"] for res in rule["resources"]}
    assert wanted <= granted
    assert {res for _, res in granted} == {"pods", "namespaces"}


def node_affinity_allows(pod: dict[str, Any], node_labels: dict[str, str]) -> bool:
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not matches(pod.get("nodeSelector", {}), node_labels):
        return False
    if required is None:
        return True
    ops = {
        "In": lambda key, values: node_labels.get(key) in values,
        "NotIn": lambda key, values: node_labels.get(key) not in values,
        "Exists": lambda key, values: key in node_labels,
        "DoesNotExist": lambda key, values: key not in node_labels,
    }
    return any(
        all(ops[e["operator"]](e["key"], e.get("values", [])) for e in term["matchExpressions"])
        for term in required["nodeSelectorTerms"]
    )


LINUX = {"kubernetes.io/os": "linux"}  # the kubelet labels every node with its OS
NODES = [LINUX, {**LINUX, GPU_LABEL: "true"}, {**LINUX, GPU_LABEL: "false"}]


@pytest.mark.parametrize("variant", DEPLOYABLE)
def test_every_node_is_measured_once(variant: str) -> None:
    daemonsets = of_kind(variant, "DaemonSet")
    for labels in NODES:
        on = [
            ds["metadata"]["name"] for ds in daemonsets if node_affinity_allows(ds["spec"]["template"]["spec"], labels)
        ]
        assert len(on) == 1, (labels, on)
    for a in daemonsets:  # no DaemonSet's selector takes the other's pods
        for b in daemonsets:
            if a is not b:
                assert not matches(a["spec"]["selector"]["matchLabels"], b["spec"]["template"]["metadata"]["labels"])


GPU_VARIANTS = ["overlays/gpu", "overlays/kube-prometheus-stack", *CUSTOM]


def without_gpu_parts(ds: dict[str, Any]) -> dict[str, Any]:
    """A DaemonSet with what only GPU nodes need taken out, and its name-dependent parts blanked."""
    ds = copy.deepcopy(ds)
    ds["metadata"]["name"] = "-"
    for labels in (
        ds["metadata"]["labels"],
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"],
    ):
        labels.pop("app.kubernetes.io/component", None)
    pod = ds["spec"]["template"]["spec"]
    for key in ("hostPID", "runtimeClassName", "affinity"):
        pod.pop(key, None)
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "nvidia-devices-all"]
    for v in pod["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = "-"
    (c,) = pod["containers"]
    c["env"] = [e for e in c["env"] if not e["name"].startswith("NVIDIA_")]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "nvidia-devices-all"]
    return ds


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gpu_daemonset_has_everything_the_base_has(variant: str) -> None:
    base, gpu = one(variant, "DaemonSet", "carbond"), one(variant, "DaemonSet", "carbond-gpu")
    assert without_gpu_parts(gpu) == without_gpu_parts(base)
    pod = gpu["spec"]["template"]["spec"]
    assert pod.get("runtimeClassName") == (
        "nvidia" if "nvidia-runtimeclass" in CUSTOM.get(variant, ("", []))[1] else None
    )
    assert pod["hostPID"] is True
    assert not base["spec"]["template"]["spec"].get("hostPID")
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/var/run/nvidia-container-devices/all" in mounts  # for runtimes that ignore the variable
    assert "nvidia.com/gpu" not in str(c["resources"])  # never takes a GPU away from workloads
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map(variant, "carbond-config-gpu")["metadata"]["name"]
    base_cfg = yaml.safe_load(config_map(variant, "carbond-config")["data"]["config.yaml"])
    gpu_cfg = yaml.safe_load(config_map(variant, "carbond-config-gpu")["data"]["config.yaml"])
    assert gpu_cfg["sensors"] == ["rapl", "nvml", "tdp", "ram"]
    assert {**gpu_cfg, "sensors": base_cfg["sensors"]} == base_cfg  # pod names and the rest, as on CPU nodes


@pytest.mark.parametrize("variant", DEPLOYABLE)
def test_daemonsets_least_privilege(variant: str) -> None:
    for ds in of_kind(variant, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork")
        assert not pod.get("hostIPC")
        assert pod.get("hostPID", False) is (ds["metadata"]["name"] == "carbond-gpu")
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["privileged"] is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for host in ("/host/sys", "/host/proc", "/host/sys/fs/cgroup"):
            assert mounts[host]["readOnly"] is True
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["tolerations"] == [{"operator": "Exists"}]  # every taint (placement: test_kubernetes_installs.py)
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("variant", DEPLOYABLE)
def test_priority_class_comes_with_its_quota(variant: str) -> None:
    classes = {ds["spec"]["template"]["spec"].get("priorityClassName") for ds in of_kind(variant, "DaemonSet")}
    quotas = of_kind(variant, "ResourceQuota")
    if classes == {None}:
        assert quotas == []
        return
    assert classes == {"system-node-critical"}  # both DaemonSets, or the GPU nodes would lose it
    (quota,) = quotas
    (expr,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert (expr["scopeName"], expr["operator"], expr["values"]) == ("PriorityClass", "In", ["system-node-critical"])


@pytest.mark.parametrize("variant", ["overlays/kube-prometheus-stack", *CUSTOM])
def test_kube_prometheus_stack_finds_monitors_rules_and_dashboard(variant: str) -> None:
    for kind in CRDS:
        for obj in of_kind(variant, kind):
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    rule = one(variant, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "carbond.rules.yml").read_text())
    dash = one(variant, "ConfigMap", "carbond-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["data"]["carbond.json"] == (ROOT / "grafana" / "carbond.json").read_text()


def test_networkpolicy_is_optional_and_admits_prometheus() -> None:
    assert of_kind("overlays/default", "NetworkPolicy") == []
    (policy,) = of_kind("renamed", "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 9875}]


@pytest.mark.parametrize("name", ["carbond-config", "carbond-config-gpu"])
def test_configmap_config_passes_check_config(tmp_path: Path, name: str) -> None:
    text = config_map("overlays/gpu", name)["data"]["config.yaml"]
    p = tmp_path / "config.yaml"
    p.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "carbond", "check-config", str(p)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(text)
    assert cfg["paths"]["sysfs"] == "/host/sys"
    assert cfg["attribution"]["kubernetes"]["enabled"] is True
    assert cfg["listen_address"].endswith(":9875")  # the containerPort the probes and scrapers use
