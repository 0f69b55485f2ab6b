"""A job's embodied emissions: the machine's amortised manufacturing footprint over the job's time (SCI's M).

The same figures as the daemon's ``carbond_embodied_emissions_grams_total``, by the same rule
(:func:`carbond.embodied.plan`: the server from ``embodied.server_kg``, the instance type or this machine's
estimate, a VM's share of its host or of a median cloud host, a container's quota; each GPU by its model; spread
over ``lifetime_years``), charged for the run's duration. A job that is a share of the machine
(scope ``job``) is charged that share of the machine's embodied emissions, the share being its part of the
machine's energy over the run: the resources it reserved, as SCI's ``RR / ToR`` asks, measured the only way the
job's figures allow. These are estimates (studies differ by a factor of two): they are never added to the
operational emissions.
"""

from __future__ import annotations

from collections.abc import Iterable

from carbond.config import Config
from carbond.embodied import SECONDS_PER_YEAR, gpu_kg, plan


def rate(cfg: Config, zone: str, gpu_models: Iterable[str]) -> tuple[float, str]:
    """The machine's embodied grams per second and how the figure was reached (0 when ``embodied.enabled`` is off)."""
    settings = cfg.embodied
    if not settings.enabled:
        return 0.0, "embodied.enabled is false"
    p = cfg.paths
    found = plan(settings, zone, p.sysfs, p.procfs, p.cgroupfs)
    kg, how, share = found.kg, found.how, found.share
    gpus = [gpu_kg(settings, m) for m in gpu_models]
    total = kg + sum(gpus)
    g_per_s = total * 1000.0 * share / (settings.lifetime_years * SECONDS_PER_YEAR)
    parts = f"server {kg:.0f} kg ({how})" + (f" + {len(gpus)} GPU(s) {sum(gpus):.0f} kg" if gpus else "")
    return g_per_s, f"{parts}, over {settings.lifetime_years:g} years, host share {share:.3g}"


def job_share(scope: str, energy_j: float, machine_energy_j: float) -> float:
    """The part of the machine's embodied emissions a run is charged."""
    if scope != "job":
        return 1.0
    return min(max(energy_j / machine_energy_j, 0.0), 1.0) if machine_energy_j > 0 else 0.0
