"""Side by side with CodeCarbon on this machine: CPU seconds per minute and peak RSS at 1 s measurements.

CodeCarbon runs in its own virtualenv (``make bench`` creates ``.venv-codecarbon``), as
``OfflineEmissionsTracker(measure_power_secs=1)`` around a sleep; carbond runs as the daemon on its embedded
defaults (the real machine's sensors, attribution of the real cgroups) with ``measure_power_secs: 1``. Both are
measured over the same length of steady state, after start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from carbond.testing.daemon import Daemon

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
        p = psutil.Process(d.proc.pid)
        time.sleep(2)
        c0 = p.cpu_times()
        time.sleep(secs)
        c1 = p.cpu_times()
        hwm = next(
            int(line.split()[1]) / 1024
            for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        cgroups = sum(1 for (n, _), _v in d.scrape().items() if n == "carbond_cgroup_energy_joules_total")
    busy = (c1.user + c1.system) - (c0.user + c0.system)
    return {"CPU s per minute": busy / secs * 60, "peak RSS (MB)": hwm, "cgroup energy series": float(cgroups)}


def side_by_side(workdir: Path, secs: float = 60.0) -> dict[str, float | str] | None:
    cc = codecarbon_figures(secs)
    if cc is None:
        return None
    ours = carbond_figures(workdir, secs)
    return {
        **{f"CodeCarbon {k}": v for k, v in cc.items()},
        **{f"carbond {k}": v for k, v in ours.items()},
        "CPU ratio carbond / CodeCarbon": ours["CPU s per minute"] / float(cc["CPU s per minute"]),
        "peak RSS ratio carbond / CodeCarbon": ours["peak RSS (MB)"] / float(cc["peak RSS (MB)"]),
    }
