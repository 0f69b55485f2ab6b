from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.harness.tools import require_tool

#: Where pytest's ``tmp_path`` directories go when the machine has a tmpfs with room (``PYTEST_DEBUG_TEMPROOT``,
#: read by pytest alone, so the daemon's and the simulators' own temp files stay where they were). The fixture trees
#: (cgroupfs, procfs, sysfs) are thousands of small files created, replaced and removed: on a loaded disk each
#: metadata operation costs milliseconds, on tmpfs microseconds (the cgroup churn test: 115 s against 35 s loaded,
#: 27 s against 13 s quiet).
TMPFS = Path("/dev/shm")
TMPFS_MIN_FREE = 1 << 30  # the suite writes about 100 MB; a container's default 64 MB /dev/shm is not used

#: Tests known to take seconds (measured on a quiet 2-core machine under xdist), run first: with ``--dist worksteal``
#: a worker that starts a 40 s test near the end makes the run 40 s longer while the other idles. Node-id prefixes (a
#: test's name covers its parameters; a module's covers its tests); a module is kept together (its module-scoped
#: fixtures start once), heaviest first, its slow tests first within it.
KNOWN_SLOW_S: dict[str, float] = {
    "tests/deploy/test_image.py::test_image_builds_and_runs_plain_moved_and_hardened": 45,  # 30 to 70 s
    "tests/sensors/test_ups.py": 45,
    "tests/deploy/test_slurm_dashboard.py::test_every_panel_against_the_daemon_and_prometheus": 33,
    "tests/e2e/test_intensity_daemon.py": 33,
    "tests/sensors/test_ipmi.py": 29,
    "tests/job/test_daemon.py": 28,
    "tests/sensors/test_redfish.py": 25,
    "tests/job/test_codecarbon_compat.py": 21,
    "tests/slurm/test_real_slurm.py": 17,
    "tests/e2e/test_faults.py": 16,
    "tests/attribution/test_attribution.py::test_churn_keeps_series_and_memory_bounded": 13,
    "tests/job/test_codecarbon_board.py": 14,
    "tests/deploy/test_prometheus_rules.py::test_promtool_rule_unit_tests_fire_and_resolve": 9,
    "tests/deploy/test_fleet_e2e.py": 12,
    "tests/sensors/test_powermetrics.py": 11,
    "tests/e2e/test_daemon_rapl.py": 11,
    "tests/slurm/test_begin_window.py": 8,
    "tests/deploy/test_prometheus_e2e.py": 8,
    "tests/test_config_fuzz.py": 8,
    "tests/sensors/test_nvml.py": 8,
}


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("basetemp") is None and "PYTEST_DEBUG_TEMPROOT" not in os.environ and _tmpfs_has_room():
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(TMPFS)  # inherited by xdist's workers


def _tmpfs_has_room() -> bool:
    try:
        return os.access(TMPFS, os.W_OK | os.X_OK) and shutil.disk_usage(TMPFS).free >= TMPFS_MIN_FREE
    except OSError:
        return False


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heaviest modules first, each module's known-slow tests first; the order depends on the collected items alone,
    so every xdist worker computes the same one (which xdist requires)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(_module(item.nodeid), []).append(item)
    weight = dict.fromkeys(modules, 0.0)
    for prefix, seconds in KNOWN_SLOW_S.items():
        if _module(prefix) in weight:
            weight[_module(prefix)] += seconds

    def test_seconds(item: pytest.Item) -> float:
        return sum(s for p, s in KNOWN_SLOW_S.items() if "::" in p and item.nodeid.startswith(p))

    ordered: list[pytest.Item] = []
    for module in sorted(modules, key=lambda m: -weight[m]):  # stable sorts: the rest keep their order
        ordered.extend(sorted(modules[module], key=lambda i: -test_seconds(i)))
    items[:] = ordered


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/e2e-metrics.txt from this run (as CARBOND_UPDATE_GOLDEN=1 does)",
    )


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    """structlog's configuration is process-wide: a test that runs the CLI in-process (``main(["measure", ...])``)
    sets its level (error for ``-q``) for every later test, whose ``capture_logs`` then sees nothing. Put back after
    each test."""
    configured, saved = structlog.is_configured(), structlog.get_config()
    yield
    if configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool", "prometheus")
