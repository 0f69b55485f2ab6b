"""OpenIPMI's ``ipmi_sim`` on a free 127.0.0.1 UDP port: a real BMC (IPMI 2.0 lanplus) with the sensors a test gives.

The test describes its sensors (:class:`SimSensor`); :class:`IpmiSim` writes a ``lan.conf`` (one user, its password,
its maximum privilege), an emulation command file (``mc_add``, ``sensor_add``, ``main_sdr_add`` with a full sensor
record built by :func:`full_sensor_record`, ``sensor_set_value``) and a password file for clients, starts
``ipmi_sim`` with a fresh state directory, and waits until it answers Get Channel Authentication Capabilities.
Values change through the simulator's console (its standard input): :meth:`IpmiSim.set_raw`. :meth:`pause` and
:meth:`resume` stop and continue the process (a BMC that stops answering). See ipmi_sim(1), ipmi_lan(5),
ipmi_sim_cmd(5).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BMC = 0x20
#: RMCP header, IPMI 1.5 session header without authentication, then Get Channel Authentication Capabilities
#: (netfn 6, cmd 0x38) for channel 0x0E at admin privilege: every BMC answers it before any login.
_PING = bytes.fromhex("0600ff07000000000000000000092018c88100388e04b5")


@dataclass(frozen=True, slots=True)
class SimSensor:
    """One threshold sensor: its reading is ``m * raw`` in the unit (IPMI unit code: 6 watts, 1 degrees C)."""

    number: int
    name: str
    raw: int
    sensor_type: int = 0x0B  # other units-based; 0x03 current, 0x08 power supply, 0x01 temperature
    unit: int = 6
    m: int = 2
    readable: bool = True  # False: scanning disabled (the BMC says the reading is unavailable)


def full_sensor_record(s: SimSensor) -> bytes:
    """An SDR type 01h full sensor record (IPMI 2.0 table 43-1), owned by the BMC, linear ``y = m * x``."""
    name = s.name.encode("ascii")
    body = bytearray(43)  # record bytes 6..48; offsets below are the spec's byte numbers minus 6
    body[0], body[1], body[2] = BMC, 0x00, s.number  # owner id, owner LUN, sensor number
    body[3], body[4] = 0x07, 0x01  # entity: system board, instance 1
    body[5] = 0x7F  # initialisation: scanning, events, thresholds, hysteresis, type
    body[6] = 0x68  # capabilities: auto re-arm, readable hysteresis, readable thresholds
    body[7], body[8] = s.sensor_type, 0x01  # sensor type, event/reading type: threshold
    body[15], body[16], body[17] = 0x00, s.unit, 0x00  # units 1 (unsigned, no rate/modifier/%), base, modifier
    body[18] = 0x00  # linear
    body[19], body[20] = s.m & 0xFF, (s.m >> 2) & 0xC0  # M (10 bits), tolerance 0
    body[21] = body[22] = body[23] = body[24] = 0  # B 0, accuracy 0, exponents 0
    body[29], body[30] = 0xFF, 0x00  # sensor maximum, minimum reading
    body[42] = 0xC0 | len(name)  # id string: 8-bit ASCII + Latin-1, length
    record = body + name
    return bytes([0x00, 0x00, 0x51, 0x01, len(record)]) + bytes(record)


def emulation(sensors: Sequence[SimSensor]) -> str:
    """An ipmi_sim command file: one BMC with an SDR repository holding ``sensors``."""
    lines = [
        f"mc_setbmc 0x{BMC:02x}",
        f"mc_add 0x{BMC:02x} 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02",
    ]
    for s in sensors:
        sdr = " ".join(f"0x{b:02x}" for b in full_sensor_record(s))
        scanning = "scanning" if s.readable else "no-scanning"
        masks = " ".join(["0" * 15] * 4)
        lines += [
            f"sensor_add 0x{BMC:02x} 0 0x{s.number:02x} 0x{s.sensor_type:02x} 0x01",
            f"main_sdr_add 0x{BMC:02x} {sdr}",
            f"sensor_set_event_support 0x{BMC:02x} 0 0x{s.number:02x} enable {scanning} per-state {masks}",
            f"sensor_set_value 0x{BMC:02x} 0 0x{s.number:02x} {s.raw} 0",
        ]
    lines.append(f"mc_enable 0x{BMC:02x}")
    return "\n".join(lines) + "\n"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class IpmiSim:
    """``ipmi_sim`` for one test (a context manager; :meth:`stop` is always safe to call)."""

    def __init__(
        self,
        workdir: Path,
        sensors: Sequence[SimSensor],
        *,
        username: str = "carbond",
        password: str = "s3cretPw9xq",
        privilege: str = "user",
        binary: str = "ipmi_sim",
    ) -> None:
        self.workdir = workdir
        self.sensors = list(sensors)
        self.username = username
        self.password = password
        self.privilege = privilege
        self.binary = binary
        self.port = 0
        self.password_file = workdir / "bmc-password"
        self.log_file = workdir / "ipmi_sim.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    def __enter__(self) -> IpmiSim:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start on a free port and wait until it answers; a port taken in the meantime is retried with another."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(self.password + "\n", encoding="utf-8")
        self.password_file.chmod(0o600)
        (self.workdir / "sim.emu").write_text(emulation(self.sensors), encoding="utf-8")
        deadline = time.monotonic() + timeout
        while True:
            self.port = free_udp_port()
            self._write_lan_conf()
            state = self.workdir / f"state-{self.port}"  # fresh: nothing persisted by an earlier run
            state.mkdir()
            with self.log_file.open("ab") as log:
                conf, emu = str(self.workdir / "lan.conf"), str(self.workdir / "sim.emu")
                self._proc = subprocess.Popen(
                    [self.binary, "-c", conf, "-f", emu, "-s", str(state)],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(deadline):
                return
            self.stop()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"ipmi_sim did not start: {self.log_tail()}")

    def _write_lan_conf(self) -> None:
        auths = "none md2 md5 straight"
        text = f"""name "carbond-sim"
set_working_mc 0x{BMC:02x}
  startlan 1
    addr 127.0.0.1 {self.port}
    priv_limit admin
    allowed_auths_callback {auths}
    allowed_auths_user {auths}
    allowed_auths_operator {auths}
    allowed_auths_admin {auths}
    guid a123456789abcdefa123456789abcdef
  endlan
  user 2 true "{self.username}" "{self.password}" {self.privilege} 10 {auths}
"""
        (self.workdir / "lan.conf").write_text(text, encoding="utf-8")

    def _wait_ready(self, deadline: float) -> bool:
        """Poll with Get Channel Authentication Capabilities until a reply; False if the process exited."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                s.sendto(_PING, ("127.0.0.1", self.port))
                with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                    if s.recvfrom(512)[0][:4] == _PING[:4]:
                        return True
        return False

    def set_raw(self, number: int, raw: int) -> None:
        """Set a sensor's raw reading (0-255) through the console; the next Get Sensor Reading returns it."""
        self.command(f"sensor_set_value 0x{BMC:02x} 0 0x{number:02x} {raw} 0")

    def command(self, line: str) -> None:
        """One ipmi_sim_cmd(5) command on the console."""
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("ipmi_sim is not running")
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def pause(self) -> None:
        """Stop the process (SIGSTOP): the BMC no longer answers, its sessions stay."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._paused:  # a stopped process acts on SIGTERM only once continued
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_file.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def ipmitool(self, *args: str, timeout: float = 30.0) -> str:
        """``ipmitool -I lanplus`` against the simulator, the password through ``-f`` (cipher suite 3: ipmi_sim's)."""
        cmd = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-U", self.username, "-f", str(self.password_file), "-L", self.privilege.upper(), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return done.stdout

    def ipmitool_reading(self, name: str) -> float:
        """The reading ``ipmitool sdr get`` shows for sensor ``name``."""
        out = self.ipmitool("sdr", "get", name)
        found = re.search(r"Sensor Reading\s*:\s*([-\d.]+)", out)
        if found is None:
            raise ValueError(f"no reading for {name!r} in: {out}")
        return float(found.group(1))
