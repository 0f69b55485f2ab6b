"""The real daemon on a fake powercap tree whose counters advance at known power (and wrap)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from carbond.testing.powercap import PowercapTree, PowercapWriter
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, parse_metrics
from tests.harness.tools import require_tool

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
    cfg = {
        "measure_power_secs": 1,
        "sensors": ["rapl", "tdp", "ram"],
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc")},
        "intensity": {"zone": "DE"},
        "pue": 1.2,
    }
    with PowercapWriter({pkg: 40.0, core: 25.0, dram: 6.0}), Daemon(tmp_path, cfg) as d:
        time.sleep(1.5)
        a = d.scrape()
        time.sleep(6.0)  # more than two wraps of the package counter
        b = d.scrape()
        status, om = d.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert value(b, "carbond_device_power_watts", device="package-0") == pytest.approx(40.0, rel=0.01)
    assert value(b, "carbond_device_power_watts", device="dram-0") == pytest.approx(6.0, rel=0.01)
    assert value(b, "carbond_node_power_watts") == pytest.approx(46.0, rel=0.01)  # core not added again
    assert value(b, "carbond_sensor_up", sensor="rapl") == 1.0
    assert not [k for k in b if k[0] == "carbond_sensor_up" and dict(k[1])["sensor"] in ("tdp", "ram")]
    d_energy = value(b, "carbond_node_energy_joules_total") - value(a, "carbond_node_energy_joules_total")
    ticks = d_energy / 46.0
    assert round(ticks) >= 5 and ticks == pytest.approx(round(ticks), abs=0.03)  # whole 1 s ticks at 46 W
    g = value(b, "carbond_grid_intensity_grams_per_kwh", zone="DE")
    d_em = value(b, "carbond_emissions_grams_total") - value(a, "carbond_emissions_grams_total")
    assert d_em == pytest.approx(d_energy / 3.6e6 * 1.2 * g, rel=1e-3)
    assert status == 200 and om.decode().endswith("# EOF\n")


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
        time.sleep(1.0)
        status, body = d.get("/metrics")
    assert status == 200
    assert parse_metrics(body.decode())
    out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"" and out.stderr == b"", out.stderr


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
