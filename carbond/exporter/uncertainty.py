"""The uncertainty and wall-calibration families, declared (:mod:`carbond.exporter.family`).

One standard uncertainty (one standard deviation, in the figure's own base unit) stands beside each power, energy
and emissions figure; never a bound. How they are found: :mod:`carbond.uncertainty`. The wall calibration's
families give its coefficients (so identical nodes without a meter can apply them in PromQL), its fit quality, and
whether the node's figure comes from it now (the meter gives no fresh reading).
"""

from __future__ import annotations

from collections.abc import Callable

from carbond.exporter.family import DEVICE, Family, FromSnapshot, Sample, finite
from carbond.model import CalibrationState, Snapshot
from carbond.uncertainty import EMBODIED


def _intensity_ratio(s: Snapshot) -> list[Sample]:
    state = s.intensity
    if state.value is None or not finite(state.rel_u):
        return []
    return [((state.value.zone, state.value.provider, state.rel_u_term), state.rel_u)]


def _calibration(figure: Callable[[CalibrationState], float]) -> FromSnapshot:
    """One of the calibration's figures, without a series while it is NaN (no fit yet)."""

    def samples(s: Snapshot) -> list[Sample]:
        cal = s.node.calibration
        if cal is None or not finite(figure(cal)):
            return []
        return [((cal.sensor, cal.model), figure(cal))]

    return FromSnapshot(samples)


def _calibrated(s: Snapshot) -> bool:
    return s.node.calibration is not None


CALIBRATION = ("sensor", "model")

UNCERTAINTY = (
    Family(
        "carbond_device_power_uncertainty_watts", "gauge", "watts",
        "Standard uncertainty of carbond_device_power_watts (one standard deviation).", DEVICE,
        FromSnapshot(lambda s: (
            ((d.device, d.kind, d.sensor), d.power_u_w)
            for d in s.devices.states if finite(d.power_w) and finite(d.power_u_w)
        )),
        "standard uncertainty (one standard deviation, not a bound) of the device's power and energy total",
    ),
    Family(
        "carbond_device_energy_uncertainty_joules", "gauge", "joules",
        "Standard uncertainty of carbond_device_energy_joules_total (one standard deviation).", DEVICE,
        FromSnapshot(lambda s: (((d.device, d.kind, d.sensor), d.energy_u_j_total) for d in s.devices.states)),
        "", same_row=True,
    ),
    Family(
        "carbond_node_power_uncertainty_watts", "gauge", "watts",
        "Standard uncertainty of carbond_node_power_watts (one standard deviation).", (),
        FromSnapshot(lambda s: [((), s.node.power_u_w)] if finite(s.node.power_w) and finite(s.node.power_u_w) else []),
        "the same for the node; a cgroup's is its share of the node's (PromQL in docs/accuracy.md)",
    ),
    Family(
        "carbond_node_energy_uncertainty_joules", "gauge", "joules",
        "Standard uncertainty of carbond_node_energy_joules_total; a cgroup's is its share of it.", (),
        FromSnapshot(lambda s: [((), s.node.energy_u_j_total)]), "", same_row=True,
    ),
    Family(
        "carbond_emissions_uncertainty_grams", "gauge", "grams",
        "Standard uncertainty of carbond_emissions_grams_total (energy, PUE and intensity combined).", (),
        FromSnapshot(lambda s: [((), s.node.emissions_u_g_total)]),
        "standard uncertainty of `carbond_emissions_grams_total` (energy, PUE and intensity, root-sum-square)",
    ),
    Family(
        "carbond_uncertainty_dominant_info", "gauge", "",
        "The term that contributes most to the emissions' uncertainty (e.g. yearly-average intensity); always 1.",
        ("term",),
        FromSnapshot(lambda s: [((s.node.uncertainty_dominant,), 1.0)] if s.node.uncertainty_dominant else []),
        "1; the term that contributes most to the emissions' uncertainty",
    ),
    Family(
        "carbond_pue_uncertainty", "gauge", "", "Standard uncertainty of carbond_pue (pue_uncertainty).", (),
        FromSnapshot(lambda s: [((), s.node.pue_u)]), "the configured `pue_uncertainty`",
    ),
    Family(
        "carbond_grid_intensity_uncertainty_ratio", "gauge", "ratio",
        "Relative standard uncertainty of the grid intensity in force (a fraction of it), by the kind of value.",
        ("zone", "provider", "term"), FromSnapshot(_intensity_ratio),
        "relative standard uncertainty of the intensity in force (yearly average, live, estimated, direct factors)",
    ),
    Family(
        "carbond_embodied_emissions_uncertainty_grams", "gauge", "grams",
        "Standard uncertainty of carbond_embodied_emissions_grams_total (the life-cycle estimate's spread).",
        ("device",),
        FromSnapshot(lambda s: (((device,), grams * EMBODIED.rel) for device, grams in s.node.embodied_g_total)),
        "standard uncertainty of the embodied total",
        when=lambda s: bool(s.node.embodied_g_total),
    ),
    Family(
        "carbond_calibration_intercept_watts", "gauge", "watts",
        "Wall power at no component power and no utilisation (fit).", CALIBRATION,
        _calibration(lambda c: c.intercept_w),
        "the wall fit: platform W = intercept + ratio x components W + utilisation W x CPU utilisation (0-1); apply "
        "them to identical nodes without a meter",
        when=_calibrated,
    ),
    Family(
        "carbond_calibration_component_ratio", "gauge", "ratio", "Wall watts per watt of measured components (fit).",
        CALIBRATION, _calibration(lambda c: c.per_component), "", when=_calibrated, same_row=True,
    ),
    Family(
        "carbond_calibration_utilisation_watts", "gauge", "watts",
        "Wall watts per unit of CPU utilisation, 0 to 1 (fit).", CALIBRATION,
        _calibration(lambda c: c.per_utilisation), "", when=_calibrated, same_row=True,
    ),
    Family(
        "carbond_calibration_r_squared", "gauge", "",
        "Coefficient of determination of the wall fit (robust, windowed).", CALIBRATION, _calibration(lambda c: c.r2),
        "the fit's quality, its window, and 1 when this tick's node is the wall modelled by the fit",
        when=_calibrated,
    ),
    Family(
        "carbond_calibration_residual_watts", "gauge", "watts",
        "Robust standard deviation of wall readings about the fit.", CALIBRATION,
        _calibration(lambda c: c.residual_sd_w), "", when=_calibrated, same_row=True,
    ),
    Family(
        "carbond_calibration_samples", "gauge", "", "Ticks in the wall fit's window.", CALIBRATION,
        _calibration(lambda c: float(c.samples)), "", when=_calibrated, same_row=True,
    ),
    Family(
        "carbond_calibration_in_use", "gauge", "", "1 when this tick's node figure is the wall modelled by the fit.",
        CALIBRATION, _calibration(lambda c: float(c.in_use)), "", when=_calibrated, same_row=True,
    ),
)  # fmt: skip
