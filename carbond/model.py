"""Frozen value types shared by sensors, the monitor, accounting and the exporter."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

#: Device kinds. cpu, dram, gpu, ram, soc and other add up to the node (summed by kind they never count a joule
#: twice); core and uncore are RAPL sub-zones inside their package, psys the RAPL platform domain, ``platform`` what
#: the whole machine draws at the wall (BMC, power meter, UPS, plug); ``other`` is platform minus the components;
#: ``gpu_mig`` a MIG instance's apportioned share of its parent ``gpu`` (:mod:`carbond.sensors.mig`).
Kind = Literal["cpu", "dram", "gpu", "ram", "soc", "psys", "core", "uncore", "platform", "other", "gpu_mig"]
NODE_KINDS: frozenset[str] = frozenset({"cpu", "dram", "gpu", "ram", "soc", "other"})
#: Device classes a sensor can cover; the first configured sensor that covers a class wins it.
DeviceClass = Literal["cpu", "dram", "gpu", "platform"]


@dataclass(frozen=True, slots=True)
class Reading:
    """One device's cumulative energy at one instant.

    ``joules`` is monotonic for the life of the sensor object (counter wraps are handled inside the sensor);
    ``at`` is the monotonic time of the read in seconds; ``measured`` is False for models.
    ``in_node_total`` is False for domains already contained in another (RAPL core/uncore inside their package,
    package/dram under psys), so the node total never counts energy twice.
    """

    device: str
    kind: Kind
    joules: float
    at: float
    measured: bool = True
    in_node_total: bool = True
    #: The raw hardware counter (joules) and its wrap range, where the sensor has one: lets a restart on the same
    #: boot recover the energy used while carbond was down.
    raw_j: float | None = None
    range_j: float | None = None
    #: True when the sensor lost track of the device (e.g. a GPU that was lost and came back): the energy since the
    #: previous reading is unknown, so this reading only sets a new baseline (no energy, no power for the gap).
    baseline: bool = False


@dataclass(frozen=True, slots=True)
class Intensity:
    """A grid carbon intensity in g CO2e per kWh and where it came from."""

    g_per_kwh: float
    provider: str
    zone: str
    observed_at: float  # wall-clock epoch seconds of the value (not of the fetch)
    signal: Literal["average", "marginal"] = "average"
    factor_type: Literal["lifecycle", "direct"] = "lifecycle"
    estimated: bool = False
    source: str = ""
    year: int | None = None


#: Where the intensity zone came from: ``intensity.zone`` (``config``), instance metadata for ``zone: auto``
#: (``metadata``), ``intensity.fallback_zone`` when no metadata answered (``fallback``), the system time zone's
#: country for an unset zone (``timezone``), or none of them: the world average (``default``).
ZoneSource = Literal["config", "metadata", "fallback", "timezone", "default"]


@dataclass(frozen=True, slots=True)
class IntensityForecast:
    """The lowest forecast intensity within the next 24 h, and when that window starts."""

    g_per_kwh: float
    starts_at: float  # wall-clock epoch seconds
    starts_in_s: float  # 0 when the lowest window is the current one
    provider: str
    zone: str
    signal: Literal["average", "marginal"] = "average"


@dataclass(frozen=True, slots=True)
class IntensityProviderState:
    """One live provider of the chain: whether its last refresh worked, failures so far, age of its value."""

    provider: str
    up: bool
    errors_total: int
    age_s: float  # NaN while it has never given a value
    reason: str = ""  # why the last refresh failed (never contains a secret)


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Per-device figures published in a snapshot."""

    device: str
    kind: Kind
    sensor: str
    power_w: float
    energy_j_total: float
    emissions_g_total: float
    measured: bool
    in_node_total: bool
    power_u_w: float = math.nan  # standard uncertainties (carbond.uncertainty)
    energy_u_j_total: float = 0.0


class CgroupLabels(NamedTuple):
    """The identity labels of a cgroup's series (empty strings where not applicable): one value per cgroup,
    shared by the attributor that finds them and the renderer that writes them."""

    unit: str = ""
    pod_uid: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    container_id: str = ""
    container_name: str = ""
    team: str = ""  # from copied Kubernetes labels or attribution.units (carbond.attribution.labels)
    project: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # copied Kubernetes labels (label_<name>) and Slurm's (slurm_*), sorted


NO_LABELS = CgroupLabels()


class CgroupState(NamedTuple):
    """Energy attributed to one cgroup (or to a pseudo-cgroup: ``(idle)``, ``(unattributed)``, ``(other)``).

    A named tuple, not a frozen dataclass: thousands are built every tick, and this is several times cheaper.
    """

    cgroup: str
    kinds: tuple[tuple[str, float | None, float], ...]  # (kind, power_w or None when not seen this tick, joules)
    emissions_g_total: float
    labels: CgroupLabels = NO_LABELS


@dataclass(frozen=True, slots=True)
class SensorState:
    name: str
    up: bool
    errors_total: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HistogramState:
    """Cumulative histogram: ``counts[i]`` observations <= ``bounds[i]``; +Inf is ``count``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a sensor knows of a device beyond its energy (GPUs: model and UUID)."""

    device: str
    model: str
    uuid: str = ""
    sensor: str = ""
    method: str = ""  # how its energy is found: "energy counter", "power integration", "tdp", "ccf-vcpu" ...
    detail: str = ""  # the inputs of a modelled figure (TDP, share, coefficients and their source)


#: Per device, each running process's share of the device's energy over the last interval: {device: {pid: share}}.
ProcessShares = Mapping[str, Mapping[int, float]]
NO_SHARES: ProcessShares = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DeviceDown:
    """A device its sensor knows but could not read this time (a lost GPU), and why."""

    device: str
    kind: Kind
    reason: str


@dataclass(frozen=True, slots=True)
class SensorRead:
    """Everything one ``Sensor.read()`` gives: the typed value a tick is made of.

    ``partial_errors`` counts, over the sensor's life, devices that failed while others were read (a lost GPU);
    ``process_shares`` feed GPU attribution; ``device_info`` names the devices; ``down`` lists the devices it
    knows but could not read this time.
    """

    readings: tuple[Reading, ...]
    process_shares: ProcessShares = field(default_factory=lambda: NO_SHARES)
    device_info: tuple[DeviceInfo, ...] = ()
    partial_errors: int = 0
    down: tuple[DeviceDown, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeState:
    """The node as a whole: power, energy and emissions without double counting, the PUE, embodied emissions."""

    power_w: float  # NaN while no device has a fresh power
    energy_j_total: float
    emissions_g_total: float
    pue: float
    #: Amortised embodied emissions so far, per device (g CO2e); empty when embodied accounting is off.
    embodied_g_total: tuple[tuple[str, float], ...] = ()
    #: The platform sensor the node's figure came from this tick (what the machine draws at the wall); "" when it
    #: is the sum of the measured components (no platform sensor, or none fresh this tick).
    platform: str = ""
    #: Ticks where the components exceeded the platform reading (``other`` clamped at 0).
    platform_clamped_total: int = 0
    #: Standard uncertainties of power, energy and emissions, and the term that dominates them.
    power_u_w: float = math.nan
    energy_u_j_total: float = 0.0
    emissions_u_g_total: float = 0.0
    uncertainty_dominant: str = ""
    pue_u: float = 0.0
    calibration: CalibrationState | None = None  # where a platform sensor runs


@dataclass(frozen=True, slots=True)
class CalibrationState:
    """The wall calibration (carbond.calibration): platform power ~ intercept + per_component x components +
    per_utilisation x CPU utilisation, its fit quality, and whether this tick's node figure came from it."""

    sensor: str
    model: str  # full | linear | ratio | none
    samples: int
    r2: float
    residual_sd_w: float
    intercept_w: float
    per_component: float
    per_utilisation: float
    in_use: bool


@dataclass(frozen=True, slots=True)
class Devices:
    """Per-device figures, what the sensors say of the devices, and the GPU processes' shares."""

    states: tuple[DeviceState, ...] = ()
    info: tuple[DeviceInfo, ...] = ()
    process_shares: ProcessShares = field(default_factory=lambda: NO_SHARES)
    #: Devices a sensor knows but has never read in this run (a GPU lost since start): up 0, and no energy series,
    #: so a counter never appears at 0 and then jumps to its restored total.
    unread: tuple[tuple[DeviceDown, str], ...] = ()  # (the device, its sensor)


@dataclass(frozen=True, slots=True)
class IntensityState:
    """The grid intensity in force and what stands beside it."""

    value: Intensity | None
    age_s: float
    #: Values of the other signal than the one in force (a marginal one beside the average), each with its age.
    other: tuple[tuple[Intensity, float], ...] = ()
    #: The lowest forecast intensity of the next 24 h, where a live provider gives one.
    forecast: IntensityForecast | None = None
    #: Health of each live intensity provider (empty for fixed values).
    providers: tuple[IntensityProviderState, ...] = ()
    #: The zone in use (``zone: auto`` resolved) and where it came from; "" when unknown (a snapshot built by hand).
    zone: str = ""
    zone_source: ZoneSource | Literal[""] = ""
    #: Relative standard uncertainty of the value in force (carbond.uncertainty), and its term's name.
    rel_u: float = math.nan
    rel_u_term: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    """How the measurement itself is doing."""

    sensors: tuple[SensorState, ...]
    tick_duration: HistogramState
    #: Failed refreshes of the Kubernetes pod names; None when pod-name resolution is off.
    pod_names_errors: int | None = None
    #: Failed writes of the state file and the intensity cache; None when persistence is off.
    state_persist_errors: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the exporter serves, immutable, replaced once per tick."""

    seq: int
    host: str
    taken_at: float  # monotonic
    wall_time: float
    interval_s: float
    node: NodeState
    devices: Devices
    intensity: IntensityState
    health: Health
    #: Attribution to cgroups; empty when attribution is off.
    cgroups: tuple[CgroupState, ...] = ()
