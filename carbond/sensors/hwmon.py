"""What the whole machine draws, from the kernel's hwmon class: an ACPI power meter or the PMBus power supplies.

Chips are the directories ``<sysfs>/class/hwmon/hwmonN`` (symlinks into ``devices/``, de-duplicated by real path;
attributes in ``hwmonN/device/`` as in the old ABI are read too), each identified by its ``name`` file. Values follow
Documentation/hwmon/sysfs-interface.rst: ``powerN_input`` and ``powerN_average`` in microwatts,
``powerN_average_interval`` in milliseconds, ``energyN_input`` in microjoules (cumulative), ``powerN_label`` /
``energyN_label`` naming the channel.

Which chips are the platform (every channel taken is one device; the monitor sums them as the machine's draw):

- ``hwmon.devices`` empty (the default): the ACPI 4.0 power meter (``name`` = ``power_meter``,
  Documentation/hwmon/acpi_power_meter.rst) if there is one, since it already measures the whole system; otherwise
  the input channels of every PMBus power supply (``name`` = ``pmbus`` or a PSU driver's name, see
  :data:`PSU_NAMES`), one device per PSU input (``psu-hwmon3-pin``). A PMBus voltage regulator on the board (its
  ``pin`` feeds one CPU) is not a PSU and is never picked automatically.
- ``hwmon.devices`` set: exactly the chips whose ``name``, or the channels whose label or device name
  (``psu-hwmon3-pin``), match an entry; an entry that matches nothing makes the sensor unavailable (a platform sum
  missing a part would be wrong).
- Never, whatever the config says: a chip of :data:`COMPONENT_NAMES` (a CPU, GPU or disk measuring itself: amdgpu,
  k10temp, zenpower, amd_energy, nvme ...; their power is a component inside the platform), or a channel labelled
  as an output (``pout``, "Power Out"): a PSU's output is its input minus its losses, counting it would count
  the load twice. On a chip with labelled input channels ("pin", "Power In", "PIN") only those count.
- On one chip, energy counters (``energyN_input``) are taken in preference to power channels; a counter that steps
  back is a reset, handled by the platform frame (rejected as ``counter_reset``, a new baseline, no energy spike).
  Otherwise ``powerN_average`` (a mean over ``powerN_average_interval``) is preferred to ``powerN_input``.

Reads are sysfs files, possibly behind a slow I2C bus: they run in a worker thread, one call at a time
(:class:`BlockingCalls`), so a read stuck in the kernel never blocks the loop nor piles up threads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.sensors.base import Backend, BlockingCalls, Context, Sensor
from carbond.sensors.platform import PlatformSensor, PlatformSettings, Rejected, Sample

NAME = "hwmon"
ACPI_METER = "power_meter"
#: PMBus power-supply drivers as their chips name themselves (the I2C client name; prefixes match).
PSU_NAMES: tuple[str, ...] = (
    "pmbus",
    "ibm_cffps",
    "ibm-cffps",
    "ipsps",
    "inspur",
    "pfe1100",
    "pfe3000",
    "dps",
    "fsp3y",
    "fsg032",
    "acbel",
    "crps",
    "psu",
)
#: Chips that measure one component of the machine: never the platform.
COMPONENT_NAMES: frozenset[str] = frozenset(
    {
        "amdgpu",
        "radeon",
        "nouveau",
        "i915",
        "xe",
        "k10temp",
        "zenpower",
        "zenergy",
        "amd_energy",
        "fam15h_power",
        "coretemp",
        "nvme",
        "drivetemp",
        "peci_cputemp",
        "peci_dimmtemp",
        "spd5118",
    }
)
_INPUT = re.compile(r"^(p|e|power|energy)[ _-]?in(put)?[ _-]?\d*$", re.IGNORECASE)
_OUTPUT = re.compile(r"^(p|e|power|energy)[ _-]?out(put)?[ _-]?\d*$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(power|energy)(\d+)_(input|average)$")


class HwmonSettings(PlatformSettings):
    """The ``hwmon`` config section."""

    #: chip names, channel labels or device names that make the platform; empty: auto-detection (module docstring)
    devices: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 5.0

    @field_validator("devices")
    @classmethod
    def _no_components(cls, value: list[str]) -> list[str]:
        bad = [d for d in value if d in COMPONENT_NAMES]
        if bad:
            raise ValueError(f"{', '.join(bad)} measure a component (CPU, GPU, disk), never the whole machine")
        return value


def role(label: str) -> Literal["input", "output", ""]:
    """``input`` for a PSU/meter input channel label, ``output`` for an output, ``""`` otherwise."""
    label = label.strip()
    if _INPUT.match(label):
        return "input"
    if _OUTPUT.match(label):
        return "output"
    return ""


def is_psu(name: str) -> bool:
    """A power supply's chip by its driver's name (a prefix of :data:`PSU_NAMES`, or "psu" anywhere in it)."""
    return name not in COMPONENT_NAMES and ("psu" in name or name.startswith(PSU_NAMES))


@dataclass(frozen=True, slots=True)
class Channel:
    device: str  # the reading's device name
    value: Path  # energyN_input, powerN_average or powerN_input
    kind: Literal["energy", "power"]
    interval: Path | None  # powerN_average_interval (ms), for an average
    label: str


@dataclass(frozen=True, slots=True)
class Chip:
    hwmon: str  # hwmonN of its real directory
    name: str
    channels: tuple[Channel, ...]  # the usable ones (outputs dropped, energy preferred), in channel order
    has_input_label: bool


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _chip(link: Path) -> Chip | None:
    real = link.resolve()
    attrs = real if (real / "name").is_file() else real / "device"
    try:
        name = _read(attrs / "name")
    except OSError:
        return None
    prefix = "psu" if is_psu(name) and name != ACPI_METER else name
    found: dict[str, list[Channel]] = {"energy": [], "power": []}
    for group, n, what in sorted(
        (m[1], int(m[2]), m[3]) for p in attrs.iterdir() if (m := _CHANNEL.match(p.name)) is not None
    ):
        kind: Literal["energy", "power"] = "energy" if group == "energy" else "power"
        if kind == "power" and what == "input" and (attrs / f"power{n}_average").exists():
            continue  # the average is preferred
        try:
            label = _read(attrs / f"{kind}{n}_label")
        except OSError:
            label = ""
        if role(label) == "output":
            continue
        interval = attrs / f"power{n}_average_interval" if what == "average" else None
        stem = re.sub(r"[^A-Za-z0-9_.]+", "_", label).strip("_").lower() if label else f"{kind}{n}"
        device = f"{prefix}-{real.name}-{stem}"
        found[kind].append(Channel(device, attrs / f"{kind}{n}_{what}", kind, interval, label))
    channels = found["energy"] or found["power"]  # a chip's energy counters are preferred to its power
    inputs = [c for c in channels if role(c.label) == "input"]
    return Chip(real.name, name, tuple(inputs or channels), bool(inputs))


def discover(sysfs: Path) -> list[Chip]:
    """Every hwmon chip once (class entries de-duplicated by real path), in hwmonN order."""
    cls = sysfs / "class/hwmon"
    if not cls.is_dir():
        raise SensorUnavailable(NAME, f"no hwmon class at {cls}")
    seen: dict[Path, Path] = {}
    for link in cls.iterdir():
        seen.setdefault(link.resolve(), link)
    chips = [c for c in map(_chip, seen.values()) if c is not None]
    return sorted(chips, key=lambda c: (len(c.hwmon), c.hwmon))


def select(chips: list[Chip], wanted: list[str]) -> tuple[list[Channel], str]:
    """The platform's channels and how they were chosen (the rules in the module docstring)."""
    usable = [c for c in chips if c.name not in COMPONENT_NAMES and c.channels]
    if wanted:
        chosen: list[Channel] = []
        for entry in wanted:
            key = entry.lower()
            hits = [
                ch
                for chip in usable
                for ch in chip.channels
                if chip.name.lower() == key or ch.label.lower() == key or ch.device.lower() == key
            ]
            if not hits:
                raise SensorUnavailable(
                    NAME, f"hwmon.devices entry {entry!r} matches no usable chip ({_listing(chips)})"
                )
            chosen += [h for h in hits if h not in chosen]
        return chosen, "configured hwmon.devices " + ", ".join(wanted)
    meters = [c for c in usable if c.name == ACPI_METER]
    if meters:
        return [ch for c in meters for ch in c.channels], "ACPI power meter " + ", ".join(c.hwmon for c in meters)
    psus = [c for c in usable if is_psu(c.name) and c.has_input_label]
    if psus:
        return [ch for c in psus for ch in c.channels], "PMBus power-supply inputs of " + ", ".join(
            f"{c.hwmon} ({c.name})" for c in psus
        )
    raise SensorUnavailable(
        NAME, f"no ACPI power meter or PMBus power-supply input ({_listing(chips)}); name one in hwmon.devices"
    )


def _listing(chips: list[Chip]) -> str:
    def what(c: Chip) -> str:
        return "component" if c.name in COMPONENT_NAMES else f"power/energy channels: {len(c.channels)}"

    return "chips: " + (", ".join(f"{c.hwmon} {c.name} ({what(c)})" for c in chips) or "none")


def _number(path: Path) -> int:
    text = _read(path)
    try:
        return int(text)
    except ValueError:
        raise Rejected("format", f"{path.name}: not an integer: {text[:40]!r}") from None


def read_channels(channels: list[Channel]) -> dict[str, Sample]:
    """One sample per channel (blocking: sysfs reads); OSError becomes SensorReadError naming the file."""
    out: dict[str, Sample] = {}
    for ch in channels:
        try:
            micro = _number(ch.value)
            if ch.kind == "energy":
                out[ch.device] = Sample(energy_j=micro / 1e6)
                continue
            period = None
            if ch.interval is not None:
                try:
                    period = _number(ch.interval) / 1000 or None
                except (OSError, Rejected):
                    period = None  # an average over an unknown period is still a mean power
            out[ch.device] = Sample(watts=micro / 1e6, period_s=period)
        except OSError as exc:
            raise SensorReadError(f"{NAME}: cannot read {ch.value}: {exc.strerror or type(exc).__name__}") from None
    return out


class HwmonSource:
    """The :class:`carbond.sensors.platform.Source` over the chosen hwmon channels."""

    name = NAME
    min_interval_s = 1.0  # PMBus reads cross an I2C bus; ACPI meters average over a second or more

    def __init__(self, sysfs: Path, devices: list[str]) -> None:
        self._sysfs = sysfs
        self._wanted = devices
        self._channels: list[Channel] = []
        self._calls = BlockingCalls(NAME)

    async def open(self) -> str:
        chips = await self._calls(discover, self._sysfs)
        self._channels, how = select(chips, self._wanted)
        return f"{how}: " + ", ".join(f"{ch.device} ({ch.value.name})" for ch in self._channels)

    async def sample(self) -> Mapping[str, Sample]:
        return await self._calls(read_channels, self._channels)

    async def close(self) -> None:
        self._channels = []


def create(settings: HwmonSettings, ctx: Context) -> Sensor:
    source = HwmonSource(ctx.paths.sysfs, list(settings.devices))
    return PlatformSensor(source, settings, ctx.clock, model="hwmon")


BACKEND = Backend(frozenset({"platform"}), HwmonSettings, create)
