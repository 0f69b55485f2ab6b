"""``carbond measure --daemon URL`` against the real daemon on loopback, on the shipped fake sensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from carbond.cli import main
from carbond.job.report import load_json
from tests.harness.daemon import Daemon

from .conftest import assert_ratio, burn

WATTS = 146.0  # package 40 + dram 6 + gpu 100 (core is inside the package)


def test_a_3s_job_under_a_5s_tick_is_prorated(fake_config: Path, tmp_path: Path) -> None:
    import yaml

    cfg = {**yaml.safe_load(fake_config.read_text()), "measure_power_secs": 5}
    cfg.pop("state_dir")
    with Daemon(tmp_path, cfg) as daemon:
        out = tmp_path / "r.json"
        rc = main(["measure", "--daemon", daemon.url, "--json", str(out), "-q", "--", sys.executable, "-c", burn(3.0)])
        assert rc == 0, daemon.log()
    r = load_json(out)
    assert (r.scope, r.method, r.source) == ("machine", "daemon", "daemon")
    assert 3.0 <= r.duration_s < 4.5  # the job's span, not the wait for the daemon's next tick
    # without prorating: 0 J or a whole 5 s tick (730 J); the job's span at 146 W, within 15 %
    assert r.energy_j == pytest.approx(WATTS * r.duration_s, rel=0.15)
    assert_ratio(r.energy_j, r.emissions_g)
    assert any("prorated over the daemon's ticks" in n for n in r.notes), r.notes
    assert r.embodied_g > 0  # the daemon's embodied counter, over the same span


def test_daemon_unreachable_is_a_note_not_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = main(["measure", "--daemon", "http://127.0.0.1:9", "--json", str(out), "-q", "--", "true"])
    assert rc == 0
    r = load_json(out)
    assert r.scope == "none" and "unreachable" in r.error
    assert "carbond: error: not measured" in capsys.readouterr().err
