from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from carbond.intensity.static import lookup_country
from tests.harness.skips import skip_or_fail

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


def together(*targets: Callable[[], object]) -> None:
    """Each target in its own thread, all released at once; returns when all are done."""
    barrier = threading.Barrier(len(targets))

    def run(target: Callable[[], object]) -> None:
        barrier.wait()
        target()

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.fixture(autouse=True)
def _carbond_logs_restored() -> Iterator[None]:
    """A ``carbond.codecarbon`` tracker puts carbond's module loggers in library mode (stdlib logging) for the rest
    of the process: put back after each test, for later tests that capture carbond's structlog events."""
    from carbond import logs

    saved = logs._library
    yield
    logs._library = saved


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


ROOT = Path(__file__).resolve().parents[2]
CODECARBON_PYTHON = ROOT / ".venv-codecarbon" / "bin" / "python"


@pytest.fixture(scope="session")
def codecarbon_python() -> Path:
    """The interpreter of ``.venv-codecarbon`` (CodeCarbon 3.3.2, the bench's). Tests never install packages:
    ``make test`` builds the venv before pytest; without it the test skips (fails under CI=true) saying how."""
    import subprocess

    probe = [str(CODECARBON_PYTHON), "-c", "import codecarbon; assert codecarbon.__version__.startswith('3.3')"]
    if CODECARBON_PYTHON.exists():
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode == 0:
            return CODECARBON_PYTHON
        skip_or_fail(
            f"CodeCarbon 3.3 is not importable from .venv-codecarbon ({done.stderr.strip()[-300:]}): "
            "run `make .venv-codecarbon/.stamp`"
        )
    skip_or_fail("no .venv-codecarbon (the CodeCarbon comparison venv): run `make .venv-codecarbon/.stamp`")
