from __future__ import annotations

import pytest

from carbond.testing.tools import require_tool

__all__ = ["require_tool"]


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool", "prometheus")
