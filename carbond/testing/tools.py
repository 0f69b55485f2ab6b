"""External tools for tests: skip on a user's machine that lacks them, fail in CI (CI=true) where they must be."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; skip with the Debian package to install, or fail when CI=true."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (Debian package {package!r})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must install it (.ci/run)")
    pytest.skip(reason)
