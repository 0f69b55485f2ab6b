"""Snapshot -> Prometheus metric families, per the metric contract in ARCHITECTURE.md.

The collector lives in a private registry and only reads the snapshot it is given; rendering happens once per
snapshot (see :mod:`carbond.exporter.server`), never per scrape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from carbond import __version__
from carbond.exporter.uncertainty import uncertainty_families
from carbond.model import Snapshot


def _fmt_bound(value: float) -> str:
    return repr(float(value))


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric family of one snapshot, through prometheus_client (the reference definition; the scrape path
    renders the cgroup families' samples itself: :mod:`carbond.exporter.cgroup_lines`)."""
    yield from head_families(snap)
    if snap.cgroups:
        yield from cgroup_families(snap)
    yield from tail_families(snap)


def head_families(snap: Snapshot) -> Iterator[Metric]:
    """The families before the cgroup ones: devices, node, intensity, embodied, sensors."""
    host = snap.host
    dev_labels = ["host", "device", "kind", "sensor"]
    power = GaugeMetricFamily("carbond_device_power_watts", "Mean power over the last interval.", labels=dev_labels)
    energy = CounterMetricFamily(
        "carbond_device_energy_joules", "IT energy of the device, monotonic across counter wraps.", labels=dev_labels
    )
    dev_em = CounterMetricFamily(
        "carbond_device_emissions_grams",
        "Operational emissions of the device: energy x PUE x grid intensity (g CO2e).",
        labels=["host", "device", "kind"],
    )
    for dev in snap.devices.states:
        values = [host, dev.device, dev.kind, dev.sensor]
        if not math.isnan(dev.power_w):
            power.add_metric(values, dev.power_w)
        energy.add_metric(values, dev.energy_j_total)
        dev_em.add_metric([host, dev.device, dev.kind], dev.emissions_g_total)
    yield power
    yield energy
    yield dev_em
    up = GaugeMetricFamily(
        "carbond_device_up", "1 while the device was read within the last intervals, else 0.", labels=dev_labels
    )
    for dev in snap.devices.states:
        up.add_metric([host, dev.device, dev.kind, dev.sensor], 0.0 if math.isnan(dev.power_w) else 1.0)
    for down, sensor in snap.devices.unread:
        up.add_metric([host, down.device, down.kind, sensor], 0.0)
    yield up
    if snap.devices.info:
        info_fam = GaugeMetricFamily(
            "carbond_device_info",
            "Model, UUID and how the energy of a device is found (method, and the inputs of a model); always 1.",
            labels=["host", "device", "model", "uuid", "sensor", "method", "detail"],
        )
        for i in snap.devices.info:
            info_fam.add_metric([host, i.device, i.model, i.uuid, i.sensor, i.method, i.detail], 1.0)
        yield info_fam

    node_power = GaugeMetricFamily(
        "carbond_node_power_watts",
        "Node IT power without double counting: at the wall where a platform sensor reads, else the components' sum.",
        labels=["host"],
    )
    node = snap.node
    if not math.isnan(node.power_w):
        node_power.add_metric([host], node.power_w)
    yield node_power
    node_energy = CounterMetricFamily(
        "carbond_node_energy_joules", "Node IT energy without double counting.", labels=["host"]
    )
    node_energy.add_metric([host], node.energy_j_total)
    yield node_energy
    if any(d.kind == "platform" for d in snap.devices.states):
        at_wall = GaugeMetricFamily(
            "carbond_node_platform_active",
            "1 when this tick's node figure is what the machine draws at the wall, 0 for the components' sum or the "
            "calibration's model.",
            labels=["host", "sensor"],
        )
        sensors = sorted({d.sensor for d in snap.devices.states if d.kind == "platform"})
        for name in sensors:
            at_wall.add_metric([host, name], 1.0 if node.platform == name else 0.0)
        yield at_wall
        clamped = CounterMetricFamily(
            "carbond_platform_clamped",
            "Ticks where the measured components exceeded the platform reading (other held at 0).",
            labels=["host"],
        )
        clamped.add_metric([host], node.platform_clamped_total)
        yield clamped
    pue = GaugeMetricFamily("carbond_pue", "Power usage effectiveness in force.", labels=["host"])
    pue.add_metric([host], node.pue)
    yield pue
    emissions = CounterMetricFamily(
        "carbond_emissions_grams",
        "Node operational emissions: IT energy x PUE x average grid intensity, integrated tick by tick (g CO2e).",
        labels=["host"],
    )
    emissions.add_metric([host], node.emissions_g_total)
    yield emissions

    yield from _intensity_families(snap)
    if node.embodied_g_total:
        embodied = CounterMetricFamily(
            "carbond_embodied_emissions_grams",
            "Embodied (manufacturing) emissions amortised linearly over the hardware's life while measured (g CO2e).",
            labels=["host", "device"],
        )
        for device, grams in node.embodied_g_total:
            embodied.add_metric([host, device], grams)
        yield embodied

    yield from uncertainty_families(snap)

    up = GaugeMetricFamily(
        "carbond_sensor_up", "1 while the sensor reads, 0 while it fails.", labels=["host", "sensor"]
    )
    errors = CounterMetricFamily("carbond_sensor_errors", "Failed sensor reads.", labels=["host", "sensor"])
    for s in snap.health.sensors:
        up.add_metric([host, s.name], 1.0 if s.up else 0.0)
        errors.add_metric([host, s.name], s.errors_total)
    yield up
    yield errors


def tail_families(snap: Snapshot) -> Iterator[Metric]:
    """The families after the cgroup ones: pod-name errors, tick duration, persistence errors, build info."""
    host, health = snap.host, snap.health
    if health.pod_names_errors is not None:
        pod_err = CounterMetricFamily(
            "carbond_pod_names_refresh_errors",
            "Failed refreshes of the Kubernetes pod names (the last good names stay in use).",
            labels=["host"],
        )
        pod_err.add_metric([host], health.pod_names_errors)
        yield pod_err

    h = health.tick_duration
    hist = HistogramMetricFamily("carbond_tick_duration_seconds", "Time to take one measurement.", labels=["host"])
    buckets = [(_fmt_bound(b), float(c)) for b, c in zip(h.bounds, h.counts, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    hist.add_metric([host], buckets, h.total)
    yield hist

    if health.state_persist_errors is not None:
        persist = CounterMetricFamily(
            "carbond_state_persist_errors",
            "Failed writes of the persisted counters and intensity cache.",
            labels=["host"],
        )
        persist.add_metric([host], health.state_persist_errors)
        yield persist

    info = GaugeMetricFamily("carbond_build_info", "carbond version; always 1.", labels=["host", "version"])
    info.add_metric([host, __version__], 1.0)
    yield info


INTENSITY_LABELS = ["host", "zone", "provider", "signal", "factor_type", "source", "year"]


def _intensity_families(snap: Snapshot) -> Iterator[Metric]:
    host, state = snap.host, snap.intensity
    intensity = GaugeMetricFamily(
        "carbond_grid_intensity_grams_per_kwh",
        "Grid carbon intensity in force per signal (g CO2e per kWh); emissions use the configured signal (average).",
        labels=INTENSITY_LABELS,
    )
    age = GaugeMetricFamily(
        "carbond_grid_intensity_age_seconds",
        "Age of the grid intensity value (time since it was fetched).",
        labels=["host", "zone", "provider"],
    )
    served = ((state.value, state.age_s),) if state.value is not None else ()
    for i, i_age in (*served, *state.other):
        year = str(i.year) if i.year is not None else ""
        intensity.add_metric([host, i.zone, i.provider, i.signal, i.factor_type, i.source, year], i.g_per_kwh)
        age.add_metric([host, i.zone, i.provider], i_age)
    yield intensity
    yield age
    if state.zone_source:
        location = GaugeMetricFamily(
            "carbond_location_info",
            "The intensity zone in use and where it came from: config, metadata (zone: auto), fallback "
            "(intensity.fallback_zone), timezone (the system time zone's country) or default (world); always 1.",
            labels=["host", "zone", "source"],
        )
        location.add_metric([host, state.zone, state.zone_source], 1.0)
        yield location
    f = state.forecast
    if f is not None:
        labels = ["host", "zone", "provider", "signal"]
        values = [host, f.zone, f.provider, f.signal]
        lowest = GaugeMetricFamily(
            "carbond_grid_intensity_forecast_lowest_grams_per_kwh",
            "Lowest forecast grid intensity within the next 24 h (g CO2e per kWh).",
            labels=labels,
        )
        lowest.add_metric(values, f.g_per_kwh)
        starts = GaugeMetricFamily(
            "carbond_grid_intensity_forecast_lowest_starts_in_seconds",
            "Seconds until the window of lowest forecast intensity starts (0: it is the current one).",
            labels=labels,
        )
        starts.add_metric(values, f.starts_in_s)
        yield lowest
        yield starts
    if state.providers:
        up = GaugeMetricFamily(
            "carbond_intensity_provider_up",
            "1 while the live intensity provider's last refresh worked, 0 while it fails.",
            labels=["host", "provider"],
        )
        errors = CounterMetricFamily(
            "carbond_intensity_provider_errors",
            "Failed refreshes of a live intensity provider.",
            labels=["host", "provider"],
        )
        for p in state.providers:
            up.add_metric([host, p.provider], 1.0 if p.up else 0.0)
            errors.add_metric([host, p.provider], p.errors_total)
        yield up
        yield errors


CGROUP_LABELS = [
    "host",
    "cgroup",
    "kind",
    "unit",
    "pod_uid",
    "pod_namespace",
    "pod_name",
    "container_id",
    "container_name",
    "team",
    "project",
]  # and the copied Kubernetes labels (label_*) that attribution.labels names


def empty_cgroup_families(
    extra: Sequence[str] = (),
) -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
    """The three cgroup families (power, energy, emissions) without samples; ``extra``: the label_* names."""
    names = [*CGROUP_LABELS, *extra]
    power = GaugeMetricFamily("carbond_cgroup_power_watts", "Power attributed to a cgroup.", labels=names)
    energy = CounterMetricFamily("carbond_cgroup_energy_joules", "Energy attributed to a cgroup.", labels=names)
    em = CounterMetricFamily(
        "carbond_cgroup_emissions_grams",
        "Operational emissions attributed to a cgroup (g CO2e).",
        labels=[label for label in names if label != "kind"],
    )
    return power, energy, em


def cgroup_families(snap: Snapshot) -> Iterator[Metric]:
    extra = [name for name, _ in snap.cgroups[0].labels.extra] if snap.cgroups else []
    power, energy, em = empty_cgroup_families(extra)
    for cg in snap.cgroups:
        lab = cg.labels
        ids = [lab.unit, lab.pod_uid, lab.pod_namespace, lab.pod_name, lab.container_id, lab.container_name]
        ids += [lab.team, lab.project, *(v for _, v in lab.extra)]
        for kind, watts, joules in cg.kinds:
            values = [snap.host, cg.cgroup, kind, *ids]
            if watts is not None:
                power.add_metric(values, watts)
            energy.add_metric(values, joules)
        em.add_metric([snap.host, cg.cgroup, *ids], cg.emissions_g_total)
    yield power
    yield energy
    yield em


class SnapshotCollector(Collector):
    """Yields the families of whatever snapshot ``latest()`` returns (nothing before the first tick), all through
    prometheus_client: the reference the scrape path (:class:`carbond.exporter.server.MetricsCache`) is tested and
    benchmarked against, and a collector for anyone embedding carbond's families in a registry of their own."""

    def __init__(self, latest: Callable[[], Snapshot | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        if snap is None:
            return
        yield from families(snap)
