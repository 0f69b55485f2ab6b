"""IPMI power readings decoded, without IO: DCMI Get Power Reading and the choice of SDR sensors in watts.

DCMI Get Power Reading (DCMI 1.5, section 6.6.1): netfn 0x2C (group extension), command 0x02, request
``DC 01 00 00`` (group id, mode 1 "system power statistics", two zero bytes). The response data after the
completion code is 18 bytes::

    0      group extension id 0xDC
    1-2    current power, watts (LSB first)
    3-4    minimum power over the statistics period
    5-6    maximum power over the statistics period
    7-8    average power over the statistics period
    9-12   IPMI timestamp of the reading (seconds since 1970, LSB first)
    13-16  statistics reporting period, milliseconds (LSB first)
    17     power reading state: bit 6 set = power measurement active

The average is used when the statistics period is short (at most twice the poll period): it is then the mean over
the time since the previous poll. Many BMCs report statistics since their last reset (days): their average says
nothing about the last seconds, so the current reading is used instead. 0xFFFF is the BMC's "no reading" value.

SDR sensors: a threshold sensor whose base unit is watts (unit code 6, without a rate, a modifier unit or a
percentage) measures power. Which of them is the whole machine is not in the SDR, so the rule is explicit: the
names configured in ``ipmi.sensors``; else the only watt sensor; else the one whose name says it is the system's
total (``Pwr Consumption``, ``Sys Power``, ``Power Meter``, ``Total Power`` ...); else every power-supply input
(``PS1 Input Power``, ``PSU2 In Power``), summed. Anything else is ambiguous and the error lists the candidates.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from carbond.sensors.platform import Rejected, Sample, watts

NETFN_DCMI = 0x2C
CMD_GET_POWER_READING = 0x02
DCMI_GROUP = 0xDC
#: Group id, mode 0x01 (system power statistics), mode attributes, reserved.
POWER_READING_REQUEST = (DCMI_GROUP, 0x01, 0x00, 0x00)
POWER_READING_LENGTH = 18
STATE_ACTIVE = 0x40
#: The 16-bit "no reading" value many BMCs give while their meter is not ready.
NO_READING = 0xFFFF

NETFN_SENSOR = 0x04
CMD_GET_SENSOR_READING = 0x2D
UNIT_WATTS = 6

#: Names of a sensor that measures the whole system (lower case, searched in the sensor's name).
_TOTAL = re.compile(r"consum|sys(tem)?[ _-]?(input[ _-]?)?p(owe)?r|total[ _-]?p(owe)?r|power[ _-]?meter|platform|node")
_PSU = re.compile(r"\b(ps|psu|pws|pwr ?supply|power ?supply)[ _-]?\d+")
_INPUT = re.compile(r"\bin(put)?\b")


@dataclass(frozen=True, slots=True)
class PowerReading:
    """One decoded DCMI power reading."""

    current_w: int
    minimum_w: int
    maximum_w: int
    average_w: int
    timestamp: int
    period_ms: int
    active: bool


class DcmiUnsupported(Exception):
    """The BMC does not implement DCMI Get Power Reading (a completion code, or a response of another shape)."""


def decode_power_reading(code: int, data: bytes | bytearray | Sequence[int], error: str = "") -> PowerReading:
    """The reading in a Get Power Reading response (``data`` without the completion code; ``error`` the library's
    text for a non-zero code)."""
    if code != 0:
        raise DcmiUnsupported(f"completion code 0x{code:02X}" + (f", {error}" if error else ""))
    raw = bytes(data)
    if len(raw) < POWER_READING_LENGTH or raw[0] != DCMI_GROUP:
        raise DcmiUnsupported(f"not a DCMI power reading: {raw[: POWER_READING_LENGTH + 2].hex(' ')}")
    _, current, minimum, maximum, average, stamp, period, state = struct.unpack_from("<BHHHHIIB", raw)
    return PowerReading(current, minimum, maximum, average, stamp, period, bool(state & STATE_ACTIVE))


def power_sample(reading: PowerReading, interval_s: float, max_watts: float) -> Sample:
    """The :class:`Sample` a reading gives (the rules in the module docstring), or :class:`Rejected`."""
    if not reading.active:
        raise Rejected("inactive", "the BMC reports its power measurement inactive (reading state bit 6 clear)")
    period_s = reading.period_ms / 1000.0
    if 0 < period_s <= 2 * interval_s and reading.average_w != NO_READING:
        value, period = reading.average_w, period_s
    else:
        value, period = reading.current_w, None
    if value == NO_READING:
        raise Rejected("implausible", "0xFFFF W: the BMC's no-reading value")
    return Sample(watts=watts(value, max_watts), period_s=period)


@dataclass(frozen=True, slots=True)
class SdrSensor:
    """What carbond needs of one SDR sensor record."""

    key: str  # pyghmi's "owner.number.lun"
    name: str
    type_name: str  # "Power", "Current", "Power Supply", "Temperature" ...
    unit: str  # pyghmi's unit text: "W", "°C", "% W", "W/hour" ...
    watts: bool  # base unit watts, no rate, modifier unit or percentage


def slug(name: str) -> str:
    """A sensor name as a device label: ``PS1 Input Power`` -> ``ps1-input-power``."""
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-") or "sensor"


def select_sensors(sensors: Sequence[SdrSensor], names: Sequence[str]) -> tuple[dict[str, SdrSensor], str]:
    """Device name -> sensor for the watt sensors that measure the machine, and how they were chosen; LookupError
    with the reason when none fits (the rule is in the module docstring)."""
    power = [s for s in sensors if s.watts]
    listed = ", ".join(repr(s.name) for s in power) or "none"
    if names:
        by_name = {s.name.strip().lower(): s for s in sensors}
        chosen: list[SdrSensor] = []
        for wanted in names:
            found = by_name.get(wanted.strip().lower())
            if found is None:
                raise LookupError(f"no SDR sensor named {wanted!r} (sensors in watts: {listed})")
            if not found.watts:
                raise LookupError(f"SDR sensor {found.name!r} reads in {found.unit or 'no unit'!r}, not watts")
            if found not in chosen:
                chosen.append(found)
        how = "configured"
    elif not power:
        raise LookupError("no SDR sensor in watts")
    elif len(power) == 1:
        chosen, how = power, "the only sensor in watts"
    elif len(total := [s for s in power if _TOTAL.search(s.name.lower())]) == 1:
        chosen, how = total, "named as the system total"
    elif inputs := [s for s in power if _PSU.search(s.name.lower()) and _INPUT.search(s.name.lower())]:
        chosen, how = inputs, "power-supply inputs, summed"
    else:
        raise LookupError(f"several SDR sensors in watts ({listed}): name the whole machine's in ipmi.sensors")
    if len(chosen) == 1:
        return {"bmc": chosen[0]}, how
    devices: dict[str, SdrSensor] = {}
    for s in chosen:
        base = name = slug(s.name)
        n = 2
        while name in devices:
            name, n = f"{base}-{n}", n + 1
        devices[name] = s
    return devices, how
