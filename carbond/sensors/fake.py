"""A deterministic sensor for demos and tests: each device draws a constant power.

Selected with ``sensors: [fake]`` and configured by the ``fake`` section
(``devices: [{device, kind, watts, in_node_total}]``; a device of kind ``platform`` plays a wall meter). Energy is
``watts x (clock() - start)``, so with an
injected clock every figure downstream is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from carbond.errors import SensorReadError
from carbond.model import NO_SHARES, DeviceClass, Kind, ProcessShares, Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Backend, Clock, Context, Settings

_CLASS_OF_KIND: dict[str, DeviceClass] = {
    "cpu": "cpu",
    "psys": "cpu",
    "soc": "cpu",
    "dram": "dram",
    "ram": "dram",
    "gpu": "gpu",
    "platform": "platform",
}


@dataclass(frozen=True, slots=True)
class FakeDevice:
    device: str
    kind: Kind
    watts: float
    in_node_total: bool = True
    base_j: float = 0.0  # energy offset, so a change of power keeps the energy continuous


class FakeDeviceSettings(Settings):
    device: Annotated[str, Field(min_length=1, max_length=64)]
    kind: Kind
    watts: Annotated[float, Field(ge=0, le=100_000)]
    in_node_total: bool = True


class FakeSettings(Settings):
    """The ``fake`` config section."""

    devices: list[FakeDeviceSettings] = Field(
        default_factory=lambda: [
            FakeDeviceSettings(device="package-0", kind="cpu", watts=40.0),
            FakeDeviceSettings(device="dram-0", kind="dram", watts=6.0),
        ]
    )


class FakeSensor:
    """Constant-power devices; ``fail_next(n)`` makes the next n reads fail (for fault tests)."""

    name = "fake"
    inline = True

    def __init__(self, devices: Sequence[FakeDevice], clock: Clock, process_shares: ProcessShares = NO_SHARES) -> None:
        self._devices = tuple(devices)
        self._clock = clock
        self._shares = process_shares  # what an NVML-like sensor reports of its GPUs' processes
        self._start: float | None = None
        self._failures = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        if self._start is None:
            return frozenset()
        return frozenset(_CLASS_OF_KIND[d.kind] for d in self._devices if d.kind in _CLASS_OF_KIND)

    def fail_next(self, count: int = 1) -> None:
        self._failures += count

    def set_watts(self, device: str, watts: float) -> None:
        """Change a device's power from now on (its energy so far is kept)."""
        now = self._clock()
        assert self._start is not None, "start() first"
        elapsed = now - self._start
        self._devices = tuple(
            FakeDevice(d.device, d.kind, watts, d.in_node_total, d.base_j + d.watts * elapsed - watts * elapsed)
            if d.device == device
            else d
            for d in self._devices
        )

    async def start(self) -> None:
        self._start = self._clock()

    async def read(self, host: HostSample) -> SensorRead:
        if self._start is None:
            raise SensorReadError("fake sensor read before start")
        if self._failures:
            self._failures -= 1
            raise SensorReadError("injected failure")
        now = self._clock()
        elapsed = now - self._start
        return SensorRead(
            tuple(
                Reading(
                    d.device,
                    d.kind,
                    d.base_j + d.watts * elapsed,
                    now,
                    measured=False,
                    in_node_total=d.in_node_total and d.kind != "platform",  # the wall is never a component
                )
                for d in self._devices
            ),
            self._shares,
        )

    async def close(self) -> None:
        self._start = None


def create(settings: FakeSettings, ctx: Context) -> FakeSensor:
    devices = [FakeDevice(d.device, d.kind, d.watts, d.in_node_total) for d in settings.devices]
    return FakeSensor(devices, ctx.clock)


BACKEND = Backend(frozenset({"cpu", "dram", "gpu"}), FakeSettings, create)
