"""Fault injection against the real daemon process: kill -9 and restart, SIGHUP reloads, state dir trouble."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from carbond.testing.daemon import Daemon
from carbond.testing.powercap import PowercapTree, PowercapWriter
from carbond.testing.procfs import ProcTree

pytestmark = pytest.mark.e2e

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(m: Metrics, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def rapl_fixture(tmp_path: Path) -> tuple[PowercapTree, dict[str, object]]:
    tree = PowercapTree(tmp_path / "sys")
    ProcTree(tmp_path / "proc")  # carries a fixed boot_id: a restart is on the same boot
    cfg = {
        "measure_power_secs": 0.5,
        "sensors": ["rapl"],
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": str(tmp_path / "proc")},
    }
    return tree, cfg


def test_kill_9_loses_no_energy_and_no_counter_goes_back(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    d = Daemon(tmp_path, cfg)
    with PowercapWriter({pkg: 50.0}):
        d.start()
        time.sleep(1.2)
        before = d.scrape()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        killed_at = time.monotonic()
        time.sleep(2.0)  # energy keeps flowing while carbond is down
        d.start()
        restarted_at = time.monotonic()
        after = d.scrape()
        time.sleep(1.0)
        later = d.scrape()
        d.stop()
    e0 = value(before, "carbond_node_energy_joules_total")
    e1 = value(after, "carbond_node_energy_joules_total")
    e2 = value(later, "carbond_node_energy_joules_total")
    assert e0 <= e1 <= e2  # never backwards
    assert value(after, "carbond_device_energy_joules_total", device="package-0") >= value(
        before, "carbond_device_energy_joules_total", device="package-0"
    )
    # the counter carried on: at 50 W the jump over the restart covers at least the downtime
    assert e1 - e0 >= 50.0 * (restarted_at - killed_at) * 0.99
    assert "downtime_energy_recovered" in d.log()


def test_sighup_reload_and_invalid_reload_kept(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    with PowercapWriter({pkg: 30.0}), Daemon(tmp_path, {**cfg, "pue": 1.1}) as d:
        time.sleep(1.0)
        assert value(d.scrape(), "carbond_pue") == 1.1
        assert d.proc is not None
        d.config_path.write_text(d.config_path.read_text().replace("pue: 1.1", "pue: 1.4"))
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        m = d.scrape()
        assert value(m, "carbond_pue") == 1.4
        energy = value(m, "carbond_node_energy_joules_total")
        good = d.config_path.read_text()
        d.config_path.write_text(good + "bogus_key: 1\n")
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        m = d.scrape()
        assert value(m, "carbond_pue") == 1.4  # the invalid file changed nothing
        assert value(m, "carbond_node_energy_joules_total") >= energy
        assert d.proc.poll() is None
    log = d.log()
    assert '"event": "reloaded"' in log and '"event": "reload_rejected"' in log and "bogus_key" in log


def test_state_dir_unwritable_keeps_measuring(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with PowercapWriter({pkg: 30.0}), Daemon(tmp_path, {**cfg, "state_dir": str(blocker / "state")}) as d:
        time.sleep(1.5)
        m = d.scrape()
    assert value(m, "carbond_state_persist_errors_total") >= 1
    assert value(m, "carbond_device_power_watts", device="package-0") == pytest.approx(30.0, rel=0.02)
    assert d.log().count('"event": "state_persist_failed"') == 1  # one log line, not one per tick
