"""Fault injection against the real daemon process: kill -9 and restart, SIGHUP reloads, state dir trouble."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from carbond.testing.powercap import PowercapTree, PowercapWriter
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon, tick_count
from tests.harness.wait import GapClock

pytestmark = pytest.mark.e2e

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(m: Metrics, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def found(m: Metrics, name: str) -> float:
    """The value of a series that may not be exported yet (0 until it is)."""
    return next((v for (n, _), v in m.items() if n == name), 0.0)


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
    clock = GapClock()
    with PowercapWriter({pkg: 50.0}, clock=clock):
        d.start()
        before = d.wait_for_ticks(2)  # the state file holds a tick's counters
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        killed_at = time.monotonic()
        time.sleep(2.0)  # the downtime under test: energy keeps flowing while carbond is down
        restarting_at = time.monotonic()
        d.start()
        after = d.scrape()
        later = d.wait_for_ticks(1)
        d.stop()
        stale_s = clock.max_gap_s()
    e0 = value(before, "carbond_node_energy_joules_total")
    e1 = value(after, "carbond_node_energy_joules_total")
    e2 = value(later, "carbond_node_energy_joules_total")
    assert e0 <= e1 <= e2  # never backwards
    assert value(after, "carbond_device_energy_joules_total", device="package-0") >= value(
        before, "carbond_device_energy_joules_total", device="package-0"
    )
    # the counter carried on: ``before`` was read before the kill and ``after`` after the restart began, so at 50 W
    # the jump covers at least the downtime measured (less the counter's staleness, at either end)
    assert e1 - e0 >= 50.0 * (restarting_at - killed_at - stale_s)
    assert "downtime_energy_recovered" in d.log()


def test_sighup_reload_and_invalid_reload_kept(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    with PowercapWriter({pkg: 30.0}), Daemon(tmp_path, {**cfg, "pue": 1.1}) as d:
        assert value(d.scrape(), "carbond_pue") == 1.1  # ready: a snapshot is published
        assert d.proc is not None
        d.config_path.write_text(d.config_path.read_text().replace("pue: 1.1", "pue: 1.4"))
        d.proc.send_signal(signal.SIGHUP)
        m = d.wait_for(lambda m: m if value(m, "carbond_pue") == 1.4 else None, what="pue 1.4 after SIGHUP")
        energy = value(m, "carbond_node_energy_joules_total")
        good = d.config_path.read_text()
        d.config_path.write_text(good + "bogus_key: 1\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log('"event": "reload_rejected"')
        m = d.wait_for_ticks(1)  # a tick after the rejected reload
        assert value(m, "carbond_pue") == 1.4  # the invalid file changed nothing
        assert value(m, "carbond_node_energy_joules_total") >= energy
        assert d.proc.poll() is None
    log = d.log()
    assert '"event": "reloaded"' in log
    assert '"event": "reload_rejected"' in log
    assert "bogus_key" in log


def test_state_dir_unwritable_keeps_measuring(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    clock = GapClock()
    with PowercapWriter({pkg: 30.0}, clock=clock), Daemon(tmp_path, {**cfg, "state_dir": str(blocker / "state")}) as d:
        d.wait_for(lambda m: found(m, "carbond_state_persist_errors_total") >= 1, what="a failed persist")
        m = d.wait_for_ticks(3)  # more ticks, each failing to persist too
        stale_s = clock.max_gap_s()
    assert value(m, "carbond_state_persist_errors_total") >= 1
    # over one 0.5 s tick the counter's staleness moves the power by up to 2 x stale_s / 0.5 (2 % for the read)
    assert value(m, "carbond_device_power_watts", device="package-0") == pytest.approx(30.0, rel=0.02 + 4 * stale_s)
    assert d.log().count('"event": "state_persist_failed"') == 1  # one log line, not one per tick


def test_hung_sensor_read_is_timed_out_without_piling_up_threads(tmp_path: Path) -> None:
    tree, cfg = rapl_fixture(tmp_path)
    pkg = tree.add_zone("package-0")
    cfg = {
        **cfg,
        "sensors": ["rapl", "fake"],
        "sensor_timeout_secs": 0.2,
        "fake": {"devices": [{"device": "gpu-0", "kind": "gpu", "watts": 100.0}]},
    }
    with Daemon(tmp_path, cfg) as d:
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        m = d.wait_for_ticks(1)
        assert value(m, "carbond_sensor_up", sensor="rapl") == 1
        ticks0 = value(m, "carbond_tick_duration_seconds_count")
        threads0 = proc.num_threads()
        pkg.hang()
        # the schedule goes on: 8 more ticks against a read that never returns
        m = d.wait_for(lambda m: m if tick_count(m) >= ticks0 + 8 else None, what="8 ticks against a hung read")
        assert value(m, "carbond_sensor_up", sensor="rapl") == 0
        assert value(m, "carbond_sensor_up", sensor="fake") == 1
        assert value(m, "carbond_device_power_watts", device="gpu-0") == pytest.approx(100.0, rel=0.02)
        assert proc.num_threads() <= threads0 + 1  # one thread stuck, not one more per tick
        pkg.release()
        d.wait_for(lambda m: value(m, "carbond_sensor_up", sensor="rapl") == 1, what="rapl up again after release")
        pkg.hang()  # and now stop while a read is stuck for good
        d.wait_for(lambda m: value(m, "carbond_sensor_up", sensor="rapl") == 0, what="rapl down on the new hang")
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 5.0
    assert d.log().count('"event": "sensor_read_failed"') <= 4  # timed out, then still blocked: not one per tick
    assert '"event": "stopped"' in d.log()
