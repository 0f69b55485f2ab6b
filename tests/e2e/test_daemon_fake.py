"""The real daemon process on the deterministic fake sensor: the whole pipeline, CLI to /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.daemon import Daemon, tick_count

pytestmark = pytest.mark.e2e


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_pipeline_power_energy_emissions(tmp_path: Path) -> None:
    cfg = {
        "measure_power_secs": 0.5,
        "sensors": ["fake"],
        "pue": 1.5,
        "host_name": "e2e-node",
        "intensity": {"zone": "FR"},
    }
    with Daemon(tmp_path, cfg) as d:
        a = d.wait_for_ticks(1)
        b = d.wait_for_ticks(2)
        g_per_kwh = value(b, "carbond_grid_intensity_grams_per_kwh", zone="FR", provider="static")
        assert 10 < g_per_kwh < 200
        assert value(b, "carbond_device_power_watts", device="package-0") == pytest.approx(40.0, rel=0.01)
        assert value(b, "carbond_node_power_watts") == pytest.approx(46.0, rel=0.01)
        d_energy = value(b, "carbond_node_energy_joules_total") - value(a, "carbond_node_energy_joules_total")
        # the fake's energy is exact on the daemon's clock: the ticks counted between the scrapes at 46 W, give or
        # take the daemon's lateness on its slots at either end (half a tick: a tick lost or counted twice shows)
        ticks = tick_count(b) - tick_count(a)
        assert ticks >= 2
        assert d_energy == pytest.approx(46.0 * 0.5 * ticks, abs=46.0 * 0.25)
        d_em = value(b, "carbond_emissions_grams_total") - value(a, "carbond_emissions_grams_total")
        assert d_em == pytest.approx(d_energy / 3.6e6 * 1.5 * g_per_kwh, rel=1e-3)
        assert value(b, "carbond_pue") == 1.5
        assert value(b, "carbond_sensor_up", sensor="fake") == 1.0
        assert all(dict(lab)["host"] == "e2e-node" for (_, lab) in b)
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 5.0
    assert '"event": "stopped"' in d.log()


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("intensity:\n  zone: FR\n  provders: [static]\n")
    for args in (["check-config", str(bad)], ["run", "--config", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "carbond", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        assert "intensity.provders" in out.stderr
        assert "unknown key" in out.stderr
        assert "Traceback" not in out.stderr


def test_version_and_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "carbond", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.startswith("carbond ")
    out = subprocess.run([sys.executable, "-m", "carbond", "fly"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_listen_address_taken_exits_1(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with Daemon(tmp_path / "a", {"sensors": ["fake"]}) as first:
        cfg = tmp_path / "second.yaml"
        cfg.write_text(f"sensors: [fake]\nlisten_address: '127.0.0.1:{first.port}'\n")
        out = subprocess.run(
            [sys.executable, "-m", "carbond", "run", "--config", str(cfg)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 1
        assert "listen_failed" in out.stderr
