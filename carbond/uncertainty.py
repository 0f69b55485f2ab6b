"""How far to trust each figure: relative standard uncertainties per measurement method, intensity source, PUE and
embodied estimate, and the rules that combine them (docs/accuracy.md gives each band's source and the reasoning).

Every band is a relative *standard* uncertainty (one standard deviation, as a fraction of the value), never a bound.
Where a source states a bound (``+- 5 W``) it is turned into a standard uncertainty as a uniform distribution would
(bound / sqrt 3). Where no source states an accuracy the band is an assumption, marked ``assumed`` in the table.

Combination (the GUM's rules for independent and fully correlated terms):

- devices of one sensor share its method and its calibration, so their uncertainties add linearly (correlated);
  different sensors are independent: root-sum-square across sensors;
- a device's error is systematic (a model that is 30 % high stays 30 % high), so over time a total's uncertainty is
  the sum of its ticks' uncertainties, not their root-sum-square;
- emissions = energy x PUE x intensity: relative uncertainties combine root-sum-square;
- ``other`` = platform - components: root-sum-square of the two;
- a cgroup's share of the node carries the node's relative uncertainty (attribution itself adds none that is
  modelled here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from carbond.model import DeviceInfo, Intensity

SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True, slots=True)
class Band:
    """A relative standard uncertainty, what it applies to, and where it comes from (a key of docs/accuracy.md)."""

    rel: float
    term: str  # a short name, used to say which term dominates ("TDP model", "yearly-average intensity")
    source: str


#: Measurement methods. Keys: a sensor name, or "<sensor>:<method>" / "<sensor>:<kind>" for a finer one.
METHODS: dict[str, Band] = {
    "rapl:cpu": Band(0.05, "RAPL package", "rapl-khan-2018"),
    "rapl:psys": Band(0.05, "RAPL platform", "rapl-khan-2018"),
    "rapl:core": Band(0.05, "RAPL core", "rapl-khan-2018"),
    "rapl:uncore": Band(0.05, "RAPL uncore", "rapl-khan-2018"),
    "rapl:dram": Band(0.15, "RAPL DRAM", "rapl-desrochers-2016"),
    "nvml:energy counter": Band(0.05, "NVML energy counter", "nvml-smi-5w"),
    "nvml:power integration": Band(0.15, "NVML sampled power", "nvml-yang-2024"),
    "nvml:apportioned by utilisation": Band(0.25, "MIG share by utilisation", "assumed"),
    "nvml:apportioned by slices": Band(0.50, "MIG share by slices", "assumed"),
    "amdsmi": Band(0.10, "amdsmi", "assumed"),
    "powermetrics": Band(0.10, "powermetrics", "assumed"),
    "tdp:tdp": Band(0.40, "TDP model", "tdp-model"),
    "tdp:configured": Band(0.25, "configured CPU power", "assumed"),
    "tdp:tdp-vcpu-share": Band(0.45, "TDP x vCPU share", "tdp-model"),
    "tdp:ccf-vcpu": Band(0.45, "cloud per-vCPU coefficients", "ccf-coefficients"),
    "tdp:per-thread-default": Band(1.0, "per-thread default", "per-thread"),
    "ram": Band(0.50, "RAM model", "ram-model"),
    "ipmi": Band(0.05, "BMC (IPMI)", "bmc"),
    "redfish": Band(0.05, "BMC (Redfish)", "bmc"),
    "hwmon": Band(0.05, "hwmon power meter", "hwmon-accuracy"),
    "ups": Band(0.10, "UPS", "ups"),
    "ups:estimated": Band(0.20, "UPS load estimate", "ups"),
    "smartplug": Band(0.03, "smart plug", "plug"),
    "fake": Band(0.0, "fake sensor", "exact by construction"),
}
UNKNOWN = Band(0.50, "unknown method", "assumed")

#: Grid intensity: a yearly average applied to an hour, a live average, a forecast or estimate; direct-only factors.
INTENSITY_YEARLY = Band(0.20, "yearly-average intensity", "intensity-yearly")
INTENSITY_LIVE = Band(0.10, "live intensity", "intensity-live")
INTENSITY_ESTIMATED = Band(0.15, "estimated intensity", "intensity-live")
INTENSITY_DIRECT = Band(0.10, "direct-only emission factors", "intensity-lifecycle")
EMBODIED = Band(0.50, "embodied estimate", "embodied")


def device_band(sensor: str, kind: str, info: DeviceInfo | None) -> Band:
    """The band of one device's energy, from its sensor, kind and the method its sensor reports."""
    method = info.method if info is not None else ""
    if sensor == "tdp" and method == "tdp" and info is not None and info.detail.startswith("cpu.tdp_watts"):
        return METHODS["tdp:configured"]
    if sensor == "ups" and "estimated" in method:
        return METHODS["ups:estimated"]
    if sensor == "hwmon" and info is not None and (pct := _accuracy_pct(info.detail)) is not None:
        return Band(pct / 100.0 / SQRT3, "hwmon power meter", "hwmon-accuracy")
    for key in (f"{sensor}:{method}", f"{sensor}:{kind}", sensor):
        if key in METHODS:
            return METHODS[key]
    return UNKNOWN


def _accuracy_pct(detail: str) -> float | None:
    """The meter's own accuracy bound, where its sensor reported one (``accuracy 1.5%``)."""
    marker = "accuracy "
    if marker not in detail:
        return None
    text = detail.split(marker, 1)[1].split("%", 1)[0]
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 100 else None


def intensity_band(value: Intensity | None) -> Band:
    """The band of the intensity in force: yearly average, live, or estimated; direct factors add their own."""
    if value is None:
        return INTENSITY_YEARLY
    base = INTENSITY_YEARLY if value.year is not None or value.provider == "static" else INTENSITY_LIVE
    if value.estimated and base is INTENSITY_LIVE:
        base = INTENSITY_ESTIMATED
    if value.factor_type == "direct":
        return Band(math.hypot(base.rel, INTENSITY_DIRECT.rel), f"{base.term}, direct factors", base.source)
    return base


def rss(*values: float) -> float:
    """Root-sum-square of independent standard uncertainties."""
    return math.sqrt(math.fsum(v * v for v in values))


def emissions_rel(energy_rel: float, intensity_rel: float, pue: float, pue_u: float) -> float:
    """Relative uncertainty of energy x PUE x intensity (independent terms)."""
    return rss(energy_rel, intensity_rel, pue_u / pue if pue > 0 else 0.0)


def dominant(terms: dict[str, float]) -> str:
    """The name of the largest term (absolute uncertainties); "" when all are zero."""
    name, value = max(terms.items(), key=lambda kv: kv[1], default=("", 0.0))
    return name if value > 0 else ""


class DeviceTotals(NamedTuple):
    """What the tracker reads of one device at one tick."""

    kind: str
    in_node_total: bool
    energy_j: float  # total so far
    dt_s: float  # time its last delta covered (0 when it had none this tick)


@dataclass(frozen=True, slots=True)
class NodeUncertainty:
    """The node's standard uncertainties: power now, energy and emissions so far, and the largest term."""

    power_u_w: float = math.nan
    energy_u_j_total: float = 0.0
    emissions_u_g_total: float = 0.0
    dominant: str = ""


class Tracker:
    """Carries the uncertainty of every total from tick to tick, beside the books of :mod:`carbond.accounting`.

    It reads what a tick changed (each device's energy before and after) and adds each change's uncertainty to the
    running totals. Totals restored from the state file at start are given the band of the method that continues
    them (the state file keeps values, not their history).
    """

    def __init__(self, pue: float = 1.0, pue_u: float = 0.0) -> None:
        self.pue, self.pue_u = pue, pue_u
        self.devices: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (energy u J total, power u W)
        self.node = NodeUncertainty()
        self._node_started = False

    def advance(
        self,
        before: Mapping[tuple[str, str], DeviceTotals],
        after: Mapping[tuple[str, str], DeviceTotals],
        bands: Mapping[tuple[str, str], Band],
        intensity: Band,
        node: tuple[float, float, float, float],
        platform: str,
        modelled_u: float | None = None,
    ) -> NodeUncertainty:
        """One tick. ``node``: (node J this tick, node g this tick, node J total, node g total); ``platform``: the
        platform sensor the node took its figure from this tick, "" for the component sum; ``modelled_u``: the
        uncertainty of the wall energy where the calibration modelled it."""
        by_sensor: dict[str, float] = {}
        platform_u = 0.0
        energy_terms: dict[str, float] = {}
        others = []
        for key, now in after.items():
            band = bands.get(key, UNKNOWN)
            was = before.get(key)
            if now.kind == "other":  # derived below from this tick's platform and components
                self.devices.setdefault(key, (0.0, math.nan))
                others.append((key, now))
                continue
            if key not in self.devices:  # restored from the state file, or first seen: the method that continues it
                self.devices[key] = (band.rel * (was.energy_j if was is not None else now.energy_j), math.nan)
            if was is None:
                continue
            delta = max(now.energy_j - was.energy_j, 0.0)
            u = band.rel * delta
            total_u, _ = self.devices[key]
            self.devices[key] = (total_u + u, u / now.dt_s if now.dt_s > 0 else math.nan)
            if now.kind == "platform":
                if key[0] == platform:
                    platform_u += u
                    energy_terms[band.term] = energy_terms.get(band.term, 0.0) + u
            elif now.in_node_total:
                by_sensor[key[0]] = by_sensor.get(key[0], 0.0) + u
                if not platform:
                    energy_terms[band.term] = energy_terms.get(band.term, 0.0) + u
        if modelled_u is not None:  # the wall modelled from the components by the calibration this tick
            platform_u = modelled_u
            energy_terms = {"wall calibration": modelled_u}
        components_u = rss(*by_sensor.values())
        for key, now in others:  # other = platform - components: both terms, independent
            total_u, _ = self.devices[key]
            u = rss(platform_u, components_u) if platform else 0.0
            self.devices[key] = (total_u + u, u / now.dt_s if platform and now.dt_s > 0 else math.nan)
        node_j, node_g, node_j_total, node_g_total = node
        energy_u = platform_u if platform else components_u
        rel_e = energy_u / node_j if node_j > 0 else 0.0
        pue_rel = self.pue_u / self.pue if self.pue > 0 else 0.0
        grams_u = node_g * rss(rel_e, intensity.rel, pue_rel)
        terms = {name: (u / node_j) * node_g for name, u in energy_terms.items()} if node_j > 0 else {}
        terms[intensity.term] = node_g * intensity.rel
        if pue_rel:
            terms["PUE"] = node_g * pue_rel
        old = self.node
        e_total, g_total = old.energy_u_j_total, old.emissions_u_g_total
        if not self._node_started and node_j > 0:  # totals restored from the state file: this tick's bands
            e_total = rel_e * max(node_j_total - node_j, 0.0)
            g_total = (grams_u / node_g if node_g > 0 else 0.0) * max(node_g_total - node_g, 0.0)
            self._node_started = True
        dt = max((a.dt_s for a in after.values() if a.in_node_total or a.kind == "platform"), default=0.0)
        self.node = NodeUncertainty(
            energy_u / dt if dt > 0 and node_j > 0 else math.nan,
            e_total + energy_u,
            g_total + grams_u,
            dominant(terms) or old.dominant,
        )
        return self.node
