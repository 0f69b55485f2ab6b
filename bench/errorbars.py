"""What the error bars cost per tick: the uncertainty tracker (carbond.uncertainty) and the wall fit
(carbond.calibration), beside a whole tick at 1,000 cgroups (bench/cgroups.py). Issue target: at most 10 % more."""

from __future__ import annotations

import random
import time

from carbond.calibration import WallFit
from carbond.model import Intensity
from carbond.uncertainty import METHODS, DeviceTotals, Tracker, intensity_band

TICKS = 5000
#: A GPU workstation's devices: two packages, their DRAM, four GPUs, a wall meter and other.
DEVICES = [
    (("rapl", "package-0"), "cpu", METHODS["rapl:cpu"]),
    (("rapl", "package-1"), "cpu", METHODS["rapl:cpu"]),
    (("rapl", "dram-0"), "dram", METHODS["rapl:dram"]),
    (("rapl", "dram-1"), "dram", METHODS["rapl:dram"]),
    *((("nvml", f"gpu-{i}"), "gpu", METHODS["nvml:energy counter"]) for i in range(4)),
    (("ipmi", "bmc"), "platform", METHODS["ipmi"]),
    (("ipmi", "other"), "other", METHODS["ipmi"]),
]


def per_tick_us() -> dict[str, float]:
    """CPU microseconds per tick of the tracker and of the fit (process time over TICKS ticks, after a warm-up)."""
    rng = random.Random(1)
    intensity = intensity_band(Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0, year=2023))
    bands = {key: band for key, _, band in DEVICES}
    tracker, fit = Tracker(1.2, 0.05), WallFit()
    totals = {key: 0.0 for key, _, _ in DEVICES}

    def snapshot(dt: float) -> dict[tuple[str, str], DeviceTotals]:
        return {key: DeviceTotals(kind, kind != "platform", totals[key], dt) for key, kind, _ in DEVICES}

    before = snapshot(0.0)
    tracker_s = fit_s = 0.0
    for tick in range(TICKS + 500):
        for key in totals:
            totals[key] += rng.uniform(50.0, 300.0) * 15
        after = snapshot(15.0)
        t0 = time.process_time()
        tracker.advance(before, after, bands, intensity, (9000.0, 0.2, 9000.0 * tick, 0.2 * tick), "ipmi")
        t1 = time.process_time()
        components = rng.uniform(300.0, 1500.0)
        fit.add(components, rng.random(), 90.0 + 1.1 * components + rng.gauss(0, 3))
        t2 = time.process_time()
        if tick >= 500:
            tracker_s += t1 - t0
            fit_s += t2 - t1
        before = after
    return {
        "uncertainty tracker, us per tick (10 devices)": tracker_s / TICKS * 1e6,
        "wall fit, us per tick (1,440-sample window)": fit_s / TICKS * 1e6,
    }


if __name__ == "__main__":
    for name, value in per_tick_us().items():
        print(f"{name}: {value:.1f}")
