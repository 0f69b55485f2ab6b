from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution.paths import identify

C = "0123456789abcdef" * 4
UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
U_ = UID.replace("-", "_")
H32 = "5c1b9a0e8f7d6c5b4a39281706f5e4d3"


@pytest.mark.parametrize(
    ("path", "unit", "pod_uid", "container_id"),
    [
        (
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/cri-containerd-{C}.scope",
            "",
            UID,
            C,
        ),
        (f"kubepods.slice/kubepods-pod{U_}.slice/crio-{C}.scope", "", UID, C),
        (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/crio-{C}.scope", "", UID, C),
        (f"kubepods/burstable/pod{UID}/{C}", "", UID, C),
        (f"kubepods/pod{UID}/{C}", "", UID, C),
        (f"kubepods/besteffort/pod{UID}/{C}", "", UID, C),
        (
            f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{U_}.slice/cri-containerd-{C}.scope",
            "",
            UID,
            C,
        ),
        (f"system.slice/docker-{C}.scope", f"docker-{C}.scope", "", C),
        (f"machine.slice/libpod-{C}.scope", f"libpod-{C}.scope", "", C),
        ("system.slice/ssh.service", "ssh.service", "", ""),
        (f"kubepods/burstable/pod{UID}/crio-{C}", "", UID, C),  # cri-o under the cgroupfs driver
        (f"docker/{C}", "", "", C),  # docker under the cgroupfs driver (v1 hosts)
        ("user.slice/user-1000.slice/user@1000.service", "user@1000.service", "", ""),
        ("user.slice/user-1000.slice/session-3.scope", "session-3.scope", "", ""),
        # static pods (etcd, kube-apiserver ...): the UID is the manifest's hash, 32 hex digits without dashes
        (
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{H32}.slice/cri-containerd-{C}.scope",
            "",
            H32,
            C,
        ),
        (f"kubepods.slice/kubepods-pod{H32}.slice/crio-{C}.scope", "", H32, C),
        (f"kubepods/burstable/pod{H32}/{C}", "", H32, C),
        # Slurm job steps (tests/slurm/test_paths.py has every layout): neither units nor containers
        ("slurm/uid_1000/job_42/step_0", "", "", ""),
        ("system.slice/slurmstepd.scope/job_42/step_batch", "", "", ""),
    ],
)
def test_path_shapes(path: str, unit: str, pod_uid: str, container_id: str) -> None:
    ident = identify(path)
    assert (ident.unit, ident.pod_uid, ident.container_id) == (unit, pod_uid, container_id)
    assert ident.is_workload
    assert ident.cgroup == path


@pytest.mark.parametrize(
    "path",
    [
        "kubepods.slice/kubepods-podnot_a_uid.slice",
        "kubepods/burstable/podXYZ/zz",
        "system.slice",
        "a/b/c",
        "kubepods.slice/kubepods-burstable.slice",
        f"kubepods.slice/kubepods-pod{U_}.slice",
        f"kubepods.slice/kubepods-pod{U_}.slice/crio-conmon-{C}.scope",  # cri-o's monitor, not a container
        f"kubepods/pod{UID}/{C[:-1]}",  # 63 hex digits
        "system.slice/slurmstepd.scope",  # a scope, but the one Slurm's jobs live in: walked through
    ],
)
def test_non_workloads_and_malformed_names(path: str) -> None:
    ident = identify(path)
    assert not ident.is_workload
    assert ident.container_id == ""


@given(st.lists(st.text(min_size=0, max_size=80), max_size=8))
def test_any_path_gives_an_identity(parts: list[str]) -> None:
    ident = identify("/".join(parts))
    assert ident.pod_uid == "" or (len(ident.pod_uid) in (32, 36) and "_" not in ident.pod_uid)
