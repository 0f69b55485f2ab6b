"""Workload identity from a cgroup path (pure): systemd units, containers, Kubernetes pods and containers, Slurm
job steps.

Handles the systemd and cgroupfs drivers of the kubelet, every QoS class, kind's nested ``kubelet.slice``,
docker/containerd/cri-o/podman scopes. Pod UIDs always come out with dashes; a static pod's (the kubelet's
manifests: etcd, kube-apiserver ...) is the 32 hex digits of its config hash, which its mirror pod in the API
carries in the ``kubernetes.io/config.mirror`` annotation (:mod:`carbond.attribution.kubernetes`). Unknown or
malformed names give an identity without workload fields; they are never an error.

Slurm (its cgroup/v1 and cgroup/v2 plugins, 20.11 to 24.x): the workload is the job step, ``job_<id>/step_<n>``
(``n`` a number, ``batch``, ``extern`` or ``interactive``); everything below a step (its tasks, and on v2 its
``slurm`` directory holding the step's slurmstepd) folds into it, as a container's children do.

- v1, relative to a controller's mount: ``slurm[_<node>]/uid_<uid>/job_<id>/step_<n>[/task_<k>]`` (the node
  suffix when slurmd is built with ``--enable-multiple-slurmd``); the job owner's uid comes from the path.
- v2: ``<slice>/[<node>_]slurmstepd.scope/job_<id>/step_<n>/{slurm,user/task_<k>,user/task_special}``, the slice
  ``system.slice`` unless cgroup.conf's ``CgroupSlice`` moves it. slurmd creates the same tree with a plain
  ``mkdir`` under ``IgnoreSystemd=yes``. The scope's other children, ``system`` (the ``slurmstepd infinity``
  process and steps not yet placed) and ``slurmd`` (slurmd itself, when started outside systemd), are workloads
  named by the scope as a systemd scope is. The owner's uid is not in the path (the directories are root's), so
  ``slurm_uid`` stays empty: the user comes from the Prolog's spool metadata (:mod:`carbond.slurm.spool`).

A job's own directory (``job_<id>``) carries the job id but is not a workload: its steps are.
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
_SLURM_V1 = re.compile(r"^slurm(?:_[A-Za-z0-9][-A-Za-z0-9._]*)?$")
_SLURM_UID = re.compile(r"^uid_([0-9]{1,10})$")
_SLURM_SCOPE = re.compile(r"^(?:[A-Za-z0-9][-A-Za-z0-9._]*_)?slurmstepd\.scope$")
_SLURM_JOB = re.compile(r"^job_([0-9]{1,20})$")
_SLURM_STEP = re.compile(r"^step_([0-9]{1,10}|batch|extern|interactive)$")


@dataclass(frozen=True, slots=True)
class Identity:
    cgroup: str  # the path below the cgroup root, e.g. "system.slice/ssh.service"
    unit: str = ""
    pod_uid: str = ""
    container_id: str = ""
    slurm_job_id: str = ""
    slurm_step: str = ""  # "0", "1" ..., "batch", "extern", "interactive"; "" for the job's own directory
    slurm_uid: str = ""  # the job owner's uid where the path says it (cgroup v1)

    @property
    def is_workload(self) -> bool:
        """A meaningful leaf: carbond attributes to it and does not descend further."""
        return bool(self.container_id or self.slurm_step or (self.unit and not self.pod_uid))


def _slurm(parts: list[str]) -> Identity | None:
    """The identity of a path in Slurm's tree (a job, a step or below, the v2 scope and its daemons), None for any
    other path."""
    for i, part in enumerate(parts):
        if _SLURM_SCOPE.match(part):  # v2
            below = parts[i + 1 : i + 3]
            path = "/".join(parts)
            if not below:
                return Identity(path)  # the scope itself: descended into, never a workload
            job = _SLURM_JOB.match(below[0])
            if job is None:
                return Identity(path, unit=part)  # "system", "slurmd": Slurm's own daemons
            step = _SLURM_STEP.match(below[1]) if len(below) > 1 else None
            return Identity(path, slurm_job_id=job.group(1), slurm_step=step.group(1) if step else "")
        if _SLURM_V1.match(part):
            below = parts[i + 1 : i + 4]
            uid = _SLURM_UID.match(below[0]) if below else None
            job = _SLURM_JOB.match(below[1]) if uid and len(below) > 1 else None
            if uid is None or job is None:
                continue  # a unit or directory merely named "slurm..."
            step = _SLURM_STEP.match(below[2]) if len(below) > 2 else None
            return Identity("/".join(parts), slurm_job_id=job.group(1), slurm_step=step.group(1) if step else "",
                            slurm_uid=uid.group(1))  # fmt: skip
    return None


def job_cgroup(ident: Identity) -> str:
    """The cgroup of a Slurm identity's job (``.../job_<id>``); its own cgroup for any other identity."""
    if not ident.slurm_job_id:
        return ident.cgroup
    head, sep, _ = ident.cgroup.partition(f"/job_{ident.slurm_job_id}/")
    return head + sep[:-1] if sep else ident.cgroup


def identify(path: str) -> Identity:
    """Identity of the cgroup at ``path`` (relative to the cgroup root, '/'-separated)."""
    parts = [p for p in path.split("/") if p]
    if (slurm := _slurm(parts)) is not None:
        return slurm
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
