"""The poll loop: read every sensor concurrently, turn cumulative energy into deltas and power, account
emissions, and publish an immutable :class:`~carbond.model.Snapshot`.

Time comes from an injected monotonic clock; the schedule is drift-free (tick k starts at t0 + k x interval,
a late tick skips the slots it missed instead of bunching up). A sensor that hangs is cut off by a timeout so the
tick still completes on time; a sensor that fails is marked down and logged once per state change.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from carbond.attribution.attributor import Attributor
from carbond.attribution.kubernetes import running
from carbond.embodied import Embodied
from carbond.intensity import ManagedIntensity
from carbond.model import CgroupState, DeviceState, HistogramState, Intensity, Reading, SensorState, Snapshot
from carbond.procread import one_tick
from carbond.sensors.base import Clock, Sensor
from carbond.state import DeviceTotals, Persistence, SavedState
from carbond.units import emissions_g

log = structlog.get_logger("carbond.monitor")

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
class _Device:
    device: str
    kind: str
    sensor: str
    measured: bool
    in_node_total: bool
    last_joules: float
    last_at: float
    energy_j_total: float = 0.0
    emissions_g_total: float = 0.0
    power_w: float = math.nan
    raw_j: float | None = None
    range_j: float | None = None


@dataclass(slots=True)
class _SensorHealth:
    up: bool = True
    errors_total: int = 0
    reason: str = ""


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
        sensor_timeout_s: float,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        persistence: Persistence | None = None,
        attributor: Attributor | None = None,
        embodied: Embodied | None = None,
    ) -> None:
        self._sensors = list(sensors)
        self._host = host
        self._interval = interval_s
        self._pue = pue
        self._intensity = intensity
        self._timeout = sensor_timeout_s
        self._clock = clock
        self._wall = wall_clock
        self._devices: dict[tuple[str, str], _Device] = {}
        self._health = {s.name: _SensorHealth() for s in self._sensors}
        self._persistence = persistence
        self._attributor = attributor
        self._embodied = embodied
        self._cgroups: tuple[CgroupState, ...] = ()
        self._kind_deltas: dict[str, float] = {}
        self._gpu_deltas: dict[str, float] = {}
        self._node_energy, self._node_emissions = persistence.node_totals() if persistence else (0.0, 0.0)
        self._seq = 0
        self._final = False  # the last tick before exit: its save is fsynced
        self._attribution_failing = False
        self._sample_inline = True  # attribution reads inline while they are cheap, else in a thread
        self._latest: Snapshot | None = None
        self._hist_counts = [0] * len(TICK_BUCKETS)
        self._hist_count = 0
        self._hist_sum = 0.0

    def latest(self) -> Snapshot | None:
        return self._latest

    async def _read(self, sensor: Sensor) -> Sequence[Reading] | None:
        health = self._health[sensor.name]
        try:
            if getattr(sensor, "inline_read", False):  # no IO that could block (see Sensor.inline_read)
                readings = await sensor.read()
            else:
                readings = await asyncio.wait_for(sensor.read(), timeout=self._timeout)
        except TimeoutError:
            reason = f"read timed out after {self._timeout:g}s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any backend failure is data, never a crash
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if not health.up:
                log.info("sensor_recovered", sensor=sensor.name, after_errors=health.errors_total)
            health.up, health.reason = True, ""
            return readings
        health.errors_total += 1
        if health.up or health.reason != reason:
            log.warning("sensor_read_failed", sensor=sensor.name, reason=reason)
        health.up, health.reason = False, reason
        return None

    async def prime(self) -> None:
        """Read every sensor once to set baselines, without publishing anything."""
        with one_tick():
            await self._collect()

    async def _collect(self) -> tuple[Intensity | None, float]:
        """Read every sensor concurrently and fold the readings into devices and node totals."""
        waiting = [s for s in self._sensors if not getattr(s, "inline_read", False)]
        concurrent = (
            dict(zip(waiting, await asyncio.gather(*(self._read(s) for s in waiting)), strict=True)) if waiting else {}
        )
        results = [concurrent[s] if s in concurrent else await self._read(s) for s in self._sensors]
        self._kind_deltas, self._gpu_deltas = {}, {}
        intensity, age = self._intensity.current()
        # the source serves only values of the configured signal (average unless intensity.signal says marginal)
        g_per_kwh = intensity.g_per_kwh if intensity is not None else None
        node_delta = sum(
            self._account(sensor.name, r, g_per_kwh)
            for sensor, readings in zip(self._sensors, results, strict=True)
            for r in readings or ()
        )
        self._node_energy += node_delta
        if g_per_kwh is not None:
            self._node_emissions += emissions_g(node_delta, self._pue, g_per_kwh)
        return intensity, age

    async def tick(self) -> Snapshot:
        """Take one measurement and publish it."""
        started = self._clock()
        with one_tick():  # procfs heads read once for every reader of this tick
            intensity, age = await self._collect()
            if self._attributor is not None:
                await self._attribute(intensity)
        now = self._clock()
        stale_before = now - STALE_INTERVALS * self._interval
        devices = []
        node_power = math.nan  # no device with a fresh power yet: no node power either, never a silent 0
        for dev in self._devices.values():
            power = dev.power_w if dev.last_at >= stale_before else math.nan
            if dev.in_node_total and not math.isnan(power):
                node_power = power if math.isnan(node_power) else node_power + power
            devices.append(
                DeviceState(
                    device=dev.device,
                    kind=dev.kind,  # type: ignore[arg-type]
                    sensor=dev.sensor,
                    power_w=power,
                    energy_j_total=dev.energy_j_total,
                    emissions_g_total=dev.emissions_g_total,
                    measured=dev.measured,
                    in_node_total=dev.in_node_total,
                )
            )
        embodied = self._embodied_tick(now, devices)
        if self._persistence is not None:
            if self._final or self._persistence.durable_due(now):  # fsyncs: off the event loop
                await asyncio.to_thread(self._persistence.save, self._state(), True)
            else:  # a small write to the page cache: cheaper inline than a thread hand-off
                self._persistence.save(self._state(), False)
        self._observe(now - started)
        self._seq += 1
        snap = Snapshot(
            seq=self._seq,
            host=self._host,
            taken_at=now,
            wall_time=self._wall(),
            interval_s=self._interval,
            devices=tuple(devices),
            node_power_w=node_power,
            node_energy_j_total=self._node_energy,
            emissions_g_total=self._node_emissions,
            pue=self._pue,
            intensity=intensity,
            intensity_age_s=age,
            intensity_other=_other_signal(self._intensity.values(), intensity),
            intensity_forecast=self._intensity.forecast(),
            intensity_providers=self._intensity.providers(),
            embodied_g_total=embodied,
            sensors=tuple(
                SensorState(s.name, h.up, h.errors_total + getattr(s, "partial_errors", 0), h.reason)
                for s, h in ((s, self._health[s.name]) for s in self._sensors)
            ),
            cgroups=self._cgroups,
            pod_names_errors=(
                self._attributor.pods.errors_total
                if self._attributor is not None and self._attributor.pods is not None
                else None
            ),
            gpu_process_shares={
                device: shares
                for s in self._sensors
                for device, shares in getattr(s, "last_process_shares", {}).items()
            },
            device_info=tuple(
                (device, model, uuid, s.name)
                for s in self._sensors
                if hasattr(s, "device_info")
                for device, model, uuid in s.device_info()
            ),
            tick_duration=HistogramState(TICK_BUCKETS, tuple(self._hist_counts), self._hist_count, self._hist_sum),
            state_persist_errors=(
                self._persistence.errors_total + self._intensity.persist_errors if self._persistence else None
            ),
        )
        self._latest = snap
        return snap

    def _account(self, sensor: str, reading: Reading, g_per_kwh: float | None) -> float:
        """Fold one reading into its device; return the energy it adds to the node total."""
        key = (sensor, reading.device)
        dev = self._devices.get(key)
        if dev is None:
            dev = self._devices[key] = _Device(
                reading.device,
                reading.kind,
                sensor,
                reading.measured,
                reading.in_node_total,
                reading.joules,
                reading.at,
                raw_j=reading.raw_j,
                range_j=reading.range_j,
            )
            if self._persistence is None:
                return 0.0
            energy, emissions, gap_j = self._persistence.device(
                f"{sensor}/{reading.device}", reading.raw_j, reading.range_j, self._wall()
            )
            dev.energy_j_total, dev.emissions_g_total = energy + gap_j, emissions
            if gap_j and g_per_kwh is not None:
                dev.emissions_g_total += emissions_g(gap_j, self._pue, g_per_kwh)
            if gap_j:
                log.info("downtime_energy_recovered", sensor=sensor, device=reading.device, joules=gap_j)
            return gap_j if reading.in_node_total else 0.0
        dev.raw_j, dev.range_j = reading.raw_j, reading.range_j
        if reading.baseline:
            dev.last_joules, dev.last_at = reading.joules, reading.at
            return 0.0
        delta_j = reading.joules - dev.last_joules
        delta_t = reading.at - dev.last_at
        if delta_t <= 0:
            return 0.0
        if delta_j < 0:
            # sensors promise monotonic energy; a step back is a reset we re-baseline on, never negative energy
            log.warning("energy_went_backwards", sensor=sensor, device=reading.device, delta_j=delta_j)
            dev.last_joules, dev.last_at = reading.joules, reading.at
            return 0.0
        dev.last_joules, dev.last_at = reading.joules, reading.at
        dev.power_w = delta_j / delta_t
        dev.energy_j_total += delta_j
        if g_per_kwh is not None:
            dev.emissions_g_total += emissions_g(delta_j, self._pue, g_per_kwh)
        dev.in_node_total = reading.in_node_total
        if reading.in_node_total:
            if reading.kind == "gpu":
                self._gpu_deltas[reading.device] = self._gpu_deltas.get(reading.device, 0.0) + delta_j
            else:
                self._kind_deltas[reading.kind] = self._kind_deltas.get(reading.kind, 0.0) + delta_j
        return delta_j if reading.in_node_total else 0.0

    async def _attribute(self, intensity: Intensity | None) -> None:
        g = intensity.g_per_kwh if intensity is not None else None
        shares = {d: s for sensor in self._sensors for d, s in getattr(sensor, "last_process_shares", {}).items()}
        pids = sorted({pid for s in shares.values() for pid in s})
        assert self._attributor is not None
        try:
            t0 = time.perf_counter()
            if self._sample_inline:
                sample = self._attributor.sample(pids)
            else:
                sample = await asyncio.to_thread(self._attributor.sample, pids)
            self._sample_inline = time.perf_counter() - t0 < INLINE_SAMPLE_S
        except (OSError, ValueError, IndexError) as exc:
            if not self._attribution_failing:
                log.warning("attribution_read_failed", error=str(exc))
            self._attribution_failing = True
            self._cgroups = self._attributor.account_unread(
                self._kind_deltas, self._interval, self._pue, g, self._gpu_deltas
            )
            return
        if self._attribution_failing:
            log.info("attribution_read_recovered")
        self._attribution_failing = False
        self._cgroups = self._attributor.account(
            sample, self._kind_deltas, self._interval, self._pue, g, shares, self._gpu_deltas
        )

    def _state(self) -> SavedState:
        assert self._persistence is not None
        state = self._persistence.new_state(self._wall())
        if self._persistence.restored is not None:  # keep devices not met (yet) in this run
            state.devices.update(self._persistence.restored.devices)
        state.node_energy_j_total, state.node_emissions_g_total = self._node_energy, self._node_emissions
        if self._embodied is not None:
            state.embodied_g_total = self._embodied.saved()
        elif self._persistence.restored is not None:
            state.embodied_g_total = dict(self._persistence.restored.embodied_g_total)
        for (sensor, device), dev in self._devices.items():
            state.devices[f"{sensor}/{device}"] = DeviceTotals(
                dev.energy_j_total, dev.emissions_g_total, dev.raw_j, dev.range_j
            )
        return state

    def _embodied_tick(self, now: float, devices: list[DeviceState]) -> tuple[tuple[str, float], ...]:
        if self._embodied is None:
            return ()
        models = {d: model for s in self._sensors if hasattr(s, "device_info") for d, model, _ in s.device_info()}
        gpus = {d.device: models.get(d.device, "") for d in devices if d.kind == "gpu"}
        return self._embodied.advance(now, gpus)

    def _observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        for i in range(bisect.bisect_left(TICK_BUCKETS, seconds), len(TICK_BUCKETS)):
            self._hist_counts[i] += 1
        self._hist_count += 1
        self._hist_sum += seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Tick on a drift-free schedule until ``stop`` is set; take a final tick on the way out.

        A first, unpublished read gives every device its baseline, so the first published snapshot (the one that
        makes /readyz say ready) already carries power over a short interval instead of nothing.
        """
        await self._intensity.start()  # background refreshes; a tick only ever reads the cached value
        try:
            async with running(self._attributor.pods if self._attributor is not None else None):
                await self._run(stop)
        finally:
            await self._intensity.close()
            if self._attributor is not None:
                self._attributor.close()  # its kept cgroup descriptors: a reload builds a new attributor

    async def _run(self, stop: asyncio.Event) -> None:
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
        if self._persistence is not None:
            self._persistence.close()


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
