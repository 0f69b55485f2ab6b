"""Run every benchmark and write bench/results.md (machine, date, figures, ratios)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from bench.cardinality import series_budget
from bench.cgroups import daemon_figures as cgroup_daemon
from bench.cgroups import kernfs_tick_costs as cgroup_kernfs
from bench.cgroups import load_and_soak
from bench.cgroups import tick_costs as cgroup_ticks
from bench.codecarbon import side_by_side as codecarbon_side_by_side
from bench.errorbars import per_tick_us as errorbar_cost
from bench.models_vs_reference import report as models_vs_reference
from bench.platform import platform_cost
from bench.process import SCRAPE_CLIENT, daemon_figures, side_by_side
from bench.reconnect import figures as reconnect_figures
from bench.reconnect import section as reconnect_section
from bench.reconnect import write_section as write_reconnect_section
from bench.ticks import tick_costs

RESULTS = Path(__file__).parent / "results.md"
OPTIMISATIONS = Path(__file__).parent / "optimisations.md"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, Python {platform.python_version()}"


def table(rows: Mapping[str, float | str]) -> list[str]:
    cells = [f"| {k} | {v if isinstance(v, str) else f'{v:.3f}'} |" for k, v in rows.items()]
    return ["| figure | value |", "| --- | ---: |", *cells]


def reconnect() -> int:
    """``python -m bench reconnect``: the reconnecting-flood bench alone, its section of results.md rewritten."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = reconnect_figures(Path(tmp))
    write_reconnect_section(RESULTS, rows)
    print("\n".join(reconnect_section(rows)))
    return 0


def main() -> int:
    if sys.argv[1:] == ["reconnect"]:
        return reconnect()
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `make bench` on {datetime.date.today().isoformat()}, {machine()}.",
        "Figures are medians unless named otherwise; the machine is shared and noisy, so compare ratios.",
        f"Scrape latency: {SCRAPE_CLIENT}, a closed loop of 1 or 20 connections asking for gzip (as Prometheus "
        "does) for 5 s (five ticks), median and 99th percentile.",
        "",
    ]
    print("tick costs ...", file=sys.stderr)
    lines += ["## CPU time per tick (in process)", "", *table(tick_costs()), ""]
    with tempfile.TemporaryDirectory() as tmp:
        print("daemon process ...", file=sys.stderr)
        lines += [
            "## The daemon process (RAPL fixture + RAM model, 1 s ticks)",
            "",
            *table(daemon_figures(Path(tmp))),
            "",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        print("wall meters (ipmi_sim, sushy-static) ...", file=sys.stderr)
        wall = platform_cost(Path(tmp))
    lines += ["## Wall meters: daemon CPU with ipmi and redfish polled every 10 s (1 s ticks, 60 s windows)", ""]
    lines += [*table(wall), ""] if wall else ["ipmi_sim or sushy-static is not installed: not measured.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        print("node_exporter side by side ...", file=sys.stderr)
        sbs = side_by_side(Path(tmp))
    lines += ["## Side by side with node_exporter (same powercap tree, package at 40 W)", ""]
    if sbs is None:
        lines += ["prometheus-node-exporter is not installed: not measured.", ""]
    else:
        ratio = sbs["carbond scrape p50 ms"] / sbs["node_exporter scrape p50 ms"]
        agree = sbs["carbond package J over window"] / sbs["node_exporter package J over window"]
        lines += [
            *table(sbs),
            "",
            f"Scrape latency ratio carbond / node_exporter: {ratio:.2f}. "
            f"Energy increment ratio over the same window: {agree:.4f} (windows are aligned to the scrapes, "
            "so carbond's tick boundaries shift it by up to one tick).",
            "",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        print("scrapes under a reconnecting flood ...", file=sys.stderr)
        lines += reconnect_section(reconnect_figures(Path(tmp)))
    with tempfile.TemporaryDirectory() as tmp:
        print("CodeCarbon side by side (5 rounds x 2 x 60 s) ...", file=sys.stderr)
        cc = codecarbon_side_by_side(Path(tmp))
    lines += ["## Side by side with CodeCarbon (this machine's own sensors, 1 s ticks, 5 rounds of 60 s)", ""]
    if cc is None:
        lines += ["CodeCarbon is not installed (`make bench` installs it in .venv-codecarbon): not measured.", ""]
    else:
        lines += [
            *table(cc),
            "",
            "carbond runs its embedded defaults here (TDP and RAM models, attribution of the real cgroups, the "
            "state file written every tick); CodeCarbon runs OfflineEmissionsTracker around a sleep. CPU time: "
            "CodeCarbon's getrusage, carbond's threads' scheduler counters (both to the microsecond or better).",
            "",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        print("cgroup scenarios ...", file=sys.stderr)
        lines += ["## Attribution: CPU time per tick (in process, fake CPU + DRAM sensor)", ""]
        cg_ticks = cgroup_ticks(Path(tmp))
        lines += [*table(cg_ticks), ""]
    bars = errorbar_cost()
    at_1000 = cg_ticks["tick CPU ms, 1000 cgroups"]
    assert isinstance(at_1000, float)
    share = sum(bars.values()) / 1000 / at_1000
    lines += ["## Error bars: uncertainty tracker and wall fit, CPU per tick (in process)", "", *table(bars), ""]
    lines += [
        f"Together {share:.2%} of a tick at 1,000 cgroups ({at_1000:.1f} ms above); the target is at most 10 %.",
        "",
    ]
    kernfs = cgroup_kernfs()
    lines += ["## Attribution on this host's real cgroupfs (kernfs; empty cgroups made for the run, root only)", ""]
    none = "No cgroup could be made here (not root, or no cgroup2): not measured."
    lines += [*table(kernfs), ""] if kernfs else [none, ""]
    with tempfile.TemporaryDirectory() as tmp:
        lines += ["## Attribution: the daemon process (1 s ticks, every cgroup keeps its series)", ""]
        lines += [*table(cgroup_daemon(Path(tmp))), ""]
    with tempfile.TemporaryDirectory() as tmp:
        print("series per node at each granularity ...", file=sys.stderr)
        lines += [
            "## Cardinality budget: series per node and scrape size (attribution.granularity; CPU + DRAM measured)",
            "",
            *table(series_budget(Path(tmp))),
            "",
            "A Kubernetes node: nine workloads in ten are containers (two per pod), pods over up to 10 namespaces "
            "with a team each and three projects; the rest systemd services. Series: every sample line of "
            "`/metrics` (cgroup: `carbond_cgroup_*`); sizes of the text-format body as served, and gzipped.",
            "",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        print("load and churn soak ...", file=sys.stderr)
        lines += ["## Under load: 100 concurrent scrapers at 1,000 cgroups; churn soak at 0.2 s ticks", ""]
        lines += [*table(load_and_soak(Path(tmp))), ""]
    print("CPU power models vs reference data ...", file=sys.stderr)
    lines += ["## CPU power models vs published reference data (models vs reference)", "", models_vs_reference()]
    lines += [OPTIMISATIONS.read_text()]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
