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
from tests.harness.skips import host_lacks

ROOT = Path(__file__).resolve().parents[2]


def test_this_python_passes_the_check() -> None:
    assert webconfig.hook_unavailable() is None


def test_a_wrong_layout_crashes_the_check_not_this_process() -> None:
    """Offset 0 reads the reference count where the SSL_CTX pointer should be: OpenSSL dereferences it."""
    why = webconfig.hook_unavailable(0)
    assert why is not None
    assert "crashed (SIGSEGV)" in why
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
    assert "tls_server_config.client_auth_type" in done.stderr, done.stderr
    assert "crashed (SIGSEGV)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


HANDSHAKE_UNDER_MDWE = """
import ctypes, ssl, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: as MemoryDenyWriteExecute=yes
    sys.exit(77)
from carbond.exporter import webconfig
tmp = Path(sys.argv[1])
tls = webconfig.TlsServerConfig(
    cert_file=tmp / "server.crt", key_file=tmp / "server.key", client_auth_type="RequireAnyClientCert"
)
bios = {name: (ssl.MemoryBIO(), ssl.MemoryBIO()) for name in ("server", "client")}
server = webconfig.ssl_context(tls).wrap_bio(*bios["server"], server_side=True)
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
client_ctx.load_cert_chain(tmp / "stranger.crt", tmp / "stranger.key")
client = client_ctx.wrap_bio(*bios["client"])
done = set()
for _ in range(10):
    for name, end, peer in (("client", client, "server"), ("server", server, "client")):
        if name not in done:
            try:
                end.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
        bios[peer][0].write(bios[name][1].read())
assert done == {"client", "server"} and server.getpeercert(binary_form=True)
print("ok")
"""


def test_the_hook_works_where_writable_memory_is_never_executable(tmp_path: Path) -> None:
    """The systemd unit sets MemoryDenyWriteExecute=yes, which would break a verify callback needing writable and
    executable memory: the kernel's own switch (PR_SET_MDWE, Linux 6.3) applied, a client with a self-signed
    certificate completes a RequireAnyClientCert handshake."""
    certs.self_signed(tmp_path, "server")
    certs.self_signed(tmp_path, "stranger", "stranger", "DNS:stranger")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", HANDSHAKE_UNDER_MDWE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if done.returncode == 77:
        host_lacks("kernel-mdwe", "prctl(PR_SET_MDWE) failed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok", done.stderr
