"""A real Network UPS Tools server for tests: Debian nut-server's ``upsd`` with one ``dummy-ups`` driver per UPS.

Everything lives in one temp dir (``ups.conf``, ``upsd.conf``, ``upsd.users``, the drivers' sockets, one ``<ups>.dev``
data file per UPS) found through ``NUT_CONFPATH`` / ``NUT_STATEPATH`` / ``NUT_ALTPIDPATH``; /etc/nut is never read.
upsd listens on 127.0.0.1 at a free port. Run as root, both programs get ``-u root`` (they would otherwise switch
to the ``nut`` user, which cannot read the temp dir).

``dummy-ups`` in its ``dummy-once`` mode (the default for ``*.dev`` files) rereads the data file when its
modification time changes, checked every ``pollinterval`` (1 s here). The time is compared to the second, so
:meth:`NutServer.set_values` gives each version of the file a later time than the previous one. A variable once set
stays set until the driver restarts: a file without it does not remove it.

Failures to provoke: :meth:`pause_driver` (SIGSTOP: upsd declares the data stale after ``MAXAGE`` and answers
``ERR DATA-STALE``), :meth:`stop_driver` (``ERR DRIVER-NOT-CONNECTED``), :meth:`pause_upsd` (connections accepted by
the kernel but never answered), :meth:`stop_upsd` / :meth:`start_upsd` (connection refused, then back on the same
port). :meth:`close` stops every process this object started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

#: Where Debian installs the real binaries (/usr/sbin/upsd is a wrapper that runs them only when /etc/nut/nut.conf
#: says MODE=standalone or netserver).
LIBEXEC_DIRS = ("/lib/nut", "/usr/lib/nut", "/usr/libexec/nut")
READY_TIMEOUT_S = 30.0

Values = Mapping[str, str | float]


def find_binary(name: str) -> str | None:
    """The real ``upsd`` or driver: the NUT libexec directories first, then PATH."""
    for d in LIBEXEC_DIRS:
        path = Path(d) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def query(port: int, command: str, timeout: float = 2.0) -> str:
    """The first answer line of upsd on 127.0.0.1:``port`` to one command (test-side probe; blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s, s.makefile("rwb") as f:
        f.write(command.encode() + b"\n")
        f.flush()
        return f.readline().decode().rstrip("\n")


def _wait(predicate: object, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``predicate`` (a callable) until truthy; OSError counts as "not yet"."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    interval = 0.01
    last: object = None
    while True:
        try:
            if predicate():
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready within {timeout} s (last: {last!r})")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


class NutServer:
    """upsd plus dummy-ups drivers in ``root`` (a fresh temp dir). Add UPSes, then :meth:`start`."""

    def __init__(self, root: Path, *, maxage_s: int = 5, users: Mapping[str, str] | None = None) -> None:
        upsd, driver = find_binary("upsd"), find_binary("dummy-ups")
        if upsd is None or driver is None:
            raise FileNotFoundError("upsd or dummy-ups not found (Debian package nut-server)")
        self.upsd_bin, self.driver_bin = upsd, driver
        self.root = root
        self.port = free_port()
        self.maxage_s = maxage_s
        self.users = dict(users or {})
        self.values: dict[str, dict[str, str]] = {}
        self._drivers: dict[str, subprocess.Popen[bytes]] = {}
        self._upsd: subprocess.Popen[bytes] | None = None
        self._mtime = int(time.time())
        self.env = {
            **os.environ,
            "NUT_CONFPATH": str(root),
            "NUT_STATEPATH": str(root),
            "NUT_ALTPIDPATH": str(root),
        }
        self._as_root = ["-u", "root"] if os.geteuid() == 0 else []

    def add_ups(self, name: str, values: Values) -> None:
        self.values[name] = {k: str(v) for k, v in values.items()}

    def _write_configs(self) -> None:
        ups = "".join(
            f'[{n}]\n  driver = dummy-ups\n  port = {self.root / f"{n}.dev"}\n  pollinterval = 1\n  desc = "test"\n'
            for n in self.values
        )
        (self.root / "ups.conf").write_text(ups)
        (self.root / "upsd.conf").write_text(
            f"LISTEN 127.0.0.1 {self.port}\nSTATEPATH {self.root}\nMAXAGE {self.maxage_s}\n"
        )
        users = "".join(f"[{u}]\n  password = {p}\n  upsmon secondary\n" for u, p in self.users.items())
        path = self.root / "upsd.users"
        path.write_text(users)
        path.chmod(0o600)
        for n in self.values:
            self._write_dev(n)

    def _write_dev(self, name: str) -> None:
        """The data file, replaced whole, with a modification time later than any before (see the docstring)."""
        path = self.root / f"{name}.dev"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in self.values[name].items()))
        self._mtime += 1
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, path)

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)

    # ---- lifecycle

    def start(self) -> None:
        self._write_configs()
        for n in self.values:
            self.start_driver(n)
        self.start_upsd()

    def start_driver(self, name: str) -> None:
        sock = self.root / f"dummy-ups-{name}"
        sock.unlink(missing_ok=True)
        self._drivers[name] = self._spawn([self.driver_bin, "-a", name, "-F", *self._as_root], f"driver-{name}.log")
        _wait(sock.exists, f"dummy-ups {name}")
        if self._upsd is not None:
            _wait(self.ready, f"upsd serving {name}")

    def start_upsd(self) -> None:
        self._upsd = self._spawn([self.upsd_bin, "-F", *self._as_root], "upsd.log")
        try:
            _wait(self.ready, "upsd")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; upsd said: {self.log('upsd')[-600:]}") from None

    def ready(self) -> bool:
        """upsd answers, with every value of the data file of every UPS whose driver runs."""
        if self._upsd is None or self._upsd.poll() is not None:
            raise OSError(f"upsd exited: {self.log('upsd')[-500:]}")
        return all(self._serves(n, self.values[n]) for n in self._drivers)

    def _serves(self, ups: str, values: Mapping[str, str]) -> bool:
        """upsd gives ``values`` (but device.* and driver.*, which the driver sets itself)."""
        mine = {k: v for k, v in values.items() if not k.startswith(("device.", "driver."))}
        return all(self.get(ups, k) == f'VAR {ups} {k} "{v}"' for k, v in mine.items())

    def log(self, which: str) -> str:
        """``upsd`` or ``driver-<ups>`` output so far (for assertion messages)."""
        path = self.root / f"{which}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def get(self, ups: str, var: str) -> str:
        """upsd's current answer to ``GET VAR ups var``."""
        return query(self.port, f"GET VAR {ups} {var}")

    def set_values(self, ups: str, values: Values, *, wait: bool = True) -> None:
        """Change variables in the data file; with ``wait``, return once upsd serves the new values."""
        self.values[ups].update({k: str(v) for k, v in values.items()})
        self._write_dev(ups)
        if wait:
            want = {k: str(v) for k, v in values.items()}
            _wait(lambda: self._serves(ups, want), f"{ups} values {want}")

    def pause_driver(self, name: str) -> None:
        self._drivers[name].send_signal(signal.SIGSTOP)

    def resume_driver(self, name: str) -> None:
        self._drivers[name].send_signal(signal.SIGCONT)

    def stop_driver(self, name: str) -> None:
        _stop(self._drivers.pop(name))

    def pause_upsd(self) -> None:
        assert self._upsd is not None
        self._upsd.send_signal(signal.SIGSTOP)

    def resume_upsd(self) -> None:
        assert self._upsd is not None
        self._upsd.send_signal(signal.SIGCONT)

    def stop_upsd(self) -> None:
        if self._upsd is not None:
            _stop(self._upsd)
            self._upsd = None

    def close(self) -> None:
        self.stop_upsd()
        for name in list(self._drivers):
            self.stop_driver(name)

    def __enter__(self) -> NutServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate (resuming it first, in case it was paused), then kill if it lingers; always reaped."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
