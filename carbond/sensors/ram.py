"""DRAM power model, used only where no RAPL dram domain is readable.

``P = watts_per_gb x installed GiB`` with 0.375 W per GB by default: about 3 W per 8 GB DDR4 module, the figure
memory makers give for a module under typical load (Crucial/Micron, "How much power does memory use?"). The
model is linear, so it grows with memory size (CodeCarbon's per-DIMM heuristic is not: it gives less for 256 GB
than for 192 GB). Installed memory is ``MemTotal`` of ``/proc/meminfo``; energy is ``P x`` monotonic time since
start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from carbond.errors import SensorUnavailable
from carbond.model import DeviceClass, Reading, SensorRead
from carbond.procfs import HostSample, mem_total_bytes
from carbond.sensors.base import Backend, Clock, Context, Settings

DEFAULT_WATTS_PER_GB = 0.375


class RamSettings(Settings):
    """The ``ram`` config section."""

    watts_per_gb: Annotated[float, Field(gt=0, le=10)] = DEFAULT_WATTS_PER_GB


def ram_power_w(mem_bytes: int, watts_per_gb: float = DEFAULT_WATTS_PER_GB) -> float:
    return watts_per_gb * mem_bytes / 2**30


class RamSensor:
    name = "ram"
    inline = True

    def __init__(self, procfs: Path, clock: Clock, watts_per_gb: float = DEFAULT_WATTS_PER_GB) -> None:
        self._procfs = procfs
        self._clock = clock
        self._watts_per_gb = watts_per_gb
        self.power_w = 0.0
        self._t0: float | None = None

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"dram"}) if self._t0 is not None else frozenset()

    async def start(self) -> None:
        try:
            mem = mem_total_bytes((self._procfs / "meminfo").read_bytes())
        except (OSError, ValueError) as exc:
            raise SensorUnavailable("ram", f"cannot read MemTotal from {self._procfs}/meminfo: {exc}") from None
        self.power_w = ram_power_w(mem, self._watts_per_gb)
        self._t0 = self._clock()

    async def read(self, host: HostSample) -> SensorRead:
        assert self._t0 is not None, "read before start"
        now = self._clock()
        return SensorRead((Reading("ram-0", "ram", self.power_w * (now - self._t0), now, measured=False),))

    async def close(self) -> None:
        self._t0 = None


def create(settings: RamSettings, ctx: Context) -> RamSensor:
    return RamSensor(ctx.paths.procfs, ctx.clock, settings.watts_per_gb)


BACKEND = Backend(frozenset({"dram"}), RamSettings, create)
