"""The Hugging Face model-card metadata block ``co2_eq_emissions`` for a job's report.

Paste the output into the YAML front matter of a model's ``README.md``; see
https://huggingface.co/docs/hub/model-cards-co2 for the fields.
"""

from __future__ import annotations

from typing import Any

from carbond.job.report import Report, location


def model_card(r: Report, training_type: str = "pre-training", where: str = "", hardware: str = "") -> dict[str, Any]:
    """The Hugging Face model-card metadata block ``co2_eq_emissions`` (emissions in grams of CO2e)."""
    i = r.intensity or {}
    loc = location(str(i.get("zone", "")))
    if not where:
        parts = [loc["region"], loc["country_name"]] if loc["country_name"] else [loc["cloud_region"]]
        where = ", ".join(p for p in parts if p) or str(i.get("zone", "")) or "unknown"
    if not hardware:
        h = r.host
        cpu = f"{h.get('cpu_model') or 'CPU'} ({h.get('cpu_count', '?')} logical CPUs)"
        hardware = f"{h['gpu_model']}, {cpu}" if h.get("gpu_model") else cpu
    intensity = f"{i['g_per_kwh']:g} g/kWh ({i.get('provider', '')}, zone {i.get('zone', '')})" if i else "unknown"
    counted = [d for d in r.devices if d.in_node_total]
    modelled = [d.device for d in counted if not d.measured]
    if not modelled:
        how = "measured energy"
    elif len(modelled) == len(counted):
        how = "estimated energy (power models)"
    else:
        how = f"energy measured, with {', '.join(modelled)} estimated by a power model,"
    if i.get("estimated"):
        intensity += ", estimated"
    source = (
        f"carbond {r.carbond_version}: {how} {r.energy_kwh:.6g} kWh ({r.method} attribution, "
        f"{'the job' if r.scope == 'job' else 'whole machine'}) x PUE {r.pue:g} x grid intensity {intensity}"
    )
    if r.embodied_g:
        source += (
            f"; embodied (hardware manufacturing, amortised) {r.embodied_g:.6g} g CO2e, estimated, "
            "not included in emissions"
        )
    if r.emissions_u_g is not None:
        source += f"; standard uncertainty +- {r.emissions_u_g:.3g} g CO2e"
        if r.uncertainty_dominant:
            source += f" (mostly: {r.uncertainty_dominant})"
    if r.estimated:
        source = "estimated: " + source
    return {
        "co2_eq_emissions": {
            "emissions": round(r.emissions_g, 6),
            "source": source,
            "training_type": training_type,
            "geographical_location": where,
            "hardware_used": hardware,
        }
    }
