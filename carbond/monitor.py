"""The poll loop: each tick reads every sensor, folds the readings into the books (:mod:`carbond.accounting`),
splits the tick's energy over cgroups, and publishes an immutable :class:`~carbond.model.Snapshot`.

Time comes from an injected monotonic clock; the schedule is drift-free (tick k starts at t0 + k x interval,
a late tick skips the slots it missed instead of bunching up). A sensor that hangs is cut off by a timeout so the
tick still completes on time; a sensor that fails is marked down and logged once per state change.

The monitor owns no lifecycle: the composition root starts and closes the sensors, the intensity source, the
attributor and the state file around :meth:`Monitor.run`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from carbond.accounting import OTHER_DEVICE, Books, Restored, TickEnergy, account, new_devices
from carbond.attribution.attributor import Attributor
from carbond.embodied import Embodied
from carbond.intensity import ManagedIntensity
from carbond.logs import get_logger
from carbond.model import (
    NO_SHARES,
    CgroupState,
    Devices,
    DeviceState,
    Health,
    HistogramState,
    Intensity,
    IntensityState,
    NodeState,
    ProcessShares,
    Reading,
    SensorRead,
    SensorState,
    Snapshot,
)
from carbond.procfs import HostReader, HostSample
from carbond.sensors.base import Clock, Sensor
from carbond.state import DeviceTotals as SavedTotals
from carbond.state import Persistence, SavedState
from carbond.uncertainty import DeviceTotals, NodeUncertainty, Tracker, device_band, intensity_band
from carbond.wallfit import WallCalibration

log = get_logger("carbond.monitor")

TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: A device whose last reading is older than this many intervals has no power series (never a stale value).
STALE_INTERVALS = 2.5
#: Attribution reads that took less than this run inline next tick (a thread hand-off costs more than they do);
#: slower ones (thousands of cgroups) run in a worker thread so the event loop keeps serving scrapes.
INLINE_SAMPLE_S = 0.002
#: The first published snapshot covers this short interval after the baseline read, so /readyz turns ready with
#: power already known (RAPL counts microjoules; /proc/stat jiffies are 10 ms, so 0.1 s gives 10 per CPU).
FIRST_INTERVAL_S = 0.1


@dataclass(slots=True)
class _SensorHealth:
    up: bool = True
    errors_total: int = 0
    reason: str = ""
    last: SensorRead = field(default_factory=lambda: SensorRead(()))  # the last good read: its device info


class Monitor:
    """Owns the measurement state; ``latest()`` is all the HTTP side ever sees."""

    def __init__(
        self,
        sensors: Sequence[Sensor],
        *,
        host: str,
        interval_s: float,
        pue: float,
        intensity: ManagedIntensity,
        pue_u: float = 0.0,
        sensor_timeout_s: float,
        host_reader: HostReader | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        persistence: Persistence | None = None,
        attributor: Attributor | None = None,
        embodied: Embodied | None = None,
        unavailable: Mapping[str, str] | None = None,
        calibration: WallCalibration | None = None,
    ) -> None:
        self._sensors = list(sensors)
        self._host = host
        self._interval = interval_s
        self._pue = pue
        self._intensity = intensity
        self._timeout = sensor_timeout_s
        self._host_reader = host_reader or HostReader(Path("/proc"))  # closed by its owner (or collected)
        self._clock = clock
        self._wall = wall_clock
        self._health = {s.name: _SensorHealth() for s in self._sensors}
        #: configured sensors that could not start: exported as down, with their reason
        self._unavailable = tuple(SensorState(name, False, 0, reason) for name, reason in (unavailable or {}).items())
        self._persistence = persistence
        self._attributor = attributor
        self._embodied = embodied
        node_j, node_g = persistence.node_totals() if persistence else (0.0, 0.0)
        self._books = Books({}, node_j, node_g)
        self._cgroups: tuple[CgroupState, ...] = ()
        self._seq = 0
        self._final = False  # the last tick before exit: its save is fsynced
        self._attribution_failing = False
        self._sample_inline = True  # attribution reads inline while they are cheap, else in a thread
        self._latest: Snapshot | None = None
        self._hist_counts = [0] * len(TICK_BUCKETS)
        self._hist_count = 0
        self._hist_sum = 0.0
        self._uncertainty = Tracker(pue, pue_u)
        self._calibration = calibration
        self._pue_u = pue_u
        self._node_source = ""  # the platform sensor the node's figure came from last tick ("" = components)
        self._clamping = False
        self._clamped_total = 0
        self._observers: list[Callable[[Snapshot], None]] = []

    def latest(self) -> Snapshot | None:
        return self._latest

    def on_snapshot(self, observer: Callable[[Snapshot], None]) -> None:
        """Call ``observer`` with every snapshot once published, on the tick path: it must be cheap (the Slurm ledger
        adds its sums there and leaves its writes to a thread). One that raises is logged once and dropped: the
        snapshot is published and the daemon goes on."""
        self._observers.append(observer)

    @property
    def attributor(self) -> Attributor | None:
        return self._attributor

    def continue_tick_histogram(self, previous: Monitor) -> None:
        """Carry on ``previous``'s tick-duration histogram: a reload builds a new monitor, but the histogram is the
        process's (a count that fell back would read as a restart, and rate() over it would break)."""
        self._hist_counts = list(previous._hist_counts)
        self._hist_count, self._hist_sum = previous._hist_count, previous._hist_sum

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self._sensors]

    async def prime(self) -> None:
        """Read every sensor once to set baselines, without publishing anything."""
        host = self._host_reader.sample()
        if self._calibration is not None:
            self._calibration.begin_tick(host)
        reads = await self._read_sensors(host)
        intensity, _ = self._intensity.current()
        self._fold(reads, intensity)

    async def tick(self) -> Snapshot:
        """Take one measurement and publish it."""
        started = self._clock()
        host = self._host_reader.sample()  # /proc/stat (and meminfo, if asked for) once for every reader
        cal = self._calibration
        if cal is not None:
            cal.begin_tick(host)
        reads = await self._read_sensors(host)
        intensity, age = self._intensity.current()
        before = self._books
        energy = self._fold(reads, intensity)
        node_u = self._uncertain(before, reads, intensity, energy)
        if self._attributor is not None:
            self._cgroups = await self._attribute(self._attributor, energy, reads, host, intensity)
        now = self._clock()
        devices = self._devices(now, reads)
        node = NodeState(
            power_w=_node_power(devices.states),
            energy_j_total=self._books.node_energy_j_total,
            emissions_g_total=self._books.node_emissions_g_total,
            pue=self._pue,
            embodied_g_total=self._embodied_tick(now, devices),
            platform="" if energy.modelled else energy.platform,
            platform_clamped_total=self._clamped_total,
            power_u_w=node_u.power_u_w,
            energy_u_j_total=node_u.energy_u_j_total,
            emissions_u_g_total=node_u.emissions_u_g_total,
            uncertainty_dominant=node_u.dominant,
            pue_u=self._pue_u,
            calibration=cal.state(energy.modelled) if cal is not None else None,
        )
        await self._save(now)
        self._observe(now - started)
        self._seq += 1
        snap = Snapshot(
            seq=self._seq,
            host=self._host,
            taken_at=now,
            wall_time=self._wall(),
            interval_s=self._interval,
            node=node,
            devices=devices,
            intensity=self._intensity_state(intensity, age),
            health=self._health_state(),
            cgroups=self._cgroups,
        )
        self._latest = snap
        for observer in list(self._observers):
            try:
                observer(snap)
            except Exception as exc:  # noqa: BLE001 - an observer's bug must not stop measuring
                self._observers.remove(observer)
                log.error("snapshot_observer_failed", observer=getattr(observer, "__qualname__", repr(observer)),
                          error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        return snap

    async def _read_sensors(self, host: HostSample) -> list[tuple[Sensor, SensorRead | None]]:
        """Every sensor's read; those that may block run concurrently, each under the timeout."""
        waiting = [s for s in self._sensors if not s.inline]
        done = (  # no gather (a task per sensor) when every sensor reads inline
            dict(zip(waiting, await asyncio.gather(*(self._read(s, host) for s in waiting)), strict=True))
            if waiting
            else {}
        )
        return [(s, done[s] if s in done else await self._read(s, host)) for s in self._sensors]

    async def _read(self, sensor: Sensor, host: HostSample) -> SensorRead | None:
        health = self._health[sensor.name]
        try:
            result = await (sensor.read(host) if sensor.inline else asyncio.wait_for(sensor.read(host), self._timeout))
        except TimeoutError:
            reason = f"read timed out after {self._timeout:g}s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 # any backend failure is data, never a crash
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if not health.up:
                log.info("sensor_recovered", sensor=sensor.name, after_errors=health.errors_total)
            health.up, health.reason, health.last = True, "", result
            return result
        health.errors_total += 1
        if health.up or health.reason != reason:
            log.warning("sensor_read_failed", sensor=sensor.name, reason=reason)
        health.up, health.reason = False, reason
        return None

    def _fold(self, reads: Sequence[tuple[Sensor, SensorRead | None]], intensity: Intensity | None) -> TickEnergy:
        """Account the readings: the books move on by one tick."""
        by_sensor = [(s.name, r.readings) for s, r in reads if r is not None]
        self._books, energy = account(
            self._books,
            by_sensor,
            self._pue,
            intensity.g_per_kwh if intensity is not None else None,
            self._restored(by_sensor),
            self._calibration.predict if self._calibration is not None else None,
        )
        if self._calibration is not None:
            self._calibration.observe(energy, self._books)
        for (sensor, device), delta_j in energy.went_backwards:
            log.warning("energy_went_backwards", sensor=sensor, device=device, delta_j=delta_j)
        self._platform_events(energy, any(r.kind == "platform" for _, rs in by_sensor for r in rs))
        return energy

    def _uncertain(
        self,
        before: Books,
        reads: Sequence[tuple[Sensor, SensorRead | None]],
        intensity: Intensity | None,
        energy: TickEnergy,
    ) -> NodeUncertainty:
        """Carry the uncertainties of this tick's changes (carbond.uncertainty)."""
        info = {(s.name, i.device): i for s, _ in reads for i in self._health[s.name].last.device_info}
        after = self._books.devices
        bands = {key: device_band(key[0], b.kind, info.get(key)) for key, b in after.items()}
        old = {key: DeviceTotals(b.kind, b.in_node_total, b.energy_j_total, 0.0) for key, b in before.devices.items()}
        new = {
            key: DeviceTotals(
                b.kind,
                b.in_node_total,
                b.energy_j_total,
                b.last_at - p.last_at if (p := before.devices.get(key)) else 0.0,
            )
            for key, b in after.items()
        }
        node = (energy.node_j, energy.node_g, self._books.node_energy_j_total, self._books.node_emissions_g_total)
        modelled = self._calibration.uncertainty_j(energy) if self._calibration is not None else None
        return self._uncertainty.advance(old, new, bands, intensity_band(intensity), node, energy.platform, modelled)

    def _platform_events(self, energy: TickEnergy, platform_read: bool) -> None:
        """One log line when the node's source changes (wall vs component sum) and when clamping starts or ends."""
        source = f"{energy.platform} (calibration)" if energy.modelled else energy.platform
        if source != self._node_source and (source or platform_read or self._node_source):
            if energy.modelled:
                log.warning("node_source_calibration", sensor=energy.platform, reason="no fresh platform reading")
            elif energy.platform:
                log.info("node_source_platform", sensor=energy.platform)
            else:
                log.warning("node_source_components", after=self._node_source or "start", reason="no fresh platform")
            self._node_source = source
        if energy.clamped:
            self._clamped_total += 1
        if energy.clamped != self._clamping:
            if energy.clamped:
                log.warning(
                    "platform_below_components",
                    sensor=energy.platform,
                    components_j=round(energy.components_j, 3),
                    node_j=round(energy.node_j, 3),
                )
            else:
                log.info("platform_above_components_again", sensor=energy.platform)
            self._clamping = energy.clamped

    def _restored(self, by_sensor: list[tuple[str, tuple[Reading, ...]]]) -> dict[tuple[str, str], Restored]:
        """Totals from the state file for devices met for the first time in this run."""
        p = self._persistence
        if p is None:
            return {}
        out = {}
        for key, r in new_devices(self._books, by_sensor):
            energy, emissions, gap_j = p.device(f"{key[0]}/{key[1]}", r.raw_j, r.range_j, self._wall())
            if gap_j:
                log.info("downtime_energy_recovered", sensor=key[0], device=key[1], joules=gap_j)
            out[key] = Restored(energy, emissions, gap_j)
        for sensor, readings in by_sensor:  # the derived ``other`` of a platform sensor, restored like a device
            key = (sensor, OTHER_DEVICE)
            if key not in self._books.devices and any(r.kind == "platform" for r in readings):
                energy, emissions, _ = p.device(f"{sensor}/{OTHER_DEVICE}", None, None, self._wall())
                out[key] = Restored(energy, emissions)
        return out

    async def _attribute(
        self,
        attributor: Attributor,
        energy: TickEnergy,
        reads: Sequence[tuple[Sensor, SensorRead | None]],
        host: HostSample,
        intensity: Intensity | None,
    ) -> tuple[CgroupState, ...]:
        g = intensity.g_per_kwh if intensity is not None else None
        shares = _process_shares(reads)
        pids = sorted({pid for s in shares.values() for pid in s})
        try:
            t0 = time.perf_counter()
            if self._sample_inline:
                sample = attributor.sample(host, pids)
            else:
                sample = await asyncio.to_thread(attributor.sample, host, pids)
            self._sample_inline = time.perf_counter() - t0 < INLINE_SAMPLE_S
        except (OSError, ValueError, IndexError) as exc:
            if not self._attribution_failing:
                log.warning("attribution_read_failed", error=str(exc))
            self._attribution_failing = True
            return attributor.account_unread(energy, self._interval, self._pue, g)
        if self._attribution_failing:
            log.info("attribution_read_recovered")
        self._attribution_failing = False
        return attributor.account(sample, energy, self._pue, g, shares)

    def _devices(self, now: float, reads: Sequence[tuple[Sensor, SensorRead | None]]) -> Devices:
        stale_before = now - STALE_INTERVALS * self._interval
        no_u = (0.0, math.nan)
        u = self._uncertainty.devices
        states = tuple(
            DeviceState(
                device=b.device,
                kind=b.kind,
                sensor=b.sensor,
                power_w=b.power_w if b.last_at >= stale_before else math.nan,
                energy_j_total=b.energy_j_total,
                emissions_g_total=b.emissions_g_total,
                measured=b.measured,
                in_node_total=b.in_node_total,
                power_u_w=u.get(key, no_u)[1] if b.last_at >= stale_before else math.nan,
                energy_u_j_total=u.get(key, no_u)[0],
            )
            for key, b in self._books.devices.items()
        )
        info = tuple(i for s in self._sensors for i in self._health[s.name].last.device_info)
        books = self._books.devices
        unread = tuple(
            (d, s.name) for s, r in reads if r is not None for d in r.down if (s.name, d.device) not in books
        )
        return Devices(states, info, _process_shares(reads), unread)

    def _intensity_state(self, intensity: Intensity | None, age: float) -> IntensityState:
        source = self._intensity
        band = intensity_band(intensity)
        return IntensityState(
            intensity,
            age,
            _other_signal(source.values(), intensity),
            source.forecast(),
            source.providers(),
            source.zone,
            source.zone_source,
            band.rel if intensity is not None else math.nan,
            band.term if intensity is not None else "",
        )

    def _health_state(self) -> Health:
        p, a = self._persistence, self._attributor
        return Health(
            sensors=tuple(
                SensorState(s.name, h.up, h.errors_total + h.last.partial_errors, h.reason)
                for s, h in ((s, self._health[s.name]) for s in self._sensors)
            )
            + self._unavailable,
            tick_duration=HistogramState(TICK_BUCKETS, tuple(self._hist_counts), self._hist_count, self._hist_sum),
            pod_names_errors=a.pods.errors_total if a is not None and a.pods is not None else None,
            state_persist_errors=p.errors_total + self._intensity.persist_errors if p is not None else None,
        )

    async def _save(self, now: float) -> None:
        cal = self._calibration
        if cal is not None and (self._final or cal.save_due(now)):
            await asyncio.to_thread(cal.save, now)
        if self._persistence is None:
            return
        if self._final or self._persistence.durable_due(now):  # fsyncs: off the event loop
            await asyncio.to_thread(self._persistence.save, self._state(), True)
        else:  # a small write to the page cache: cheaper inline than a thread hand-off
            self._persistence.save(self._state(), False)

    def _state(self) -> SavedState:
        assert self._persistence is not None
        state = self._persistence.new_state(self._wall())
        restored = self._persistence.restored
        if restored is not None:  # keep devices not met (yet) in this run
            state.devices.update(restored.devices)
        state.node_energy_j_total = self._books.node_energy_j_total
        state.node_emissions_g_total = self._books.node_emissions_g_total
        if self._embodied is not None:
            state.embodied_g_total = self._embodied.saved()
        elif restored is not None:
            state.embodied_g_total = dict(restored.embodied_g_total)
        for (sensor, device), b in self._books.devices.items():
            state.devices[f"{sensor}/{device}"] = SavedTotals(b.energy_j_total, b.emissions_g_total, b.raw_j, b.range_j)
        return state

    def _embodied_tick(self, now: float, devices: Devices) -> tuple[tuple[str, float], ...]:
        if self._embodied is None:
            return ()
        models = {i.device: i.model for i in devices.info}
        return self._embodied.advance(
            now, {d.device: models.get(d.device, "") for d in devices.states if d.kind == "gpu"}
        )

    def _observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        for i in range(bisect.bisect_left(TICK_BUCKETS, seconds), len(TICK_BUCKETS)):
            self._hist_counts[i] += 1
        self._hist_count += 1
        self._hist_sum += seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Tick on a drift-free schedule until ``stop`` is set; take a final tick (its save fsynced) on the way out.

        A first, unpublished read gives every device its baseline, so the first published snapshot (the one that
        makes /readyz say ready) already carries power over a short interval instead of nothing.
        """
        await self.prime()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(FIRST_INTERVAL_S, self._interval))
        start = self._clock()
        k = 0
        loop = asyncio.get_running_loop()
        sleeping: list[asyncio.Future[None]] = []

        def wake(_: object = None) -> None:
            if sleeping and not sleeping[0].done():
                sleeping[0].set_result(None)

        # one waiter for the whole run, and per tick only a future and a timer: the cheapest wake asyncio has
        stopped = asyncio.ensure_future(stop.wait())
        stopped.add_done_callback(wake)
        while not stop.is_set():
            await self.tick()
            k += 1
            now = self._clock()
            behind = math.floor((now - start) / self._interval) + 1
            if behind > k:  # we overran one or more slots: skip them rather than bunching ticks
                log.warning("tick_overran", skipped=behind - k)
                k = behind
            delay = start + k * self._interval - now
            if stop.is_set():
                break
            sleeping[:] = [loop.create_future()]
            timer = loop.call_later(max(delay, 0.0), wake)
            await sleeping[0]
            timer.cancel()
        stopped.cancel()
        self._final = True
        await self.tick()


def _node_power(devices: Sequence[DeviceState]) -> float:
    """The sum of the node-counted devices' fresh power; NaN when none has one (never a silent 0)."""
    fresh = [d.power_w for d in devices if d.in_node_total and not math.isnan(d.power_w)]
    return sum(fresh) if fresh else math.nan


def _process_shares(reads: Sequence[tuple[Sensor, SensorRead | None]]) -> ProcessShares:
    shares = [r.process_shares for _, r in reads if r is not None and r.process_shares]
    if not shares:
        return NO_SHARES
    return {device: s for part in shares for device, s in part.items()}


def _other_signal(
    values: tuple[tuple[Intensity, float], ...], in_force: Intensity | None
) -> tuple[tuple[Intensity, float], ...]:
    """The first servable value of each signal other than the one in force (exported, never summed)."""
    seen = {in_force.signal} if in_force is not None else set()
    out = []
    for value, age in values:
        if value.signal not in seen:
            seen.add(value.signal)
            out.append((value, age))
    return tuple(out)
