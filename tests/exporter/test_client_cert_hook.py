"""RequestClientCert and RequireAnyClientCert reach into CPython's ssl internals (carbond.exporter.webconfig):
checked in a child process first, so a layout that does not match is a refused mode with its reason, never a crash
of the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from carbond.exporter import webconfig
from tests.exporter import certs

ROOT = Path(__file__).resolve().parents[2]


def test_this_python_passes_the_check() -> None:
    assert webconfig.hook_unavailable() is None


def test_a_wrong_layout_crashes_the_check_not_this_process() -> None:
    """Offset 0 reads the reference count where the SSL_CTX pointer should be: OpenSSL dereferences it."""
    why = webconfig.hook_unavailable(0)
    assert why is not None and "crashed (SIGSEGV)" in why
    assert "AssertionError" in (webconfig.hook_unavailable(8) or "")  # the type pointer: a wrong answer, refused


@pytest.mark.parametrize("mode", ["RequestClientCert", "RequireAnyClientCert"])
def test_a_failed_check_refuses_the_mode_with_the_reason(tmp_path: Path, mode: str) -> None:
    """A daemon whose Python does not have the expected layout (simulated by a wrong offset) exits 2 on its config
    naming the key and why, instead of dying of a segmentation fault at the first handshake or at start."""
    pair = certs.self_signed(tmp_path, "server")
    web = tmp_path / "web.yml"
    tls = f"  cert_file: {pair.cert}\n  key_file: {pair.key}\n  client_auth_type: {mode}\n"
    web.write_text(f"tls_server_config:\n{tls}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sensors: [fake]\nweb:\n  config_file: {web}\n")
    code = (
        "import sys\nfrom carbond.exporter import webconfig\nwebconfig._CTX_OFFSET = 0\n"
        f"from carbond.cli import main\nsys.exit(main(['check-config', {str(cfg)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "tls_server_config.client_auth_type" in done.stderr and "crashed (SIGSEGV)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
