"""A fake BMC behind the pyghmi ``Command`` interface: DCMI Get Power Reading, an SDR, Get Sensor Reading.

``ipmi_sim`` has no DCMI, so the DCMI path is tested here. The response is built field by field from the DCMI 1.5
specification (section 6.6.1, Get Power Reading) independently of carbond's decoder: group extension 0xDC, current,
minimum, maximum and average power (16 bits each, LSB first), IPMI timestamp and statistics reporting period in ms
(32 bits each, LSB first), power reading state (bit 6: measurement active). Responses are dicts shaped like pyghmi's
(``code``, ``data``, ``error`` for a non-zero code). The SDR uses pyghmi's own record decoder on records built by
:func:`carbond.testing.ipmi_sim.full_sensor_record`.

``FakeBmc.connect`` is the ``connect`` argument of :class:`carbond.sensors.ipmi.IpmiSource`; it refuses a wrong
password the way pyghmi does. ``hang()`` makes every call block until ``release()`` (a BMC that stops answering).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from carbond.testing.ipmi_sim import SimSensor, full_sensor_record

GROUP = 0xDC
ACTIVE = 0x40


def power_reading_response(
    current: int, minimum: int, maximum: int, average: int, timestamp: int, period_ms: int, active: bool
) -> bytes:
    """DCMI Get Power Reading response data after the completion code (18 bytes)."""
    out = bytearray([GROUP])
    for watts in (current, minimum, maximum, average):
        out += bytes([watts & 0xFF, (watts >> 8) & 0xFF])
    for word in (timestamp, period_ms):
        out += bytes([(word >> shift) & 0xFF for shift in (0, 8, 16, 24)])
    out.append(ACTIVE if active else 0x00)
    return bytes(out)


@dataclass
class FakeSession:
    logged_out: bool = False

    def logout(self) -> None:
        self.logged_out = True


@dataclass
class FakeSdr:
    """What carbond uses of pyghmi's SDR object: ``sensors`` by id and ``get_sensor_numbers``."""

    sensors: dict[str, Any] = field(default_factory=dict)

    def get_sensor_numbers(self) -> list[str]:
        return list(self.sensors)


class FakeBmc:
    """The BMC's state is public and may be changed between calls; ``calls`` counts (netfn, command) pairs."""

    def __init__(
        self,
        *,
        password: str = "",  # in-band: no password
        dcmi_code: int = 0,
        current: int = 250,
        average: int = 240,
        period_ms: int = 1000,
        active: bool = True,
        sensors: Sequence[SimSensor] = (),
    ) -> None:
        self.password = password
        self.dcmi_code = dcmi_code  # 0xC1: "invalid command", a BMC without DCMI
        self.current = current
        self.minimum = 100
        self.maximum = 400
        self.average = average
        self.timestamp = 1_700_000_000
        self.period_ms = period_ms
        self.active = active
        self.dcmi_data: bytes | None = None  # overrides the encoded response (malformed answers)
        self.failure: str | None = None  # raw_command raises pyghmi's IpmiException with this text
        self.sensors = {s.number: s for s in sensors}
        self.raw = {s.number: s.raw for s in sensors}
        self.calls: list[tuple[int, int]] = []
        self.logins = 0
        self.ipmi_session = FakeSession()
        self._answer = threading.Event()
        self._answer.set()

    def connect(self, password: str) -> FakeBmc:
        exceptions = importlib.import_module("pyghmi.exceptions")
        if not self._answer.wait(timeout=60):
            raise exceptions.IpmiException(None)
        if password != self.password:
            raise exceptions.IpmiException("Incorrect password provided")
        self.logins += 1
        self.ipmi_session = FakeSession()
        return self

    def hang(self) -> None:
        self._answer.clear()

    def release(self) -> None:
        self._answer.set()

    def raw_command(
        self,
        netfn: int,
        command: int,
        bridge_request: Any = (),
        data: Sequence[int] = (),
        delay_xmit: Any = None,
        retry: bool = True,
        timeout: Any = None,
        rslun: int = 0,
    ) -> dict[str, Any]:
        self._answer.wait(timeout=60)
        self.calls.append((netfn, command))
        if self.failure is not None:
            raise importlib.import_module("pyghmi.exceptions").IpmiException(self.failure)
        if (netfn, command) == (0x2C, 0x02) and bytes(data[:2]) == bytes([GROUP, 0x01]):
            if self.dcmi_code:
                return {"netfn": netfn + 1, "command": command, "code": self.dcmi_code, "data": b"", "error": "fail"}
            body = self.dcmi_data
            if body is None:
                body = power_reading_response(
                    self.current, self.minimum, self.maximum, self.average, self.timestamp, self.period_ms, self.active
                )
            return {"netfn": netfn + 1, "command": command, "code": 0, "data": bytearray(body)}
        if (netfn, command) == (0x04, 0x2D) and data and data[0] in self.sensors:
            s = self.sensors[data[0]]
            # Get Sensor Reading: reading, flags (bit 6 scanning enabled), threshold states
            flags = 0x40 if s.readable else 0x00
            return {"netfn": 5, "command": command, "code": 0, "data": bytearray([self.raw[s.number], flags, 0x00])}
        return {"netfn": netfn + 1, "command": command, "code": 0xC1, "data": b"", "error": "Invalid command"}

    def init_sdr(self) -> FakeSdr:
        sdr_module = importlib.import_module("pyghmi.ipmi.sdr")
        consts = importlib.import_module("pyghmi.ipmi.private.constants")
        sdr = FakeSdr()
        for s in self.sensors.values():
            sdr.sensors[f"32.{s.number}.0"] = sdr_module.SDREntry(bytearray(full_sensor_record(s)), consts)
        return sdr
