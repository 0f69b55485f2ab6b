"""What every platform source shares: devices that tell what the whole machine draws at the wall.

A platform source (a BMC over IPMI or Redfish, an ACPI or PMBus power meter in hwmon, a UPS, a smart plug) is slow,
remote or both. So it never runs in the tick: :class:`PlatformSensor` polls its :class:`Source` in a background task
at the source's own period (no faster than the device allows, with a timeout per call), checks every value and turns
the accepted ones into a cumulative energy per device. ``read()`` only looks at what the poller collected.

Energy, in order of preference:

1. the device's own energy counter (a plug's ``aenergy.total``, hwmon ``energyN_input``): its deltas, a reset or a
   step back taken as a new baseline (no energy for that interval, never a negative or a spike);
2. the device's power averaged over a period it states (DCMI's statistics period, ``power1_average``): the average
   times the time since the previous sample;
3. an instantaneous power: the trapezoid between two consecutive samples.

A sample older than ``STALE_INTERVALS`` poll periods is never reused: the device is reported down (the monitor then
falls back to the component sum), and the interval across the gap gives no energy. Rejected values (NaN, negative,
zero, above ``max_watts``, not in watts) are counted per reason and logged once per change of reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Protocol

from pydantic import Field

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import DeviceClass, DeviceDown, DeviceInfo, Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Clock, Settings

log = get_logger("carbond.sensors.platform")

#: A sample older than this many poll periods is stale: never reused for energy.
STALE_INTERVALS = 2.5
#: Above this a single machine's reading is taken for a sentinel or a parse error (0xFFFF = 65535 W is common).
MAX_WATTS = 20_000.0


class PlatformSettings(Settings):
    """Keys every platform section has (each backend's section adds its own)."""

    interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0  # poll period; raised to the device's minimum
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0  # per call to the device
    max_watts: Annotated[float, Field(gt=0, le=1_000_000)] = MAX_WATTS  # above: rejected as implausible


class Rejected(Exception):
    """A value the device gave that is not a usable power or energy; ``reason`` is a short stable label
    (``nan``, ``negative``, ``zero``, ``implausible``, ``unit``, ``format``, ``counter_reset``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Backoff(Exception):
    """The device asked us to wait (HTTP 429/503 with Retry-After): no poll before ``seconds``."""

    def __init__(self, seconds: float, detail: str) -> None:
        super().__init__(detail)
        self.seconds = seconds
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Sample:
    """One device's reading at one poll. Give whichever the device has: ``energy_j`` (its own cumulative counter,
    joules), ``watts`` with ``period_s`` (a mean over that period, ending now) or ``watts`` alone (instantaneous)."""

    watts: float | None = None
    energy_j: float | None = None
    period_s: float | None = None


class Source(Protocol):
    """One platform device family. ``open`` finds the devices (raise SensorUnavailable with the reason) and returns
    how they were found, for ``probe``; ``sample`` reads them all once (raise SensorReadError, Rejected or Backoff);
    ``min_interval_s`` is the fastest the device allows to be polled."""

    name: str
    min_interval_s: float

    async def open(self) -> str: ...

    async def sample(self) -> Mapping[str, Sample]: ...

    async def close(self) -> None: ...


def watts(value: object, max_watts: float = MAX_WATTS, unit: str = "W") -> float:
    """``value`` as a plausible power in watts, or :class:`Rejected` with the reason."""
    if unit.strip().lower() not in {"w", "watt", "watts"}:
        raise Rejected("unit", f"reading in {unit!r}, not watts")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Rejected("format", f"not a number: {value!r}"[:120])
    try:
        w = float(value)
    except ValueError:
        raise Rejected("format", f"not a number: {value!r}"[:120]) from None
    if math.isnan(w) or math.isinf(w):
        raise Rejected("nan", repr(value))
    if w < 0:
        raise Rejected("negative", f"{w} W")
    if w == 0:
        raise Rejected("zero", "0 W: a running machine never draws nothing (meter idle or not wired)")
    if w > max_watts:
        raise Rejected("implausible", f"{w} W above max_watts {max_watts}")
    return w


class Integrator:
    """Cumulative joules of one device from its samples (the rules in the module docstring)."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.joules = 0.0
        self.at: float | None = None  # monotonic time of the last accepted sample
        self.watts: float | None = None
        self._counter: float | None = None
        self.baseline = True  # the last sample only set a baseline (first sample, or after a gap or reset)
        self.gap_since_read = True  # a baseline happened since the tick last read this device
        self.method = ""

    def add(self, s: Sample, now: float, max_watts: float) -> None:
        gap = None if self.at is None else now - self.at
        fresh = gap is not None and 0 < gap <= self.stale_after_s
        if s.energy_j is not None:
            self.method = "energy counter"
            if math.isnan(s.energy_j) or s.energy_j < 0:
                raise Rejected("nan" if math.isnan(s.energy_j) else "negative", f"energy {s.energy_j} J")
            previous, self._counter = self._counter, s.energy_j
            if previous is not None and s.energy_j < previous:
                self._restart(now, s)
                raise Rejected("counter_reset", f"energy counter went from {previous:.0f} J to {s.energy_j:.0f} J")
            delta = None if previous is None else s.energy_j - previous
            if delta is not None and gap and delta / gap > max_watts:
                self._restart(now, s)
                raise Rejected("implausible", f"{delta:.0f} J in {gap:.1f} s")
            if fresh and delta is not None:
                self.joules += delta
                self.baseline = False
            else:
                self._gap()
        else:
            w = watts(s.watts, max_watts)
            if fresh and gap is not None:
                if s.period_s is not None:
                    self.method = "device average"
                    self.joules += w * gap
                else:
                    self.method = "power integration"
                    self.joules += (w + (self.watts if self.watts is not None else w)) / 2 * gap
                self.baseline = False
            else:
                self._gap()
        if s.watts is not None and not math.isnan(s.watts):
            self.watts = s.watts
        self.at = now

    def _gap(self) -> None:
        self.baseline = self.gap_since_read = True

    def _restart(self, now: float, s: Sample) -> None:
        self._counter = s.energy_j
        self.at = now
        self._gap()


class PlatformSensor:
    """A :class:`Source` polled in the background, read by the tick (see the module docstring)."""

    inline = True  # read() only looks at what the poller collected

    def __init__(self, source: Source, settings: PlatformSettings, clock: Clock, model: str = "") -> None:
        self.name = source.name
        self._source = source
        self._settings = settings
        self._clock = clock
        self.interval_s = max(settings.interval_s, source.min_interval_s)
        self._stale_after = STALE_INTERVALS * self.interval_s
        self._devices: dict[str, Integrator] = {}
        self._task: asyncio.Task[None] | None = None
        self._model = model or source.name
        self.found = ""  # how the source was found (probe)
        self.errors = 0
        self.rejected: Counter[str] = Counter()  # reason -> count
        self._last_problem = ""
        self._not_before = 0.0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"platform"}) if self._task else frozenset()

    async def start(self) -> None:
        self.found = await self._source.open()
        try:
            await self._poll_once()
        except Exception:
            await self._source.close()
            raise
        if not any(i.at is not None for i in self._devices.values()):  # every device's first sample rejected
            await self._source.close()
            raise SensorUnavailable(self.name, f"{self.found}: no usable power reading ({self._last_problem})")
        self._task = asyncio.create_task(self._run(), name=f"platform-{self.name}")

    async def _poll_once(self) -> None:
        """One poll: every device's sample checked and integrated; a failure is counted and logged on change."""
        now = self._clock()
        if now < self._not_before:
            return
        try:
            samples = await asyncio.wait_for(self._source.sample(), self._settings.timeout_s)
        except TimeoutError:
            self._problem("timeout", f"no answer within {self._settings.timeout_s} s")
            return
        except Backoff as exc:
            self._not_before = self._clock() + exc.seconds
            self._problem("backoff", f"{exc.detail}; next poll in {exc.seconds:.0f} s")
            return
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            self._problem(exc.reason, exc.detail)
            return
        except (SensorReadError, OSError) as exc:
            self._problem("error", str(exc))
            return
        now = self._clock()
        rejected = False
        for device, sample in samples.items():  # every device is offered its sample, whatever its neighbours gave
            integ = self._devices.get(device) or self._devices.setdefault(device, Integrator(self._stale_after))
            try:
                integ.add(sample, now, self._settings.max_watts)
            except Rejected as exc:
                self.rejected[exc.reason] += 1
                self._problem(exc.reason, f"{device}: {exc.detail}")
                rejected = True
        if not rejected:
            self._recovered()

    def _problem(self, reason: str, detail: str) -> None:
        self.errors += 1
        text = f"{reason}: {detail}" if detail else reason
        if reason != self._last_problem.split(":", 1)[0]:
            log.warning("platform_reading_failed", sensor=self.name, reason=reason, detail=detail[:300])
        self._last_problem = text

    def _recovered(self) -> None:
        if self._last_problem:
            log.info("platform_reading_recovered", sensor=self.name, after=self._last_problem[:300])
            self._last_problem = ""

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._poll_once()
            except Exception as exc:  # noqa: BLE001 - a backend bug must not end the poller: counted and logged like a failure
                self._problem("error", f"{type(exc).__name__}: {exc}")

    def describe(self) -> list[tuple[str, float | None, str]]:
        """For ``carbond probe``: each device's last accepted power (None if none), and how it is read and found."""
        how = f"every {self.interval_s:g} s; {self.found}"
        return [(d, i.watts, f"{i.method or 'no reading yet'}, {how}") for d, i in self._devices.items()]

    async def read(self, host: HostSample) -> SensorRead:
        now = self._clock()
        readings: list[Reading] = []
        down: list[DeviceDown] = []
        for device, integ in self._devices.items():
            if integ.at is None or now - integ.at > self._stale_after:
                age = "never" if integ.at is None else f"{now - integ.at:.0f} s ago"
                why = self._last_problem or "no new reading"
                down.append(DeviceDown(device, "platform", f"last reading {age} ({why})"))
                integ.gap_since_read = True  # the gap gives no energy
                continue
            gap, integ.gap_since_read = integ.gap_since_read, False
            readings.append(Reading(device, "platform", integ.joules, integ.at, in_node_total=False, baseline=gap))
        if not readings:
            raise SensorReadError(f"{self.name}: " + "; ".join(d.reason for d in down))
        info = tuple(DeviceInfo(d, self._model, sensor=self.name, method=i.method) for d, i in self._devices.items())
        return SensorRead(tuple(readings), device_info=info, down=tuple(down))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._source.close()
