"""The uncertainty families: one standard uncertainty (one standard deviation, in the figure's own base unit) beside
each power, energy and emissions figure; never a bound. How they are found: :mod:`carbond.uncertainty`."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from carbond.model import Snapshot
from carbond.uncertainty import EMBODIED


def uncertainty_families(snap: Snapshot) -> Iterator[Metric]:
    host, node = snap.host, snap.node
    dev_labels = ["host", "device", "kind", "sensor"]
    power = GaugeMetricFamily(
        "carbond_device_power_uncertainty_watts",
        "Standard uncertainty of carbond_device_power_watts (one standard deviation).",
        labels=dev_labels,
    )
    energy = GaugeMetricFamily(
        "carbond_device_energy_uncertainty_joules",
        "Standard uncertainty of carbond_device_energy_joules_total (one standard deviation).",
        labels=dev_labels,
    )
    for dev in snap.devices.states:
        values = [host, dev.device, dev.kind, dev.sensor]
        if not math.isnan(dev.power_w) and not math.isnan(dev.power_u_w):
            power.add_metric(values, dev.power_u_w)
        energy.add_metric(values, dev.energy_u_j_total)
    yield power
    yield energy
    node_power = GaugeMetricFamily(
        "carbond_node_power_uncertainty_watts",
        "Standard uncertainty of carbond_node_power_watts (one standard deviation).",
        labels=["host"],
    )
    if not math.isnan(node.power_w) and not math.isnan(node.power_u_w):
        node_power.add_metric([host], node.power_u_w)
    yield node_power
    node_energy = GaugeMetricFamily(
        "carbond_node_energy_uncertainty_joules",
        "Standard uncertainty of carbond_node_energy_joules_total; a cgroup's is its share of it.",
        labels=["host"],
    )
    node_energy.add_metric([host], node.energy_u_j_total)
    yield node_energy
    emissions = GaugeMetricFamily(
        "carbond_emissions_uncertainty_grams",
        "Standard uncertainty of carbond_emissions_grams_total (energy, PUE and intensity combined).",
        labels=["host"],
    )
    emissions.add_metric([host], node.emissions_u_g_total)
    yield emissions
    dominant = GaugeMetricFamily(
        "carbond_uncertainty_dominant_info",
        "The term that contributes most to the emissions' uncertainty (e.g. yearly-average intensity); always 1.",
        labels=["host", "term"],
    )
    if node.uncertainty_dominant:
        dominant.add_metric([host, node.uncertainty_dominant], 1.0)
    yield dominant
    pue = GaugeMetricFamily(
        "carbond_pue_uncertainty", "Standard uncertainty of carbond_pue (pue_uncertainty).", labels=["host"]
    )
    pue.add_metric([host], node.pue_u)
    yield pue
    state = snap.intensity
    ratio = GaugeMetricFamily(
        "carbond_grid_intensity_uncertainty_ratio",
        "Relative standard uncertainty of the grid intensity in force (a fraction of it), by the kind of value.",
        labels=["host", "zone", "provider", "term"],
    )
    if state.value is not None and not math.isnan(state.rel_u):
        ratio.add_metric([host, state.value.zone, state.value.provider, state.rel_u_term], state.rel_u)
    yield ratio
    if node.embodied_g_total:
        embodied = GaugeMetricFamily(
            "carbond_embodied_emissions_uncertainty_grams",
            "Standard uncertainty of carbond_embodied_emissions_grams_total (the life-cycle estimate's spread).",
            labels=["host", "device"],
        )
        for device, grams in node.embodied_g_total:
            embodied.add_metric([host, device], grams * EMBODIED.rel)
        yield embodied
    yield from _calibration_families(snap)


def _calibration_families(snap: Snapshot) -> Iterator[Metric]:
    """The wall calibration: its coefficients (so identical nodes without a meter can apply them in PromQL), its
    fit quality, and whether the node's figure comes from it now (the meter gives no fresh reading)."""
    cal = snap.node.calibration
    if cal is None:
        return
    labels, values = ["host", "sensor", "model"], [snap.host, cal.sensor, cal.model]
    for name, help_text, figure in (
        (
            "carbond_calibration_intercept_watts",
            "Wall power at no component power and no utilisation (fit).",
            cal.intercept_w,
        ),
        ("carbond_calibration_component_ratio", "Wall watts per watt of measured components (fit).", cal.per_component),
        (
            "carbond_calibration_utilisation_watts",
            "Wall watts per unit of CPU utilisation, 0 to 1 (fit).",
            cal.per_utilisation,
        ),
        ("carbond_calibration_r_squared", "Coefficient of determination of the wall fit (robust, windowed).", cal.r2),
        (
            "carbond_calibration_residual_watts",
            "Robust standard deviation of wall readings about the fit.",
            cal.residual_sd_w,
        ),
        ("carbond_calibration_samples", "Ticks in the wall fit's window.", float(cal.samples)),
        (
            "carbond_calibration_in_use",
            "1 when this tick's node figure is the wall modelled by the fit.",
            float(cal.in_use),
        ),
    ):
        fam = GaugeMetricFamily(name, help_text, labels=labels)
        if not math.isnan(figure):
            fam.add_metric(values, figure)
        yield fam
