"""What a cluster does with the rendered manifests: installs side by side, node placement, the pod-security level
the pods need and why, the image setting, and a config change rolling the DaemonSets."""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_kubernetes import K8S, ROOT, config_map, kustomize, node_affinity_allows, of_kind, render
from tests.harness.tools import require_tool

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def install(
    namespace: str, prefix: str = "", own_namespace: bool = True, root: Path = K8S, components: list[str] | None = None
) -> list[dict[str, Any]]:
    """A user's kustomization as the README writes it, rendered."""
    kubectl = require_tool("kubectl", "kubectl")
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(root, tmp)
        k = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "namePrefix": prefix,
            "resources": [f"{rel}/base"],
            "transformers": [f"{rel}/cluster-names", f"{rel}/image"],
            "components": [
                f"{rel}/components/{c}" for c in (components or (["namespace"] if own_namespace else []) + ["gpu"])
            ],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(k))
        return list(kustomize(kubectl, Path(tmp)))


def key(d: dict[str, Any]) -> tuple[str, str, str]:
    return d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]


@pytest.mark.parametrize(
    ("first", "second"),
    [(("carbond", ""), ("energy-meter", "")), (("monitoring", ""), ("monitoring", "team-b-"))],
)
def test_two_installs_side_by_side_share_no_object(first: tuple[str, str], second: tuple[str, str]) -> None:
    """Another namespace, or another namePrefix in a shared namespace: no object of one install is also the
    other's (kubectl apply would take it over), and each binding grants its own role to its own account."""
    a, b = (install(ns, prefix, own_namespace=ns != "monitoring") for ns, prefix in (first, second))
    assert not {key(d) for d in a} & {key(d) for d in b}
    for docs, (ns, prefix) in ((a, first), (b, second)):
        (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
        (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
        assert role["metadata"]["name"] == f"{prefix}carbond:{ns}:pod-reader"
        assert binding["metadata"]["name"] == binding["roleRef"]["name"] == role["metadata"]["name"]
        (subject,) = binding["subjects"]
        assert (subject["name"], subject["namespace"]) == (f"{prefix}carbond", ns)


def test_a_shared_namespace_is_never_rendered() -> None:
    """Without components/namespace nothing renders a Namespace: apply does not relabel it, delete -k keeps it."""
    assert [d for d in install("monitoring", own_namespace=False) if d["kind"] == "Namespace"] == []
    (ns,) = [d for d in install("energy-meter") if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == "energy-meter"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def tolerates(tolerations: list[dict[str, str]], taint: dict[str, str]) -> bool:
    """The scheduler's (and the taint manager's) rule: a toleration matches a taint's key (empty key with Exists:
    every key), its value (Equal) and its effect (empty: every effect)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("operator", "Equal") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value") == taint.get("value"):
            return True
    return False


LINUX = {"kubernetes.io/os": "linux"}
GPU = {**LINUX, "nvidia.com/gpu.present": "true"}
NODES: dict[str, tuple[dict[str, str], list[dict[str, str]], str | None]] = {
    "linux": (LINUX, [], "carbond"),
    "windows": ({"kubernetes.io/os": "windows"}, [], None),
    "linux, NoSchedule taint": (LINUX, [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}], "carbond"),
    "linux, NoExecute taint": (LINUX, [{"key": "dedicated", "value": "batch", "effect": "NoExecute"}], "carbond"),
    "control plane": (LINUX, [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}], "carbond"),
    "gpu": (GPU, [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}], "carbond-gpu"),
    "gpu, NoExecute taint": (GPU, [{"key": "nvidia.com/gpu", "effect": "NoExecute"}], "carbond-gpu"),
}


@pytest.mark.parametrize("variant", ["overlays/default", "overlays/gpu"])
@pytest.mark.parametrize("node", sorted(NODES))
def test_placement(variant: str, node: str) -> None:
    """Every Linux node, tainted or not, runs exactly one carbond pod (carbond-gpu on GPU nodes when the gpu
    component is in); Windows nodes run none."""
    labels, taints, expected = NODES[node]
    if variant == "overlays/default" and expected == "carbond-gpu":
        expected = "carbond"
    on = []
    for ds in of_kind(variant, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        if node_affinity_allows(pod, labels) and all(tolerates(pod.get("tolerations", []), t) for t in taints):
            on.append(ds["metadata"]["name"])
    assert on == ([expected] if expected else [])


BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip


def baseline_violations(pod: dict[str, Any]) -> set[str]:
    """The Pod Security Standards' baseline checks (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    found = set()
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(ns):
            found.add(ns)
    found |= {f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v}
    psc = pod.get("securityContext", {})
    if psc.get("sysctls"):
        found.add("sysctls")
    for sc in (psc, *(c.get("securityContext", {}) for c in pod["containers"])):
        if sc.get("windowsOptions", {}).get("hostProcess"):
            found.add("hostProcess")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            found.add("seccomp Unconfined")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.add("AppArmor Unconfined")
        if sc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t", "container_init_t"):
            found.add("SELinux type")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            found.add("privileged")
        if set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES:
            found.add("capabilities")
        if sc.get("procMount", "Default") != "Default":
            found.add("procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.add("hostPort")
    return found


@pytest.mark.parametrize("variant", ["overlays/gpu", "renamed", "podmonitor"])
def test_only_host_paths_and_host_pid_need_the_privileged_level(variant: str) -> None:
    """Checked at render time: below `privileged`, only the hostPath volumes (and the GPU pods' hostPID) would be
    refused; the pods would pass the baseline level otherwise."""
    for ds in of_kind(variant, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        paths = {f"hostPath volume {v}" for v in ("sys", "proc", "cgroup", "state")}
        allowed = paths | ({"hostPID"} if ds["metadata"]["name"] == "carbond-gpu" else set())
        assert baseline_violations(pod) == allowed
    violating = {"spec": {"hostNetwork": True, "containers": [{"securityContext": {"privileged": True}}]}}
    assert baseline_violations(violating["spec"]) == {"hostNetwork", "privileged"}  # the checker can fail


def test_the_image_is_one_setting() -> None:
    """The base names the image `carbond` only; the image transformer (or the user's `images:`) sets it, the same
    in both DaemonSets, and its tag is the package's version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    setting = yaml.safe_load((K8S / "image" / "image.yaml").read_text())["imageTag"]
    assert setting["newTag"] == version
    assert {
        c["image"] for ds in of_kind("base", "DaemonSet") for c in ds["spec"]["template"]["spec"]["containers"]
    } == {"carbond"}
    for variant, expected in (
        ("overlays/gpu", f"{setting['newName']}:{version}"),
        ("overlays/kube-prometheus-stack", f"{setting['newName']}:{version}"),
        ("renamed", "registry.example/carbond:0.1.0"),
    ):
        images = {
            c["image"] for ds in of_kind(variant, "DaemonSet") for c in ds["spec"]["template"]["spec"]["containers"]
        }
        assert images == {expected}, variant


def test_a_config_change_rolls_the_daemonset(tmp_path: Path) -> None:
    """The ConfigMap's name carries a hash of its content, and so does the DaemonSet's pod template: a changed
    config changes the template (a rollout), an unchanged one leaves it alone."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    config = copy / "base" / "agent" / "config.yaml"
    config.write_text(config.read_text().replace("pue: 1.0", "pue: 1.2"))
    before = {ds["metadata"]["name"]: ds["spec"]["template"] for ds in of_kind("overlays/gpu", "DaemonSet")}
    kubectl = require_tool("kubectl", "kubectl")
    after_docs = kustomize(kubectl, copy / "overlays" / "gpu")
    after = {d["metadata"]["name"]: d["spec"]["template"] for d in after_docs if d["kind"] == "DaemonSet"}
    assert after["carbond"] != before["carbond"]  # the base config changed: carbond rolls
    assert after["carbond-gpu"] == before["carbond-gpu"]  # the GPU config did not
    names = {d["metadata"]["name"] for d in after_docs if d["kind"] == "ConfigMap"}
    assert config_map("overlays/gpu", "carbond-config")["metadata"]["name"] not in names


def test_no_runtime_class_unless_asked() -> None:
    """A RuntimeClass that does not exist gets every pod rejected: only components/nvidia-runtimeclass sets one."""
    for variant in ("overlays/gpu", "overlays/kube-prometheus-stack", "renamed"):
        assert all("runtimeClassName" not in ds["spec"]["template"]["spec"] for ds in of_kind(variant, "DaemonSet"))
    (gpu,) = [ds for ds in of_kind("podmonitor", "DaemonSet") if ds["metadata"]["name"] == "carbond-gpu"]
    assert gpu["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert [render("podmonitor")]  # the render with the component passed strict validation (test_kubernetes.py)
