"""One builder for the :class:`~carbond.monitor.Monitor` the in-process tests drive.

The keyword defaults are what most tests want (host ``h``, 10 s ticks, PUE 1, a fixed intensity of 50 g/kWh, a
1 s sensor timeout); a test names only what it is about. Everything else goes to the Monitor unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypedDict, Unpack

from carbond.attribution.attributor import Attributor
from carbond.embodied import Embodied
from carbond.intensity import FixedIntensity, ManagedIntensity
from carbond.model import Intensity
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.base import Clock, Sensor
from carbond.state import Persistence
from carbond.wallfit import WallCalibration


class MonitorOptions(TypedDict, total=False):
    """The Monitor's optional keywords, passed through unchanged."""

    pue_u: float
    host_reader: HostReader | None
    clock: Clock
    wall_clock: Callable[[], float]
    persistence: Persistence | None
    attributor: Attributor | None
    embodied: Embodied | None
    unavailable: Mapping[str, str] | None
    calibration: WallCalibration | None


#: the intensity the tests' arithmetic uses unless they give their own
FIXED = Intensity(g_per_kwh=50.0, provider="static", zone="FR", observed_at=0.0)


def build_monitor(
    *sensors: Sensor,
    host: str = "h",
    interval_s: float = 10.0,
    pue: float = 1.0,
    intensity: ManagedIntensity | Intensity = FIXED,
    sensor_timeout_s: float = 1.0,
    **options: Unpack[MonitorOptions],
) -> Monitor:
    """A Monitor over ``sensors``; an :class:`Intensity` is wrapped in a :class:`FixedIntensity`."""
    managed = FixedIntensity(intensity) if isinstance(intensity, Intensity) else intensity
    return Monitor(
        list(sensors), host=host, interval_s=interval_s, pue=pue, intensity=managed,
        sensor_timeout_s=sensor_timeout_s, **options,
    )  # fmt: skip
