"""Workload identity from a cgroup path (pure): systemd units, containers, Kubernetes pods and containers.

Handles the systemd and cgroupfs drivers of the kubelet, every QoS class, kind's nested ``kubelet.slice``,
docker/containerd/cri-o/podman scopes. Pod UIDs always come out with dashes; a static pod's (the kubelet's
manifests: etcd, kube-apiserver ...) is the 32 hex digits of its config hash, which its mirror pod in the API
carries in the ``kubernetes.io/config.mirror`` annotation (:mod:`carbond.attribution.kubernetes`). Unknown or
malformed names give an identity without workload fields; they are never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX64 = r"[0-9a-f]{64}"
_CONTAINER = re.compile(rf"^(?:cri-containerd|crio|docker|libpod|containerd)-({_HEX64})(?:\.scope)?$|^({_HEX64})$")
_CGROUPFS_ENGINES = ("docker", "libpod_parent", "containerd")  # parents of bare-ID containers without systemd
_POD_SYSTEMD = re.compile(
    r"^(?:kubelet-)?kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod([0-9a-f_]{36}|[0-9a-f]{32})\.slice$"
)
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f-]{36}|[0-9a-f]{32})$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$|^[0-9a-f]{32}$")  # or a hash


@dataclass(frozen=True, slots=True)
class Identity:
    cgroup: str  # the path below the cgroup root, e.g. "system.slice/ssh.service"
    unit: str = ""
    pod_uid: str = ""
    container_id: str = ""

    @property
    def is_workload(self) -> bool:
        """A meaningful leaf: carbond attributes to it and does not descend further."""
        return bool(self.container_id or (self.unit and not self.pod_uid))


def identify(path: str) -> Identity:
    """Identity of the cgroup at ``path`` (relative to the cgroup root, '/'-separated)."""
    parts = [p for p in path.split("/") if p]
    unit = pod_uid = container_id = ""
    in_kube = False
    parent = ""
    for part in parts:
        above, parent = parent, part
        if part.startswith(("kubepods", "kubelet-kubepods")):
            in_kube = True
        m = _POD_SYSTEMD.match(part)
        if m:
            candidate = m.group(1).replace("_", "-")
            pod_uid = candidate if _UUID.match(candidate) else ""
            continue
        m = _POD_CGROUPFS.match(part)
        if m and in_kube and _UUID.match(m.group(1)):
            pod_uid = m.group(1)
            continue
        m = _CONTAINER.match(part)
        if m and (in_kube or part.endswith(".scope") or above in _CGROUPFS_ENGINES):
            container_id = m.group(1) or m.group(2)
            continue
        if part.endswith((".service", ".scope")) and not in_kube:
            unit = part
    if container_id and not in_kube:
        unit = parts[-1] if parts[-1].endswith(".scope") else unit
    return Identity("/".join(parts), unit, pod_uid, container_id)
