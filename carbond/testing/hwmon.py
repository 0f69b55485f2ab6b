"""A faithful fake of the hwmon sysfs class, for tests and demos.

Layout as on real hosts: each chip's attributes live in a real directory under its parent device
(``devices/LNXSYSTM:00/.../ACPI000D:00/hwmon/hwmon0`` for the ACPI power meter,
``devices/.../i2c-3/3-0058/hwmon/hwmon1`` for a PMBus power supply, a PCI function for a GPU),
``class/hwmon/hwmonN`` is a relative symlink to it and ``hwmonN/device`` links back to the parent. Values are
written the way the kernel prints them (a decimal integer in micro-units and a newline) and replaced atomically, so a
reader never sees half a number.

    tree = HwmonTree(tmp / "sys")
    meter = tree.power_meter(watts=180.0, interval_ms=1000)
    psu = tree.pmbus_psu(pin_w=250.0, pout_w=230.0)
    psu.channel("pin").set_watts(260.0)
"""

from __future__ import annotations

import os
from pathlib import Path

#: Parent devices as the kernel names them (the ACPI power meter is ACPI000D; PSUs are I2C clients).
ACPI_METER_PARENT = "LNXSYSTM:00/LNXSYBUS:00/ACPI000D:00"
PCI_GPU_PARENT = "pci0000:00/0000:00:01.1/0000:01:00.0"
PCI_CPU_PARENT = "pci0000:00/0000:00:18.3"
PCI_NVME_PARENT = "pci0000:00/0000:00:02.1/0000:02:00.0/nvme/nvme0"


def _write(path: Path, text: str, mode: int = 0o444) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Channel:
    """One ``powerN_*`` or ``energyN_*`` channel of a chip; ``attr`` is the attribute that holds its value."""

    def __init__(self, chip: HwmonChip, attr: str) -> None:
        self.chip = chip
        self.attr = attr
        self.path = chip.path / attr
        self.value = 0

    def set(self, micro: int) -> None:
        """The raw value in micro-units (µW or µJ), as the kernel prints it."""
        self.value = micro
        _write(self.path, f"{micro}\n")

    def set_watts(self, watts: float) -> None:
        self.set(round(watts * 1e6))

    def set_joules(self, joules: float) -> None:
        self.set(round(joules * 1e6))

    def advance_joules(self, joules: float) -> None:
        self.set(self.value + round(joules * 1e6))

    def corrupt(self, text: str) -> None:
        """The next read returns ``text`` (empty, garbage, a negative ...) without changing the true value."""
        _write(self.path, text)

    def break_(self) -> None:
        """Reading fails with an OSError (a directory where the attribute should be: EISDIR). Tests run as root, so
        a mode-000 file would still be readable; this fails for root too, like an EIO from a driver."""
        self.path.unlink()
        self.path.mkdir()

    def hang(self) -> None:
        """The attribute becomes a FIFO without a writer: opening it blocks, like a read stuck on the I2C bus."""
        self.path.unlink()
        os.mkfifo(self.path, 0o444)

    def release(self) -> None:
        """Unblock a reader stuck in :meth:`hang` (it reads the current value) and make the file regular again."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is blocked on it
            pass
        else:
            os.write(fd, f"{self.value}\n".encode())
            os.close(fd)
        self.restore()

    def restore(self) -> None:
        """Undo :meth:`corrupt`, :meth:`break_` or :meth:`hang`: a regular file with the true value."""
        if self.path.is_dir():
            self.path.rmdir()
        elif self.path.exists() and not self.path.is_file():
            self.path.unlink()
        self.set(self.value)


class HwmonChip:
    """One ``hwmonN`` directory with its ``name`` and channels."""

    def __init__(self, path: Path, index: int, name: str) -> None:
        self.path = path
        self.index = index
        self.name = name
        self.channels: dict[str, Channel] = {}  # by label, else by attribute name
        path.mkdir(parents=True)
        _write(path / "name", f"{name}\n")

    @property
    def hwmon(self) -> str:
        return f"hwmon{self.index}"

    def power(
        self, n: int, watts: float, *, label: str | None = None, average: bool = False, interval_ms: int | None = None
    ) -> Channel:
        """``powerN_input`` (or ``powerN_average`` with ``powerN_average_interval``) and ``powerN_label``."""
        ch = Channel(self, f"power{n}_average" if average else f"power{n}_input")
        ch.set_watts(watts)
        if interval_ms is not None:
            _write(self.path / f"power{n}_average_interval", f"{interval_ms}\n", 0o644)
        return self._add(ch, n, "power", label)

    def energy(self, n: int, joules: float, *, label: str | None = None) -> Channel:
        """``energyN_input`` (µJ, cumulative) and ``energyN_label``."""
        ch = Channel(self, f"energy{n}_input")
        ch.set_joules(joules)
        return self._add(ch, n, "energy", label)

    def _add(self, ch: Channel, n: int, kind: str, label: str | None) -> Channel:
        if label is not None:
            _write(self.path / f"{kind}{n}_label", f"{label}\n")
        self.channels[label or ch.attr] = ch
        return ch

    def channel(self, key: str) -> Channel:
        return self.channels[key]


class HwmonTree:
    """The ``class/hwmon`` directory of a fake sysfs root and the chips under it (numbered in creation order)."""

    def __init__(self, sysfs: Path) -> None:
        self.sysfs = sysfs
        self.cls = sysfs / "class/hwmon"
        self.cls.mkdir(parents=True, exist_ok=True)
        self.chips: list[HwmonChip] = []

    def add_chip(self, name: str, parent: str) -> HwmonChip:
        """A chip named ``name`` under the device ``parent`` (a path below ``devices/``)."""
        index = len(self.chips)
        device = self.sysfs / "devices" / parent
        chip = HwmonChip(device / "hwmon" / f"hwmon{index}", index, name)
        (chip.path / "device").symlink_to(os.path.relpath(device, chip.path))
        (self.cls / chip.hwmon).symlink_to(os.path.relpath(chip.path, self.cls))
        self.chips.append(chip)
        return chip

    def alias(self, chip: HwmonChip, link: str) -> None:
        """A second entry in ``class/hwmon`` for the same chip (a walker must count it once)."""
        (self.cls / link).symlink_to(os.path.relpath(chip.path, self.cls))

    # ---- chips as real drivers register them ----------------------------------------------------------------------

    def power_meter(self, watts: float = 180.0, interval_ms: int = 1000) -> HwmonChip:
        """The ACPI 4.0 power meter (driver acpi_power_meter): ``power1_average`` over ``power1_average_interval``."""
        chip = self.add_chip("power_meter", ACPI_METER_PARENT)
        chip.power(1, watts, average=True, interval_ms=interval_ms)
        _write(chip.path / "power1_is_battery", "0\n")
        return chip

    def pmbus_psu(
        self, pin_w: float = 250.0, pout_w: float = 230.0, *, name: str = "pmbus", bus: int = 3, addr: int = 0x58
    ) -> HwmonChip:
        """A PMBus power supply (pmbus core: ``power1_label`` "pin", ``power2_label`` "pout1")."""
        chip = self.add_chip(name, f"platform/i2c-{bus}/{bus}-{addr:04x}")
        chip.power(1, pin_w, label="pin")
        chip.power(2, pout_w, label="pout1")
        return chip

    def amdgpu(self, watts: float = 95.0) -> HwmonChip:
        """A GPU's own sensor (``power1_average`` labelled "PPT"): a component, never the platform."""
        chip = self.add_chip("amdgpu", PCI_GPU_PARENT)
        chip.power(1, watts, label="PPT", average=True)
        return chip

    def cpu_energy(self, joules: float = 1000.0, name: str = "amd_energy") -> HwmonChip:
        """A CPU's energy counters (amd_energy's ``energyN_input``): a component, never the platform."""
        chip = self.add_chip(name, PCI_CPU_PARENT)
        chip.energy(1, joules, label="Esocket0")
        return chip

    def nvme(self) -> HwmonChip:
        chip = self.add_chip("nvme", PCI_NVME_PARENT)
        _write(chip.path / "temp1_input", "38850\n")
        return chip
