from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from tests.harness.tools import require_tool


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
