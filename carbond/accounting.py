"""Accounting, a pure function: the books before a tick + the tick's readings, grid intensity and PUE -> the books
after it and the tick's energy.

A device's power is its energy delta over the time between its readings; a reading that steps back (a counter reset
the sensor could not see through) or marks a new baseline sets a new starting point and adds nothing. Only
node-counted devices add to the node's energy (RAPL core/uncore inside their package, packages under psys, do not).
Emissions are energy x PUE x the intensity in force, tick by tick; with no intensity known yet there are none.

At the wall: ``platform`` devices (a BMC, power meter, UPS or plug) tell what the whole machine draws. In a tick where
every platform device known gave a fresh delta, the node's energy is the platform's, and the part of it the measured
components do not explain goes to a derived device of kind ``other`` (fans, PSU loss, disks, board), so the
additive kinds still sum to the node exactly. When the components exceed the platform (meters read at slightly
different times, a slow BMC average) ``other`` is clamped at zero and the node is the component sum: the tick says
so (``clamped``). In any other tick (no platform, no new sample from it, or one failed or re-baselined) the node is
the component sum as without a platform sensor, unless the caller's calibration (:mod:`carbond.calibration`) models
the wall from the components for that tick (``modelled``). The wall's next delta spans those ticks too: it is charged
only beyond what they charged (``Books.pending_j``), so no interval is counted twice and, over any run of ticks, the
node is what the wall counted. The node's total only ever grows, whichever source a tick uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from carbond.model import Kind, Reading
from carbond.units import emissions_g

DeviceKey = tuple[str, str]  # (sensor, device)


@dataclass(frozen=True, slots=True)
class DeviceBook:
    """One device's running figures."""

    device: str
    kind: Kind
    sensor: str
    measured: bool
    in_node_total: bool
    last_joules: float  # the reading deltas are taken from
    last_at: float
    energy_j_total: float = 0.0
    emissions_g_total: float = 0.0
    power_w: float = math.nan
    raw_j: float | None = None  # the hardware counter and its range, for a restart on the same boot
    range_j: float | None = None


@dataclass(frozen=True, slots=True)
class Restored:
    """A device's totals from before this run (the state file), for its first reading in this run."""

    energy_j_total: float
    emissions_g_total: float
    gap_j: float = 0.0  # energy its hardware counter recorded while carbond was down (same boot only)


@dataclass(frozen=True, slots=True)
class Books:
    devices: Mapping[DeviceKey, DeviceBook] = field(default_factory=dict)
    node_energy_j_total: float = 0.0
    node_emissions_g_total: float = 0.0
    #: Node energy charged since the platform's last counted reading, in ticks without a fresh platform delta (the
    #: component sum, or the calibration's model): the platform's next delta spans those ticks too, so it is
    #: charged only beyond this.
    pending_j: float = 0.0


@dataclass(frozen=True, slots=True)
class TickEnergy:
    """What one tick added: the node's energy and emissions, and the node-counted deltas attribution splits."""

    node_j: float
    node_g: float
    by_kind: Mapping[str, float]  # every kind but gpu: joules of node-counted devices
    by_gpu: Mapping[str, float]  # each GPU device's joules
    went_backwards: tuple[tuple[DeviceKey, float], ...] = ()  # (device, delta J): re-baselined, for the log
    platform: str = ""  # the platform sensor whose figure the node took this tick ("" for the component sum)
    clamped: bool = False  # the components exceeded the platform: ``other`` held at 0, node = components
    components_j: float = 0.0  # the measured components' sum this tick (node-counted devices but ``other``)
    modelled: bool = False  # ``platform`` is the calibration's estimate (the meter gave no fresh figure)


OTHER_DEVICE = "other"


def new_devices(books: Books, reads: Sequence[tuple[str, Sequence[Reading]]]) -> list[tuple[DeviceKey, Reading]]:
    """The readings of devices the books do not hold yet (for which the caller looks up :class:`Restored`)."""
    known = books.devices
    return [((sensor, r.device), r) for sensor, readings in reads for r in readings if (sensor, r.device) not in known]


def _first_sight(sensor: str, r: Reading, old: Restored, pue: float, g_per_kwh: float | None) -> DeviceBook:
    """The book of a device seen for the first time: its reading is the baseline; the energy its counter moved
    while carbond was down (``old.gap_j``, from the state file) is charged now."""
    gap_g = emissions_g(old.gap_j, pue, g_per_kwh) if old.gap_j and g_per_kwh is not None else 0.0
    return DeviceBook(
        r.device,
        r.kind,
        sensor,
        r.measured,
        r.in_node_total,
        r.joules,
        r.at,
        old.energy_j_total + old.gap_j,
        old.emissions_g_total + gap_g,
        raw_j=r.raw_j,
        range_j=r.range_j,
    )


def account(
    books: Books,
    reads: Sequence[tuple[str, Sequence[Reading]]],
    pue: float,
    g_per_kwh: float | None,
    restored: Mapping[DeviceKey, Restored] | None = None,
    predict: Callable[[float], tuple[str, float] | None] | None = None,
) -> tuple[Books, TickEnergy]:
    """Fold one tick's readings (by sensor name) into the books. ``predict``: in a tick without a fresh platform
    figure, the components' mean power -> (platform sensor, modelled wall power) from the calibration, or None."""
    devices = dict(books.devices)
    restored = restored or {}
    node_j = 0.0
    by_kind: dict[str, float] = {}
    by_gpu: dict[str, float] = {}
    backwards: list[tuple[DeviceKey, float]] = []
    span, end = 0.0, -math.inf  # the longest interval a component delta covered this tick, and its end
    for sensor, readings in reads:
        for r in readings:
            key = (sensor, r.device)
            book = devices.get(key)
            if book is None:  # first sight: a baseline, plus what the counter did while carbond was down
                old = restored.get(key, Restored(0.0, 0.0))
                devices[key] = _first_sight(sensor, r, old, pue, g_per_kwh)
                if r.in_node_total:
                    node_j += old.gap_j
                continue
            delta_j, delta_t = r.joules - book.last_joules, r.at - book.last_at
            if r.baseline or delta_j < 0:
                if delta_j < 0 and not r.baseline:
                    backwards.append((key, delta_j))
                devices[key] = _moved(book, r, book.energy_j_total, book.emissions_g_total, book.power_w)
                continue
            if delta_t <= 0:
                devices[key] = _moved(book, r, book.energy_j_total, book.emissions_g_total, book.power_w, keep=True)
                continue
            grams = emissions_g(delta_j, pue, g_per_kwh) if g_per_kwh is not None else 0.0
            devices[key] = _moved(
                book, r, book.energy_j_total + delta_j, book.emissions_g_total + grams, delta_j / delta_t
            )
            if r.in_node_total:
                node_j += delta_j
                span, end = max(span, delta_t), max(end, r.at)
                if r.kind == "gpu":
                    by_gpu[r.device] = by_gpu.get(r.device, 0.0) + delta_j
                else:
                    by_kind[r.kind] = by_kind.get(r.kind, 0.0) + delta_j
    components_j = node_j
    platform, clamped, modelled = _platform(devices, reads, books), False, False
    if platform is None and predict is not None and span > 0 and (wall := predict(components_j / span)):
        platform, modelled = (wall[0], wall[1] * span, end, end - span), True
    if platform:
        sensor, platform_j, at, since = platform
        if not modelled:  # the measured wall over its span, less what earlier ticks of that span already charged
            platform_j -= books.pending_j
        other_j = platform_j - components_j
        clamped = other_j < 0
        other_j = max(other_j, 0.0)
        node_j += other_j
        by_kind["other"] = other_j
        key = (sensor, OTHER_DEVICE)
        devices[key] = _charge_other(devices.get(key) or _other_book(sensor, at, restored.get(key)), other_j, at,
                                     at - since, pue, g_per_kwh)  # fmt: skip
    else:  # no platform figure this tick: ``other`` has no power (its energy stays where it was)
        for key, b in books.devices.items():
            if b.kind == "other" and not math.isnan(b.power_w):
                devices[key] = dataclasses.replace(b, power_w=math.nan)
    node_g = emissions_g(node_j, pue, g_per_kwh) if g_per_kwh is not None else 0.0
    pending = _pending(books, reads, node_j, measured=bool(platform) and not modelled)
    after = Books(devices, books.node_energy_j_total + node_j, books.node_emissions_g_total + node_g, pending)
    used = platform[0] if platform else ""
    tick = TickEnergy(node_j, node_g, by_kind, by_gpu, tuple(backwards), used, clamped, components_j, modelled)
    return after, tick


def _other_book(sensor: str, at: float, old: Restored | None) -> DeviceBook:
    """The ``other`` device's book at first sight, carrying its totals from the state file."""
    old = old or Restored(0.0, 0.0)
    return DeviceBook(OTHER_DEVICE, "other", sensor, True, True, 0.0, at, old.energy_j_total, old.emissions_g_total)


def _charge_other(
    book: DeviceBook, other_j: float, at: float, elapsed: float, pue: float, g_per_kwh: float | None
) -> DeviceBook:
    """``book`` after ``other_j`` joules over ``elapsed`` seconds ending at the platform reading."""
    grams = emissions_g(other_j, pue, g_per_kwh) if g_per_kwh is not None else 0.0
    power = other_j / elapsed if elapsed > 0 else math.nan
    return DeviceBook(OTHER_DEVICE, "other", book.sensor, True, True, 0.0, at, book.energy_j_total + other_j,
                      book.emissions_g_total + grams, power)  # fmt: skip


def _pending(books: Books, reads: Sequence[tuple[str, Sequence[Reading]]], node_j: float, measured: bool) -> float:
    """The node energy the platform's next delta will span but the node has already charged (see Books)."""
    platform = [r for _, readings in reads for r in readings if r.kind == "platform"]
    if measured or any(r.baseline for r in platform):
        return 0.0  # counted up to its reading, or a new baseline: nothing before it is in its next delta
    if not platform and not any(b.kind == "platform" for b in books.devices.values()):
        return 0.0  # no platform sensor
    return books.pending_j + node_j


def _platform(
    after: Mapping[DeviceKey, DeviceBook],
    reads: Sequence[tuple[str, Sequence[Reading]]],
    books: Books,
) -> tuple[str, float, float, float] | None:
    """(sensor, joules, end, start) of the platform this tick, when every platform device the books know gave a
    fresh delta this tick; None otherwise (no platform sensor, a device missing, no new sample, re-baselined)."""
    platform = [(sensor, r) for sensor, readings in reads for r in readings if r.kind == "platform"]
    if not platform:
        return None
    known = {key for key, b in after.items() if b.kind == "platform"}
    if len(platform) != len(known):
        return None  # a platform device was not read this tick: its share of the machine is unknown
    total, at, since = 0.0, -math.inf, math.inf
    for sensor, r in platform:
        prev = books.devices.get((sensor, r.device))
        if prev is None or r.baseline or r.at <= prev.last_at or r.joules < prev.last_joules:
            return None
        total += r.joules - prev.last_joules
        at, since = max(at, r.at), min(since, prev.last_at)
    return platform[0][0], total, at, since


def _moved(book: DeviceBook, r: Reading, energy: float, grams: float, power: float, keep: bool = False) -> DeviceBook:
    """The book after reading ``r``; ``keep``: deltas are still taken from the previous reading."""
    last_joules, last_at = (book.last_joules, book.last_at) if keep else (r.joules, r.at)
    return DeviceBook(
        book.device,
        book.kind,
        book.sensor,
        book.measured,
        r.in_node_total,
        last_joules,
        last_at,
        energy,
        grams,
        power,
        r.raw_j,
        r.range_j,
    )
