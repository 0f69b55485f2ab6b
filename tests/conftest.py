from __future__ import annotations

import pytest

from tests.harness.tools import require_tool


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/e2e-metrics.txt from this run (as CARBOND_UPDATE_GOLDEN=1 does)",
    )


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool", "prometheus")
