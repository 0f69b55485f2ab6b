"""Side by side with CodeCarbon on this machine: CPU seconds per minute and peak RSS at 1 s measurements.

CodeCarbon runs in its own virtualenv (``make bench`` creates ``.venv-codecarbon``), as
``OfflineEmissionsTracker(measure_power_secs=1)`` around a sleep; carbond runs as the daemon on its embedded
defaults (the real machine's sensors, attribution of the real cgroups) with ``measure_power_secs: 1``. Both are
measured over the same length of steady state, after start-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.process import cpu_seconds
from tests.harness.daemon import Daemon

ROOT = Path(__file__).parent.parent
CC_PYTHON = Path(os.environ.get("CODECARBON_PYTHON", ROOT / ".venv-codecarbon" / "bin" / "python"))

_SCRIPT = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import codecarbon
from codecarbon import OfflineEmissionsTracker
secs = float(sys.argv[1])
t = OfflineEmissionsTracker(measure_power_secs=1, country_iso_code="FRA", save_to_file=False, log_level="error")
t.start()
time.sleep(2)
r0 = resource.getrusage(resource.RUSAGE_SELF)
time.sleep(secs)
r1 = resource.getrusage(resource.RUSAGE_SELF)
t.stop()
busy = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
print(json.dumps({"version": codecarbon.__version__, "cpu_s": busy, "peak_rss_mb": r1.ru_maxrss / 1024}))
"""


def codecarbon_figures(secs: float) -> dict[str, float | str] | None:
    if not CC_PYTHON.exists():
        return None
    out = subprocess.run(
        [str(CC_PYTHON), "-c", _SCRIPT, str(secs)], capture_output=True, text=True, timeout=secs + 120, check=False
    )
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "codecarbon version": doc["version"],
        "CPU s per minute": doc["cpu_s"] / secs * 60,
        "peak RSS (MB)": doc["peak_rss_mb"],
    }


def carbond_figures(workdir: Path, secs: float) -> dict[str, float]:
    with Daemon(workdir, {"measure_power_secs": 1, "state_dir": str(workdir / "state")}) as d:
        assert d.proc is not None
        time.sleep(2)
        c0 = cpu_seconds(d.proc.pid)
        time.sleep(secs)
        c1 = cpu_seconds(d.proc.pid)
        hwm = next(
            int(line.split()[1]) / 1024
            for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        cgroups = sum(1 for (n, _), _v in d.scrape().items() if n == "carbond_cgroup_energy_joules_total")
    return {"CPU s per minute": (c1 - c0) / secs * 60, "peak RSS (MB)": hwm, "cgroup energy series": float(cgroups)}


def side_by_side(workdir: Path, secs: float = 60.0, rounds: int = 5) -> dict[str, float | str] | None:
    """``rounds`` alternating runs of each, ``secs`` of steady state each; figures are the medians of the rounds."""
    ccs: list[dict[str, float | str]] = []
    ours: list[dict[str, float]] = []
    for i in range(rounds):
        cc = codecarbon_figures(secs)
        if cc is None:
            return None
        ccs.append(cc)
        (workdir / f"round-{i}").mkdir(parents=True, exist_ok=True)
        ours.append(carbond_figures(workdir / f"round-{i}", secs))
    cc_cpu = statistics.median(float(c["CPU s per minute"]) for c in ccs)
    cc_rss = statistics.median(float(c["peak RSS (MB)"]) for c in ccs)
    our_cpu = statistics.median(o["CPU s per minute"] for o in ours)
    our_rss = statistics.median(o["peak RSS (MB)"] for o in ours)
    ratios = sorted(o["CPU s per minute"] / float(c["CPU s per minute"]) for o, c in zip(ours, ccs, strict=True))
    return {
        "rounds (alternating, each side)": float(rounds),
        "CodeCarbon codecarbon version": ccs[0]["codecarbon version"],
        "CodeCarbon CPU s per minute": cc_cpu,
        "CodeCarbon peak RSS (MB)": cc_rss,
        "carbond CPU s per minute": our_cpu,
        "carbond peak RSS (MB)": our_rss,
        "carbond cgroup energy series": ours[0]["cgroup energy series"],
        "CPU ratio carbond / CodeCarbon (medians)": our_cpu / cc_cpu,
        "CPU ratio, worst round": ratios[-1],
        "peak RSS ratio carbond / CodeCarbon": our_rss / cc_rss,
    }
