from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """Path of an external tool; skip without it on a user's machine, fail without it in CI."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (Debian package {package!r})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must install it (.ci/run)")
    pytest.skip(reason)


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool", "prometheus")
