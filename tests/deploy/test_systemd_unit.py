from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.skips import host_lacks
from tests.harness.tools import require_tool

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


def device_rules() -> dict[str, str]:
    rules = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("DeviceAllow="):
            node, mode = line.removeprefix("DeviceAllow=").split()
            rules[node] = mode
    return rules


def test_gpu_device_nodes_are_granted_read_write() -> None:
    """NVML opens /dev/nvidiactl and /dev/nvidiaN read-write, amdsmi /dev/kfd and /dev/dri/*: ``r`` is not enough."""
    rules = device_rules()
    assert "DevicePolicy=closed" in UNIT.read_text()
    for node in (
        "/dev/nvidiactl",
        "char-nvidia-frontend",
        "/dev/nvidia-uvm",
        "char-nvidia-uvm",
        "char-nvidia-caps",
        "/dev/kfd",
        "char-drm",
    ):
        assert rules.get(node) == "rw", (node, rules)
    assert set(rules.values()) == {"rw"}  # never mknod ("m"): no rule grants more than opening the node


DEVICES_V1 = Path("/sys/fs/cgroup/devices")
OPEN_BOTH = (
    "import os, sys\n"
    "open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
    "out = []\n"
    "for flags in (os.O_RDONLY, os.O_RDWR):\n"
    "    try:\n"
    "        os.close(os.open('/dev/null', flags)); out.append('ok')\n"
    "    except PermissionError:\n"
    "        out.append('EPERM')\n"
    "print(' '.join(out))\n"
)


@pytest.mark.parametrize(("mode", "expected"), [("r", "ok EPERM"), ("unit", "ok ok")])
def test_devices_cgroup_rule_decides_a_read_write_open(tmp_path: Path, mode: str, expected: str) -> None:
    """What DeviceAllow becomes on a v1 devices cgroup, applied to /dev/null (char 1:3): with ``r`` a read-write
    open fails with EPERM, as NVML's open of /dev/nvidiactl did; with the unit's mode it succeeds."""
    if not (DEVICES_V1 / "devices.allow").exists() or os.geteuid() != 0:
        host_lacks("cgroup-v1-devices")
    rule_mode = device_rules()["/dev/nvidiactl"] if mode == "unit" else mode
    group = DEVICES_V1 / f"carbond-test-{os.getpid()}-{mode}"
    group.mkdir()
    try:
        (group / "devices.deny").write_text("a\n")
        (group / "devices.allow").write_text(f"c 1:3 {rule_mode}\n")
        out = subprocess.run([sys.executable, "-c", OPEN_BOTH, str(group)], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == expected, out.stderr
    finally:
        group.rmdir()


def test_the_daemon_fits_the_units_limits() -> None:
    """LimitNOFILE holds the 4,096 kept cgroup files, the 1,024 connections of web.max_connections and 512 spare
    (the server lowers its connection limit to half the open-files limit), MemoryMax bounds the service above the
    DaemonSet's 128 MiB, and ExecReload sends SIGHUP (which re-reads the config and the web config)."""
    from carbond.exporter.http import DEFAULT_MAX_CONNECTIONS

    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    nofile = int(settings["LimitNOFILE"])
    assert nofile >= 4096 + DEFAULT_MAX_CONNECTIONS + 512
    assert nofile // 2 >= DEFAULT_MAX_CONNECTIONS
    assert settings["MemoryMax"] == "256M"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Type"] == "notify"  # a reload waits for READY=1: SIGHUP before the handler is set kills it


def test_the_daemon_tells_systemd_it_is_ready_once_it_listens(tmp_path: Path) -> None:
    """With Type=exec systemd let a reload through at exec: a SIGHUP in the first 0.1-0.3 s (imports) killed the
    daemon. It now sends READY=1 to $NOTIFY_SOCKET when it listens."""
    import socket

    from tests.harness.daemon import Daemon

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(15)
        with Daemon(tmp_path, {"sensors": ["tdp"]}, env={"NOTIFY_SOCKET": str(path)}) as d:
            assert notify.recv(256) == b"READY=1"
            assert d.get("/healthz")[0] == 200
