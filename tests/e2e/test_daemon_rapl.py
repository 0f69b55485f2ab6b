"""The real daemon on a fake powercap tree whose counters advance at known power (and wrap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carbond.testing.powercap import PowercapTree, PowercapWriter
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, parse_metrics, tick_count
from tests.harness.tools import require_tool
from tests.harness.wait import GapClock

pytestmark = pytest.mark.e2e


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_rapl_power_energy_and_wraps(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path / "sys")
    pkg = tree.add_zone("package-0", range_uj=100_000_000)  # 100 J: wraps every 2.5 s at 40 W
    core = tree.add_zone("core", parent=pkg, range_uj=100_000_000)
    dram = tree.add_zone("dram", parent=pkg)
    ProcTree(tmp_path / "proc")
    interval_s = 1.0
    cfg = {
        "measure_power_secs": interval_s,
        "sensors": ["rapl", "tdp", "ram"],
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc")},
        "intensity": {"zone": "DE"},
        "pue": 1.2,
    }
    clock = GapClock()
    with PowercapWriter({pkg: 40.0, core: 25.0, dram: 6.0}, clock=clock), Daemon(tmp_path, cfg) as d:
        a = d.wait_for_ticks(1)
        b = d.wait_for_ticks(6)  # six 1 s ticks: more than two wraps of the package counter
        status, om = d.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        stale_s = clock.max_gap_s()
    # A counter holds the writer's last write, at most ``stale_s`` old: over one tick (about ``interval_s``, at worst
    # half of it after a late tick) the power can be off by 2 x stale_s / interval_s; 1 % for the daemon's own read.
    rel = 0.01 + 2 * stale_s / interval_s
    assert value(b, "carbond_device_power_watts", device="package-0") == pytest.approx(40.0, rel=rel)
    assert value(b, "carbond_device_power_watts", device="dram-0") == pytest.approx(6.0, rel=rel)
    assert value(b, "carbond_node_power_watts") == pytest.approx(46.0, rel=rel)  # core not added again
    assert value(b, "carbond_sensor_up", sensor="rapl") == 1.0
    assert not [k for k in b if k[0] == "carbond_sensor_up" and dict(k[1])["sensor"] in ("tdp", "ram")]
    # the energy between the scrapes is the ticks the daemon counted between them, at 46 W: a wrap taken for a
    # reset (or an interval dropped) loses 100 J (or 46 J), over two ticks' worth; the ends of the span are the
    # reads of two ticks, each late on its slot by the daemon's scheduling delay (well under a quarter tick)
    d_energy = value(b, "carbond_node_energy_joules_total") - value(a, "carbond_node_energy_joules_total")
    ticks = tick_count(b) - tick_count(a)
    assert ticks >= 6
    assert d_energy / (46.0 * interval_s) == pytest.approx(ticks, abs=0.25 + 2 * stale_s / interval_s)
    g = value(b, "carbond_grid_intensity_grams_per_kwh", zone="DE")
    d_em = value(b, "carbond_emissions_grams_total") - value(a, "carbond_emissions_grams_total")
    assert d_em == pytest.approx(d_energy / 3.6e6 * 1.2 * g, rel=1e-3)
    assert status == 200
    assert om.decode().endswith("# EOF\n")


def test_exposition_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    tree = PowercapTree(tmp_path / "sys")
    pkg = tree.add_zone("package-0")
    ProcTree(tmp_path / "proc")
    cfg = {
        "measure_power_secs": 0.5,
        "sensors": ["rapl", "tdp", "ram"],
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc")},
    }
    with PowercapWriter({pkg: 20.0}), Daemon(tmp_path, cfg) as d:
        d.wait_for_ticks(1)
        status, body = d.get("/metrics")
    assert status == 200
    assert parse_metrics(body.decode())
    out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"", out.stderr
    assert out.stderr == b"", out.stderr


def test_probe_lists_every_backend(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path / "sys")
    tree.add_zone("package-0")
    ProcTree(tmp_path / "proc")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{sysfs: {tmp_path / 'sys'}, procfs: {tmp_path / 'proc'}}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "carbond", "probe", "--config", str(cfg), "--seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("rapl") and "package-0" in line and "available" in line for line in lines)
    assert any(line.startswith("tdp") and "cpu-0" in line for line in lines)
    assert any(line.startswith("ram") and "ram-0" in line for line in lines)
