"""Attribution at scale: tick cost and daemon figures at 100 / 1,000 / 5,000 cgroups, 100 concurrent scrapers,
and a churn soak (cgroups appearing and vanishing every tick) watching resident memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format

from bench.process import LATENCY_WINDOW_S, cpu_seconds, latency
from carbond.accounting import TickEnergy
from carbond.attribution.attributor import Attributor
from carbond.exporter.collector import SnapshotCollector
from carbond.exporter.server import MetricsCache
from carbond.intensity import FixedIntensity
from carbond.model import Intensity
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree, CgroupWriter
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon

FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)
POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{c}.scope"

#: One tick of energy for the bench's attribution-only figures: 80 J of CPU, 8 J of DRAM.
TICK = TickEnergy(88.0, 0.0, {"cpu": 80.0, "dram": 8.0}, {})


def workload_paths(n: int) -> list[str]:
    """``n`` workloads: half Kubernetes containers, half systemd services."""
    return [
        POD.format(u=f"{i:08x}_0000_4000_8000_{i:012x}", c=f"{i:064x}") if i % 2 else f"system.slice/svc-{i}.service"
        for i in range(n)
    ]


def populate(tree: CgroupTree, n: int) -> None:
    """``n`` workloads, all busy."""
    for path in workload_paths(n):
        tree.add(path, cpus=0.001, memory_bytes=1 << 24, write=False)
    tree.advance(0)


async def _ticks(root: Path, n: int, ticks: int, profile: bool) -> tuple[list[float], str, dict[str, float]]:
    proc = ProcTree(root / "proc")
    tree = CgroupTree(root / "cg")
    populate(tree, n)
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 80.0), FakeDevice("dram-0", "dram", 8.0)], time.monotonic)
    await sensor.start()
    att = Attributor(root / "cg", root / "proc", max_cgroups=max(n, 200))
    host = HostReader(root / "proc")
    mon = Monitor(
        [sensor], host="bench", interval_s=1.0, pue=1.2, intensity=FixedIntensity(FR), sensor_timeout_s=5.0,
        attributor=att, host_reader=host,
    )  # fmt: skip
    await mon.tick()
    samples: list[float] = []
    for _ in range(ticks):
        tree.advance(1.0)
        proc.advance(1.0, 0.5)
        t0 = time.process_time()
        await mon.tick()
        samples.append(time.process_time() - t0)

    def advance() -> None:
        tree.advance(1.0)
        proc.advance(1.0, 0.5)

    renders = await render_costs(mon, advance)
    top = ""
    if profile:
        prof = cProfile.Profile()  # the attribution work itself, profiled where it runs (a worker thread at this size)
        for _ in range(3):
            tree.advance(1.0)
            proc.advance(1.0, 0.5)
            prof.enable()
            att.account(att.sample(host.sample()), TICK, 1.2, 56.0)
            prof.disable()
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
        total = sum(v[2] for _, v in rows)
        top = ", ".join(f"{fn[2]} ({v[2] / total * 100:.0f} %)" for fn, v in rows[:4])
    return samples, top, renders


async def render_costs(mon: Monitor, advance: Callable[[], None], repeats: int = 5) -> dict[str, float]:
    """CPU ms of the first scrapes' work after a tick (render, gzip, OpenMetrics), and of prometheus_client
    rendering all the families alone (the way before the cgroup families got their own renderer)."""
    cache = MetricsCache(mon.latest)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(mon.latest))
    cache.body(False, False)
    calls: dict[str, Callable[[], object]] = {
        "text": lambda: cache.body(False, False),
        "gzip": lambda: cache.body(False, True),
        "OpenMetrics": lambda: cache.body(True, False),
        "text, prometheus_client alone": lambda: text_format.generate_latest(registry),
    }
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        advance()
        await mon.tick()  # a new snapshot: the cache renders again, the kept labels stay
        for label, call in calls.items():
            t0 = time.process_time()
            call()
            times[label].append(time.process_time() - t0)
    return {label: statistics.median(v) * 1000 for label, v in times.items()}


def syscall_floor_ms(root: Path, repeats: int = 10) -> float:
    """CPU ms of the bare system calls one tick needs on this tree: scandir of every directory walked, and one
    open/read/close of each workload's cpu.stat and memory.current. What Python adds is the tick minus this."""
    from carbond.attribution.cgroupfs import CgroupReader

    reader = CgroupReader(root)
    workloads = reader.workloads()
    files = [f"{root}/{w.cgroup}/{name}" for w in workloads for name in ("cpu.stat", "memory.current")]
    dirs = {str(root)} | {f"{root}/{w.cgroup.rpartition('/')[0]}" for w in workloads}
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        for d in dirs:
            with os.scandir(d) as it:
                for _e in it:
                    pass
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)
        samples.append(time.process_time() - t0)
    return statistics.median(samples) * 1000


def tick_costs(
    workdir: Path, sizes: tuple[int, ...] = (100, 1000, 5000), ticks: int = 20, runs: int = 3
) -> dict[str, float | str]:
    """Per size, the median over ``runs`` runs (each on a tree of its own) of each run's median tick: a burst of
    load from elsewhere on a shared machine moves one run, not the figure."""
    out: dict[str, float | str] = {}
    for n in sizes:
        medians = []
        for r in range(runs):
            samples, _, renders = asyncio.run(_ticks(workdir / f"t{n}-{r}", n, ticks, profile=False))
            medians.append(statistics.median(samples) * 1000)
        out[f"tick CPU ms, {n} cgroups"] = statistics.median(medians)
        out[f"  each run's median, {n} cgroups"] = " / ".join(f"{m:.1f}" for m in medians)
        out[f"  of which bare system calls (floor), {n} cgroups"] = syscall_floor_ms(workdir / f"t{n}-0" / "cg")
        for label, ms in renders.items():
            out[f"first scrape after a tick, render ms, {label}, {n} cgroups"] = ms
    _, top, _ = asyncio.run(_ticks(workdir / "prof", sizes[-1], 5, profile=True))
    out[f"what dominates at {sizes[-1]} (self time)"] = top
    return out


def kernfs_tick_costs(sizes: tuple[int, ...] = (100, 1000, 5000), ticks: int = 20) -> dict[str, float]:
    """Tick cost on this host's real cgroupfs (kernfs), counter files kept open and re-read with pread, beside the
    same ticks with no descriptor kept (open/read/close). The workloads are empty cgroups made in a scratch cgroup
    of a writable cgroup2 mount (root only) and removed afterwards; their CPU time does not advance, so this
    measures the walk and the reads more than the split. Where the mount offers no memory controller (a hybrid
    host), memory.current is missing and each tick's failed opens of it are part of the figure. Empty where no
    cgroup can be made."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if " cgroup2 " in line]
    out: dict[str, float] = {}
    for n in sizes:
        scratch = Path(mounts[0] if mounts else "/nonexistent") / f"carbond-bench-{os.getpid()}"
        try:
            scratch.mkdir()
        except OSError:
            return out
        try:
            enabled: set[Path] = set()
            for path in workload_paths(n):
                d = scratch
                for part in path.split("/"):
                    if d not in enabled:  # memory.current below, where the host's hierarchy offers the controller
                        enabled.add(d)
                        with contextlib.suppress(OSError):
                            (d / "cgroup.subtree_control").write_text("+memory\n")
                    d = d / part
                    d.mkdir(exist_ok=True)
            for label, max_fds in (("kept descriptors", None), ("open/read/close", 0)):
                att = Attributor(scratch, Path("/proc"), max_cgroups=max(n, 200), max_fds=max_fds)
                reader = HostReader(Path("/proc"))
                samples = []
                for _ in range(ticks + 1):
                    t0 = time.process_time()
                    att.account(att.sample(reader.sample()), TICK, 1.2, 56.0)
                    samples.append(time.process_time() - t0)
                    time.sleep(0.02)
                att.close()
                out[f"kernfs tick CPU ms, {n} cgroups, {label}"] = statistics.median(samples[1:]) * 1000
        finally:
            for d in sorted((p for p in scratch.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            scratch.rmdir()
    return out


def _config(root: Path, n: int) -> dict[str, object]:
    return {
        "measure_power_secs": 1,
        "sensors": ["fake"],
        "fake": {"devices": [{"device": "package-0", "kind": "cpu", "watts": 80.0}]},
        "paths": {"procfs": str(root / "proc"), "cgroupfs": str(root / "cg")},
        "attribution": {"max_cgroups": n},
    }


def daemon_figures(
    workdir: Path, sizes: tuple[int, ...] = (100, 1000, 5000), settle_s: float = 10.0
) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in sizes:
        root = workdir / f"d{n}"
        proc = ProcTree(root / "proc")
        tree = CgroupTree(root / "cg")
        populate(tree, n)
        with CgroupWriter(tree, proc, busy=0.5, period_s=1.0), Daemon(root, _config(root, n)) as d:
            assert d.proc is not None
            p = psutil.Process(d.proc.pid)
            time.sleep(settle_s)
            c0 = cpu_seconds(d.proc.pid)
            time.sleep(settle_s)
            out[f"{n} cgroups: CPU s per minute"] = (cpu_seconds(d.proc.pid) - c0) / settle_s * 60
            out[f"{n} cgroups: RSS (MB)"] = p.memory_info().rss / 2**20
            for clients in (1, 20):
                p50, p99 = latency(d.url + "/metrics", clients, seconds=LATENCY_WINDOW_S)
                out[f"{n} cgroups: scrape p50 ms, {clients} client(s)"] = p50
                out[f"{n} cgroups: scrape p99 ms, {clients} client(s)"] = p99
    return out


async def _hammer(url: str, clients: int, seconds: float) -> tuple[int, int, int]:
    ok = bad = incomplete = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def worker() -> None:
            nonlocal ok, bad, incomplete
            while time.monotonic() < deadline:
                try:
                    async with session.get(url) as r:
                        body = await r.read()
                except aiohttp.ClientError:
                    bad += 1
                    continue
                if r.status != 200:
                    bad += 1
                elif b"carbond_build_info{" not in body:  # the last family: its presence means a whole body
                    incomplete += 1
                else:
                    ok += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return ok, bad, incomplete


def _tick_gaps(d: Daemon) -> tuple[float, float]:
    m = d.scrape()
    count = next(v for (n, _), v in m.items() if n == "carbond_tick_duration_seconds_count")
    total = next(v for (n, _), v in m.items() if n == "carbond_tick_duration_seconds_sum")
    return count, total


def load_and_soak(workdir: Path, n: int = 1000, clients: int = 100, seconds: float = 60.0) -> dict[str, float]:
    """100 scrapers for ``seconds`` against ``n`` cgroups; then a churn soak with RSS sampled after warm-up."""
    out: dict[str, float] = {}
    root = workdir / "load"
    proc = ProcTree(root / "proc")
    tree = CgroupTree(root / "cg")
    populate(tree, n)
    with CgroupWriter(tree, proc, busy=0.5, period_s=1.0), Daemon(root, _config(root, n)) as d:
        time.sleep(3)
        ticks0, _ = _tick_gaps(d)
        t0 = time.monotonic()
        ok, bad, incomplete = asyncio.run(_hammer(d.url + "/metrics", clients, seconds))
        elapsed = time.monotonic() - t0
        ticks1, _ = _tick_gaps(d)
        out[f"{clients} scrapers x {seconds:.0f} s: responses 200 and complete"] = ok
        out[f"{clients} scrapers: errors or non-200"] = bad
        out[f"{clients} scrapers: incomplete bodies"] = incomplete
        out[f"{clients} scrapers: ticks taken / ticks due"] = (ticks1 - ticks0) / elapsed
    root = workdir / "soak"
    proc = ProcTree(root / "proc")
    tree = CgroupTree(root / "cg")
    populate(tree, 200)
    cfg = _config(root, 100) | {"measure_power_secs": 0.2, "attribution": {"max_cgroups": 100, "retention_secs": 2}}
    rss: list[float] = []
    with CgroupWriter(tree, proc, busy=0.5, period_s=0.2), Daemon(root, cfg) as d:
        assert d.proc is not None
        p = psutil.Process(d.proc.pid)
        for step in range(90):  # 50 new cgroups a step, removed the next: 4,500 come and go
            for i in range(50):
                tree.add(f"system.slice/churn-{step}-{i}.scope", cpus=0.01, write=False)
            if step:
                for i in range(50):
                    tree.remove(f"system.slice/churn-{step - 1}-{i}.scope", write=False)
            time.sleep(0.4)
            rss.append(p.memory_info().rss / 2**20)
    warm = statistics.median(rss[20:30])
    out["churn soak: RSS after warm-up (MB)"] = warm
    out["churn soak: RSS at the end (MB)"] = statistics.median(rss[-10:])
    out["churn soak: growth after warm-up (%)"] = (statistics.median(rss[-10:]) / warm - 1) * 100
    return out


if __name__ == "__main__":  # python -m bench.cgroups: the per-tick figures on their own, in a fresh process
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fixture = tick_costs(Path(tmp))
    for name, value in {**fixture, **kernfs_tick_costs()}.items():
        print(f"{name}: {value if isinstance(value, str) else f'{value:.3f}'}")
