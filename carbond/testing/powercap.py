"""A faithful fake of the powercap sysfs tree, for tests, demos and benchmarks.

Layout as on real hosts: zones are real directories under ``devices/virtual/powercap/intel-rapl`` (subzones nested
inside their package), and ``class/powercap`` holds relative symlinks to every zone and subzone. Values are written
the way the kernel prints them (decimal and a newline) and replaced atomically, so a reader never sees half a number.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_RANGE_UJ = 262143328850


def _write(path: Path, text: str, mode: int = 0o444) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Zone:
    def __init__(self, path: Path, name: str, range_uj: int | None, mode: int) -> None:
        self.path = path
        self.name = name
        self.range_uj = range_uj
        self.mode = mode
        self.energy_uj = 0
        path.mkdir(parents=True)
        _write(path / "name", f"{name}\n")
        _write(path / "enabled", "1\n")
        if range_uj is not None:
            _write(path / "max_energy_range_uj", f"{range_uj}\n", mode)
        self.set_energy_uj(0)

    def set_energy_uj(self, value: int) -> None:
        self.energy_uj = value
        _write(self.path / "energy_uj", f"{value}\n", self.mode)

    def advance(self, joules: float) -> None:
        value = self.energy_uj + round(joules * 1e6)
        if self.range_uj is not None:
            value %= self.range_uj
        self.set_energy_uj(value)

    def corrupt(self, text: str) -> None:
        """Make the next read return ``text`` (empty, non-numeric ...) without changing the true counter."""
        _write(self.path / "energy_uj", text, self.mode)

    def hang(self) -> None:
        """``energy_uj`` becomes a FIFO without a writer: opening it blocks, like a read stuck in the kernel."""
        path = self.path / "energy_uj"
        path.unlink()
        os.mkfifo(path, 0o444)

    def release(self) -> None:
        """Unblock a reader stuck in :meth:`hang` (it reads the current value) and make the file regular again."""
        path = self.path / "energy_uj"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is blocked on it
            pass
        else:
            os.write(fd, f"{self.energy_uj}\n".encode())
            os.close(fd)
        path.unlink()
        self.set_energy_uj(self.energy_uj)

    def restore(self) -> None:
        self.set_energy_uj(self.energy_uj)


class PowercapTree:
    """``tree = PowercapTree(tmp / "sys"); pkg = tree.add_zone("package-0"); tree.add_zone("core", parent=pkg)``."""

    def __init__(self, sysfs: Path) -> None:
        self.sysfs = sysfs
        self.devices = sysfs / "devices/virtual/powercap"
        self.cls = sysfs / "class/powercap"
        self.cls.mkdir(parents=True, exist_ok=True)
        self._counters: dict[tuple[str, str], int] = {}
        self.zones: list[Zone] = []

    def add_zone(
        self,
        name: str,
        *,
        parent: Zone | None = None,
        range_uj: int | None = DEFAULT_RANGE_UJ,
        mmio: bool = False,
        mode: int = 0o444,
    ) -> Zone:
        control = "intel-rapl-mmio" if mmio else "intel-rapl"
        ctl_dir = self.devices / control
        if not ctl_dir.exists():
            ctl_dir.mkdir(parents=True)
            _write(ctl_dir / "enabled", "1\n")
            (self.cls / control).symlink_to(os.path.relpath(ctl_dir, self.cls))
        if parent is None:
            key = (control, "")
            ident = f"{control}:{self._counters.get(key, 0)}"
            base = ctl_dir
        else:
            key = (control, parent.path.name)
            ident = f"{parent.path.name}:{self._counters.get(key, 0)}"
            base = parent.path
        self._counters[key] = self._counters.get(key, 0) + 1
        zone = Zone(base / ident, name, range_uj, mode)
        (self.cls / ident).symlink_to(os.path.relpath(zone.path, self.cls))
        self.zones.append(zone)
        return zone


class PowercapWriter:
    """Advances zones at constant watts against ``clock`` in a background thread (for end-to-end tests)."""

    def __init__(
        self, watts: dict[Zone, float], period_s: float = 0.005, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._watts = watts
        self._period = period_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="powercap-writer", daemon=True)
        self._start_energy = {z: z.energy_uj for z in watts}
        self._t0 = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            elapsed = self._clock() - self._t0
            for zone, watts in self._watts.items():
                value = self._start_energy[zone] + round(watts * elapsed * 1e6)
                zone.set_energy_uj(value % zone.range_uj if zone.range_uj else value)
            self._stop.wait(self._period)

    def __enter__(self) -> PowercapWriter:
        self._t0 = self._clock()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def unprivileged_reader(path: Path) -> str:
    """Read like a non-root user would: files without the other-read bit raise PermissionError (tests run as root)."""
    if not os.stat(path).st_mode & 0o004:
        raise PermissionError(13, "Permission denied", str(path))
    return path.read_text()


def typical_intel(sysfs: Path, *, psys: bool = False, dram: bool = True, mmio: bool = False) -> PowercapTree:
    """package-0 with core, uncore and dram subzones (+ psys, + the mmio copy of package-0)."""
    tree = PowercapTree(sysfs)
    pkg = tree.add_zone("package-0")
    tree.add_zone("core", parent=pkg)
    tree.add_zone("uncore", parent=pkg)
    if dram:
        tree.add_zone("dram", parent=pkg)
    if psys:
        tree.add_zone("psys")
    if mmio:
        tree.add_zone("package-0", mmio=True)
    return tree
