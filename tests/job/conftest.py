from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from carbond.intensity.static import lookup_country

PUE = 1.5
ZONE = "FR"
BURN = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\nsys.exit({code})\n"


def burn(seconds: float, code: int = 0) -> str:
    """Python source burning ``seconds`` of CPU time, then exiting with ``code``."""
    return BURN.format(seconds=seconds, code=code)


def expected_g_per_kwh() -> float:
    found = lookup_country(ZONE)
    assert found is not None
    return found.g_per_kwh * PUE


def assert_ratio(energy_j: float, emissions_g: float) -> None:
    """emissions / energy = intensity x PUE, within 0.1 %."""
    assert energy_j > 0
    ratio = emissions_g / (energy_j / 3_600_000.0)
    assert math.isclose(ratio, expected_g_per_kwh(), rel_tol=1e-3), (ratio, expected_g_per_kwh())


@pytest.fixture
def fake_config(tmp_path: Path) -> Path:
    path = tmp_path / "carbond.yaml"
    cfg = {
        "sensors": ["fake"],
        "measure_power_secs": 0.2,
        "pue": PUE,
        "intensity": {"zone": ZONE},
        "state_dir": str(tmp_path / "state"),
        "fake": {
            "devices": [
                {"device": "package-0", "kind": "cpu", "watts": 40.0},
                {"device": "core-0", "kind": "cpu", "watts": 25.0, "in_node_total": False},
                {"device": "dram-0", "kind": "dram", "watts": 6.0},
                {"device": "gpu-0", "kind": "gpu", "watts": 100.0},
            ]
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``carbond measure`` configures structlog; in-process tests must not change it for the rest of the session."""
    monkeypatch.setattr("carbond.logs.configure", lambda *a, **k: None)
