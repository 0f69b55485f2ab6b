"""End to end, as the GPU DaemonSet runs: the real ``carbond run`` process on a fixture host whose
``/proc/<pid>/cgroup`` files read as they do from inside carbond's container, which has a cgroup namespace of its
own (cgroup v2 hosts). Every GPU process's path is relative to carbond's container cgroup
(``0::/../../../kubepods-burstable.slice/...``), carbond's own is ``0::/``, while the walked hierarchy is the
host's. The fake NVML names the processes on the A100, the fake API server names the pod: the pod's share of the GPU
must reach its series, with its names.

The daemon's pid is not in its container's ``cgroup.procs`` here (it is known only once it runs), so this takes the
suffix match; ``tests/attribution/test_cgroupns.py`` covers the namespace root found by pid through the monitor.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from carbond.testing.cgroupfs import write_pid_cgroup
from carbond.testing.fixture_host import (
    GPU_PIDS,
    GPUS,
    NODE,
    POD_CGROUP,
    POD_CONTAINER_ID,
    POD_UID,
    FixtureHost,
    ServedInThread,
)
from tests.harness.daemon import Daemon

pytestmark = pytest.mark.e2e

# carbond's own container: a best-effort pod, so the GPU pod (burstable) is three levels up, then down
CARBOND = (
    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7a7a7a7a_1b1b_2c2c_3d3d_4e4e4e4e4e4e.slice/"
    f"cri-containerd-{'e' * 64}.scope"
)

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def gpu_watts(metrics: Series) -> dict[str, tuple[float, dict[str, str]]]:
    """cgroup -> (its GPU power, its labels)."""
    out = {}
    for (name, labels), value in metrics.items():
        lab = dict(labels)
        if name == "carbond_cgroup_power_watts" and lab["kind"] == "gpu":
            out[lab["cgroup"]] = (value, lab)
    return out


@pytest.mark.parametrize("granularity", ["container", "pod"])
def test_a_pods_gpu_energy_reaches_its_series_from_inside_a_cgroup_namespace(tmp_path: Path, granularity: str) -> None:
    series = POD_CGROUP if granularity == "container" else POD_CGROUP.rpartition("/")[0]  # the pod's own cgroup
    host = FixtureHost(tmp_path / "host")
    host.cgroups.add(CARBOND, cpus=0.01, memory_bytes=64 << 20)
    for pid, cgroup in GPU_PIDS.items():
        if cgroup is not None:
            write_pid_cgroup(host.procfs, pid, cgroup, ns_root=CARBOND)
    write_pid_cgroup(host.procfs, "self", CARBOND, ns_root=CARBOND)
    shown = (host.procfs / "4242" / "cgroup").read_text()
    assert shown.startswith("0::/../../../kubepods-burstable.slice/"), shown
    a100 = GPUS[0]
    util = a100["processes"]
    pod_w = a100["power_w"] * util["4242"] / sum(util.values())
    with ServedInThread(host.kubernetes()) as kube, host.running():
        cfg = {
            "host_name": NODE,
            "measure_power_secs": 1,
            "sensors": ["rapl", "nvml"],
            "paths": host.paths(),
            "attribution": {
                "granularity": granularity,
                "kubernetes": {
                    "enabled": True,
                    "api_url": kube.url,
                    "node_name": NODE,
                    "token_file": str(host.kube_token),
                    "ca_file": None,
                },
            },
        }
        with Daemon(tmp_path, cfg, env=host.nvml_env()) as d:
            gpu = d.wait_for(
                lambda m: g if series in (g := gpu_watts(m)) and g[series][1]["pod_name"] else None,
                what=f"the pod's GPU series {series} with its pod name",
                show=gpu_watts,
            )
            log = d.log()
    watts, labels = gpu[series]
    assert watts == pytest.approx(pod_w, rel=0.05)
    names = (labels["pod_uid"], labels["pod_namespace"], labels["pod_name"])
    assert names == (POD_UID, "ml", "trainer-7d9f8b6c5-x2x4q")
    if granularity == "container":
        assert (labels["container_id"], labels["container_name"]) == (POD_CONTAINER_ID, "trainer")
    docker_w = a100["power_w"] * util["4343"] / sum(util.values())
    assert next(w for cg, (w, _) in gpu.items() if cg.startswith("system.slice/docker-")) == pytest.approx(
        docker_w, rel=0.05
    )
    assert '"event": "cgroup_namespace"' in log or '"event":"cgroup_namespace"' in log
