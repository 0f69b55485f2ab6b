"""A SIGHUP reload builds a new measurement pipeline, but ``carbond_tick_duration_seconds`` is the process's: its
count, sum and every bucket carry on from before the reload instead of falling back to a few ticks."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, Metrics

pytestmark = pytest.mark.e2e

HIST = "carbond_tick_duration_seconds"


def series(m: Metrics, name: str) -> dict[str, float]:
    """The histogram's samples by le (buckets), or the one sample of ``_count``/``_sum``."""
    return {dict(labels).get("le", ""): v for (n, labels), v in m.items() if n == name}


def test_tick_histogram_survives_a_reload(tmp_path: Path) -> None:
    ProcTree(tmp_path / "proc")
    cfg = {
        "measure_power_secs": 0.2,
        "sensors": ["tdp", "ram"],
        "pue": 1.1,
        "paths": {"sysfs": str(tmp_path / "no-sys"), "procfs": str(tmp_path / "proc")},
    }
    with Daemon(tmp_path, cfg) as d:
        assert d.proc is not None
        before = d.wait_for_ticks(5)
        d.config_path.write_text(d.config_path.read_text().replace("pue: 1.1", "pue: 1.3"))
        d.proc.send_signal(signal.SIGHUP)
        after = d.wait_for(
            lambda m: m if series(m, "carbond_pue").get("") == 1.3 else None, what="the reloaded pipeline's snapshot"
        )
    assert '"event": "reloaded"' in d.log()
    count0, count1 = series(before, f"{HIST}_count")[""], series(after, f"{HIST}_count")[""]
    assert count0 >= 5
    assert count1 > count0
    assert series(after, f"{HIST}_sum")[""] >= series(before, f"{HIST}_sum")[""]
    buckets0, buckets1 = series(before, f"{HIST}_bucket"), series(after, f"{HIST}_bucket")
    assert buckets0.keys() == buckets1.keys()
    assert all(buckets1[le] >= buckets0[le] for le in buckets0)
    assert buckets1["+Inf"] == count1
