"""The cardinality budget: series per node and scrape size at 10 / 100 / 1,000 cgroups, for each
``attribution.granularity``, with the default ``max_cgroups`` (200) and with every cgroup kept.

The node is a Kubernetes node as a fleet has them: nine workloads in ten are containers, two per pod (an app and
a sidecar), their pods spread over up to 10 namespaces (one team per namespace and three projects in each, copied
from pod labels: at namespace granularity the series follow the distinct namespace/team/project sets), the rest
systemd services; one CPU package and one DRAM domain are measured (kinds cpu and dram). The
figures come from the real scrape path (:class:`carbond.exporter.server.MetricsCache`) after a few ticks, in
process; ``python -m bench.cardinality`` prints them alone.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import sys
import time
from pathlib import Path

from carbond.attribution.attributor import MAX_CGROUPS, Attributor
from carbond.attribution.kubernetes import PodDirectory, PodNames, endpoint
from carbond.attribution.labels import LabelPolicy
from carbond.exporter.server import MetricsCache
from carbond.intensity import FixedIntensity
from carbond.model import Intensity
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree

SIZES = (10, 100, 1000)
GRANULARITIES = ("container", "pod", "namespace")
NAMESPACES = 10
FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)
POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{c}.scope"


def node(n: int) -> tuple[list[str], dict[str, PodNames]]:
    """``n`` workload cgroup paths (containers two per pod, one in ten a systemd service) and the pods' names."""
    paths: list[str] = []
    pods: dict[str, PodNames] = {}
    services = max(1, n // 10)
    for i in range(services):
        paths.append(f"system.slice/svc-{i}.service")
    for c in range(n - services):
        p = c // 2
        uid = f"{p:08x}-0000-4000-8000-{p:012x}"
        cid = f"{c:064x}"
        paths.append(POD.format(u=uid.replace("-", "_"), c=cid))
        ns = f"ns-{p % NAMESPACES}"
        pod = pods.get(uid) or PodNames(
            ns, f"app-{p}-0", {}, {"team": f"team-{p % NAMESPACES}", "project": f"{ns}-p{p % 3}"}
        )
        pod.containers[cid] = "app" if c % 2 == 0 else "sidecar"
        pods[uid] = pod
    return paths, pods


async def node_scrape(root: Path, n: int, granularity: str, max_cgroups: int) -> tuple[int, int, int, int]:
    """(series, of which cgroup series, text bytes, gzip bytes) of one node's scrape."""
    clock = ManualClock()
    proc = ProcTree(root / "proc")
    tree = CgroupTree(root / "cg")
    paths, pods = node(n)
    for path in paths:
        tree.add(path, cpus=0.001, memory_bytes=1 << 24, write=False)
    tree.advance(0)
    directory = PodDirectory(endpoint("apiserver", "bench", api_url="http://127.0.0.1:1", token_file=None))
    directory.load(pods)
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 80.0), FakeDevice("dram-0", "dram", 8.0)], clock)
    await sensor.start()
    att = Attributor(
        root / "cg", root / "proc", max_cgroups=max_cgroups, clock=clock, pods=directory,
        granularity=granularity, policy=LabelPolicy(),  # type: ignore[arg-type]
    )  # fmt: skip
    mon = Monitor(
        [sensor], host="bench-node-0001", interval_s=15.0, pue=1.2, intensity=FixedIntensity(FR),
        sensor_timeout_s=5.0, clock=clock, attributor=att, host_reader=HostReader(root / "proc"),
    )  # fmt: skip
    for _ in range(4):
        clock.advance(15.0)
        proc.advance(15.0, 0.5)
        tree.advance(15.0)
        await mon.tick()
    att.close()
    cache = MetricsCache(mon.latest)
    text, zipped = cache.body(False, False), cache.body(False, True)
    assert text is not None
    assert zipped is not None
    lines = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    cgroup = sum(1 for line in lines if line.startswith("carbond_cgroup_"))
    assert gzip.decompress(zipped) == text
    return len(lines), cgroup, len(text), len(zipped)


def series_budget(workdir: Path) -> dict[str, float | str]:
    """Per size and granularity: series per node and scrape size, with the default max_cgroups and without cap."""
    out: dict[str, float | str] = {}
    t0 = time.monotonic()
    runs = [(f"max_cgroups {MAX_CGROUPS} (default)", MAX_CGROUPS, n) for n in SIZES]
    runs.append(("every cgroup kept", 100_000, SIZES[-1]))  # below the cap both are the same
    for (cap_label, cap, n), g in itertools.product(runs, GRANULARITIES):
        series, cgroup, text, zipped = asyncio.run(node_scrape(workdir / f"{cap}-{n}-{g}", n, g, cap))
        out[f"{n} cgroups, {g}, {cap_label}"] = (
            f"{series} series ({cgroup} cgroup), {text / 1024:.1f} KiB text, {zipped / 1024:.1f} KiB gzip"
        )
    out["measured in (s)"] = time.monotonic() - t0
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for k, v in series_budget(Path(tmp)).items():
            print(f"{k}: {v}" if isinstance(v, str) else f"{k}: {v:.1f}")
    sys.exit(0)
