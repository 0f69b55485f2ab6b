"""A fake ``powermetrics`` for Linux tests: streams NUL-separated plist samples like
``powermetrics --samplers cpu_power,gpu_power,ane_power -i <ms> -f plist``.

Run as ``python -m carbond.testing.fake_powermetrics [powermetrics args]``. Environment:
``FAKE_PM_MW`` ("cpu=4500,gpu=1200,ane=30", milliwatts), ``FAKE_PM_EXIT_AFTER`` (samples, then exit 1),
``FAKE_PM_SILENT_AFTER`` (samples, then hang), ``FAKE_PM_ENERGY`` ("1": include the per-sample *_energy keys in mJ).
Each sample: ``elapsed_ns``, ``processor`` -> ``clusters`` (per-cluster entries), ``cpu_power``, ``gpu_power``,
``ane_power``, ``combined_power`` (mW), and with FAKE_PM_ENERGY ``cpu_energy``, ``gpu_energy``, ``ane_energy`` (mJ).
"""

from __future__ import annotations

import os
import plistlib
import sys
import time


def main(argv: list[str]) -> int:
    interval_ms = int(argv[argv.index("-i") + 1]) if "-i" in argv else 1000
    mw = {
        k: float(v)
        for k, v in (p.split("=") for p in os.environ.get("FAKE_PM_MW", "cpu=4500,gpu=1200,ane=30").split(","))
    }
    exit_after = int(os.environ.get("FAKE_PM_EXIT_AFTER", "0"))
    silent_after = int(os.environ.get("FAKE_PM_SILENT_AFTER", "0"))
    energy = os.environ.get("FAKE_PM_ENERGY") == "1"
    out = sys.stdout.buffer
    last = time.monotonic()
    n = 0
    while True:
        time.sleep(interval_ms / 1000)
        now = time.monotonic()
        elapsed_ns = int((now - last) * 1e9)
        last = now
        seconds = elapsed_ns / 1e9
        proc = {
            "clusters": [
                {"name": "E-Cluster", "freq_hz": 1.0e9, "cpus": [{"cpu": 0, "freq_hz": 1.0e9}]},
                {"name": "P-Cluster", "freq_hz": 3.2e9, "cpus": [{"cpu": 4, "freq_hz": 3.2e9}]},
            ],
            "cpu_power": mw["cpu"],
            "gpu_power": mw["gpu"],
            "ane_power": mw["ane"],
            "combined_power": mw["cpu"] + mw["gpu"] + mw["ane"],
        }
        if energy:
            proc.update({f"{k}_energy": int(v * seconds) for k, v in mw.items()})
        sample = {
            "is_delta": True,
            "elapsed_ns": elapsed_ns,
            "hw_model": "Mac14,2",
            "kern_osversion": "23A344",
            "timestamp": time.time(),
            "processor": proc,
        }
        out.write(plistlib.dumps(sample, fmt=plistlib.FMT_XML) + b"\0")
        out.flush()
        n += 1
        if exit_after and n >= exit_after:
            return 1
        if silent_after and n >= silent_after:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
