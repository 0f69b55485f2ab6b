from __future__ import annotations

import re
import subprocess
from pathlib import Path

from carbond.testing.tools import require_tool

UNIT = Path(__file__).parent.parent.parent / "systemd" / "carbond.service"


def test_security_exposure_at_most_2() -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    out = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    m = re.search(r"Overall exposure level for carbond\.service: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0


def test_verify_is_clean_but_for_the_uninstalled_binary() -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    out = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    unexpected = [ln for ln in lines if "/usr/local/bin/carbond" not in ln or "is not executable" not in ln]
    assert unexpected == []
