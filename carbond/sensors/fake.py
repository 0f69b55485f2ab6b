"""A deterministic sensor for demos and tests: each device draws a constant power.

Selected with ``sensors: [fake]`` and configured by the ``fake`` section
(``devices: [{device, kind, watts, in_node_total}]``). Energy is ``watts x (clock() - start)``, so with an
injected clock every figure downstream is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from carbond.errors import SensorReadError
from carbond.model import DeviceClass, Kind, Reading
from carbond.sensors.base import BackendOptions, Clock

_CLASS_OF_KIND: dict[str, DeviceClass] = {
    "cpu": "cpu",
    "psys": "cpu",
    "soc": "cpu",
    "dram": "dram",
    "ram": "dram",
    "gpu": "gpu",
}


@dataclass(frozen=True, slots=True)
class FakeDevice:
    device: str
    kind: Kind
    watts: float
    in_node_total: bool = True


class FakeSensor:
    """Constant-power devices; ``fail_next(n)`` makes the next n reads fail (for fault tests)."""

    name = "fake"

    def __init__(self, devices: Sequence[FakeDevice], clock: Clock) -> None:
        self._devices = tuple(devices)
        self._clock = clock
        self._start: float | None = None
        self._failures = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        if self._start is None:
            return frozenset()
        return frozenset(_CLASS_OF_KIND[d.kind] for d in self._devices)

    def fail_next(self, count: int = 1) -> None:
        self._failures += count

    async def start(self) -> None:
        self._start = self._clock()

    async def read(self) -> Sequence[Reading]:
        if self._start is None:
            raise SensorReadError("fake sensor read before start")
        if self._failures:
            self._failures -= 1
            raise SensorReadError("injected failure")
        now = self._clock()
        elapsed = now - self._start
        return [
            Reading(d.device, d.kind, d.watts * elapsed, now, measured=False, in_node_total=d.in_node_total)
            for d in self._devices
        ]

    async def close(self) -> None:
        self._start = None


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def create(opts: BackendOptions) -> FakeSensor:
    section = opts.section
    raw = _field(section, "devices") if section is not None else []
    devices = [
        FakeDevice(
            device=str(_field(d, "device")),
            kind=_field(d, "kind"),
            watts=float(_field(d, "watts")),
            in_node_total=bool(_field(d, "in_node_total")),
        )
        for d in raw
    ]
    return FakeSensor(devices, opts.clock)
