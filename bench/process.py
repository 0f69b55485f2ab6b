"""Whole-process figures: start-up to ready, resident memory, CPU per minute, scrape latency; node_exporter beside."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp
import psutil

from carbond.testing.powercap import PowercapWriter, typical_intel
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, free_port, parse_metrics


async def _latencies(url: str, clients: int, requests: int, seconds: float) -> list[float]:
    """Each client requests in a loop until ``requests`` are done between them, or ``seconds`` have passed."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession() as session:

        async def worker(n: int) -> None:
            while n > 0 or (seconds and time.perf_counter() < deadline):
                n -= 1
                t0 = time.perf_counter()
                async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                    await r.read()
                    assert r.status == 200
                samples.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(requests // clients) for _ in range(clients)))
    return samples


WRK = shutil.which("wrk")
#: The scrape load generator: wrk (Debian ``wrk``, C, HdrHistogram percentiles) where installed. The fallback, an
#: aiohttp client, shares the 2 CPUs and the GIL with the bench's fixture writers and saturates near 2,700
#: requests/s at 1,000 cgroups, where carbond serves 7,000: its 20-client figures measure the client as much.
SCRAPE_CLIENT = "wrk" if WRK else "Python aiohttp client (wrk not installed)"
WRK_REPORT = Path(__file__).parent / "wrk_report.lua"


def latency(url: str, clients: int, requests: int = 0, seconds: float = 0.0) -> tuple[float, float]:
    """Median and 99th percentile (ms) of ``clients`` scrapers in a closed loop, each asking for gzip as Prometheus
    does: ``requests`` in all, or as many as ``seconds`` allow (with wrk where installed). A window of several ticks
    puts the scrapes that meet a tick (and the first render after it) in the figures in their true proportion."""
    if WRK and seconds:
        cmd = [WRK, f"-t{min(clients, 2)}", f"-c{clients}", f"-d{seconds:g}s", "-s", str(WRK_REPORT)]
        out = subprocess.run([*cmd, "-H", "Accept-Encoding: gzip", url], capture_output=True, text=True, timeout=120)
        figures = dict(line.split() for line in out.stdout.splitlines() if line.count(" ") == 1)
        if out.returncode or int(figures.get("errors", 1)) or not int(figures.get("requests", 0)):
            raise RuntimeError(f"wrk failed: {out.stdout} {out.stderr}")
        return int(figures["p50_us"]) / 1000, int(figures["p99_us"]) / 1000
    s = sorted(asyncio.run(_latencies(url, clients, requests, seconds)))
    return statistics.median(s) * 1000, s[max(int(len(s) * 0.99) - 1, 0)] * 1000


#: Scrape latency is measured over this many seconds: five 1 s ticks.
LATENCY_WINDOW_S = 5.0


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` from the scheduler's nanosecond counters (``/proc/<pid>/task/*/schedstat``).

    The same precision as CodeCarbon's getrusage figure; ``psutil.cpu_times`` counts 10 ms clock ticks, too coarse
    for a process that uses well under 100 ms a minute.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_figures(workdir: Path, run_secs: float = 30.0) -> dict[str, float]:
    tree = typical_intel(workdir / "sys")
    ProcTree(workdir / "proc")
    cfg = {
        "measure_power_secs": 1,
        "sensors": ["rapl", "ram"],
        "paths": {"sysfs": str(workdir / "sys"), "procfs": str(workdir / "proc")},
        "attribution": {"enabled": False},  # machine only: the cgroup scenarios are in bench/cgroups.py
    }
    pkg, dram = tree.zones[0], tree.zones[3]
    out: dict[str, float] = {}
    with PowercapWriter({pkg: 40.0, dram: 6.0}, period_s=0.05):
        d = Daemon(workdir, cfg)
        t0 = time.perf_counter()
        d.start()
        out["start to ready (s)"] = time.perf_counter() - t0
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        cpu0 = cpu_seconds(d.proc.pid)
        time.sleep(run_secs)
        out["CPU s per minute at 1 s ticks"] = (cpu_seconds(d.proc.pid) - cpu0) / run_secs * 60
        out["RSS steady (MB)"] = proc.memory_info().rss / 2**20
        out["peak RSS (MB)"] = _vm_hwm_mb(d.proc.pid)
        for clients in (1, 20):
            p50, p99 = latency(d.url + "/metrics", clients, seconds=LATENCY_WINDOW_S)
            out[f"scrape p50 ms, {clients} client(s)"] = p50
            out[f"scrape p99 ms, {clients} client(s)"] = p99
        d.stop()
    return out


def side_by_side(workdir: Path, window_s: float = 10.0) -> dict[str, float] | None:
    """carbond and node_exporter on one powercap tree: scrape latency and energy increments over one window."""
    exe = "prometheus-node-exporter"
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    tree = typical_intel(workdir / "sys")
    ProcTree(workdir / "proc")
    pkg = tree.zones[0]
    port = free_port()
    ne = subprocess.Popen(
        [
            exe,
            "--collector.disable-defaults",
            "--collector.rapl",
            f"--path.sysfs={workdir / 'sys'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cfg = {"measure_power_secs": 1, "sensors": ["rapl"], "paths": {"sysfs": str(workdir / "sys")}}
    out: dict[str, float] = {}
    try:
        with PowercapWriter({pkg: 40.0}, period_s=0.05), Daemon(workdir, cfg) as d:
            ne_url = f"http://127.0.0.1:{port}/metrics"
            for _ in range(100):
                try:
                    latency(ne_url, 1, 2)
                    break
                except (aiohttp.ClientError, OSError):
                    time.sleep(0.1)

            def energies() -> tuple[float, float]:
                ours = d.scrape()
                theirs = parse_metrics(asyncio.run(_fetch(ne_url)))
                c = next(
                    v
                    for (n, lab), v in ours.items()
                    if n == "carbond_device_energy_joules_total" and dict(lab)["device"] == "package-0"
                )
                n = next(
                    v
                    for (n, lab), v in theirs.items()
                    if n == "node_rapl_package_joules_total" and dict(lab).get("index") == "0"
                )
                return c, n

            c0, n0 = energies()
            time.sleep(window_s)
            c1, n1 = energies()
            out["carbond package J over window"] = c1 - c0
            out["node_exporter package J over window"] = n1 - n0
            out["carbond scrape p50 ms"], _ = latency(d.url + "/metrics", 1, seconds=LATENCY_WINDOW_S)
            out["node_exporter scrape p50 ms"], _ = latency(ne_url, 1, seconds=LATENCY_WINDOW_S)
    finally:
        ne.terminate()
        ne.wait(10)
    return out


async def _fetch(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()
