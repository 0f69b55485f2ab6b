"""What people read: the summary after a job, its live progress line, and figures in J/Wh and g rather than
``7.1e-05 kWh``.

Energy is shown in the unit that keeps the number readable (J below 1 Wh, Wh below 1 kWh, then kWh and MWh),
emissions in mg, g, kg or t; a number never carries an exponent.
"""

from __future__ import annotations

import math
import shlex

from carbond.job.report import Report

_ENERGY = ((3.6e9, "MWh"), (3.6e6, "kWh"), (3600.0, "Wh"), (1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ"))
_MASS = ((1e6, "t"), (1e3, "kg"), (1.0, "g"), (1e-3, "mg"), (1e-6, "µg"))
_DISTANCE = ((1.0, "km"), (1e-3, "m"), (1e-5, "cm"), (1e-6, "mm"))
_TIME = ((86400.0, "days"), (3600.0, "h"), (60.0, "min"), (1.0, "s"), (1e-3, "ms"))


def _number(x: float) -> str:
    """Three significant digits without an exponent (1234 -> 1234, 12.345 -> 12.3, 0.01234 -> 0.0123)."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else "<0.001"


def _scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    if value == 0:
        return "0 " + next((u for f, u in units if f == 1.0), units[-1][1])
    for factor, unit in units:
        if abs(value) >= factor:
            return f"{_number(value / factor)} {unit}"
    factor, unit = units[-1]
    return f"{_number(value / factor)} {unit}"


def energy(joules: float) -> str:
    """``41.2 J``, ``12.3 Wh``, ``1.50 kWh``."""
    return _scaled(joules, _ENERGY)


def mass(grams: float) -> str:
    """``5.43 mg``, ``12.0 g``, ``3.20 kg``."""
    return _scaled(grams, _MASS)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min {s:02d} s" if hours else f"{m} min {s:02d} s"


def progress(r: Report) -> str:
    """The one-line live figures of a running job (``carbond measure`` on a terminal)."""
    if r.scope == "none":
        return f"carbond: {duration(r.duration_s)} running, not measured: {r.error}"
    whose = "job" if r.scope == "job" else "machine"
    return (
        f"carbond: {duration(r.duration_s)} running, {energy(r.energy_j)} ({whose}), {mass(r.emissions_g)} CO2e so far"
    )


def summary(r: Report) -> str:
    """The text printed at the end of ``carbond measure`` and by ``carbond report``."""
    # "carbond: run fe9a1cd8", the project named only when it is not the default one ("carbond: carbond run")
    head = (
        f"carbond: run {r.run_id[:8]}" if r.project in ("", "carbond") else f"carbond: {r.project}, run {r.run_id[:8]}"
    )
    if r.command is not None:
        head += f": {shlex.join(r.command)}"
    if r.exit_code is not None:
        head += f" (exit code {r.exit_code})"
    lines = [head, f"  duration      {duration(r.duration_s)}"]
    if r.scope == "none":
        lines.append(f"  not measured: {r.error}")
        return "\n".join(lines)
    whose = "the job's share" if r.scope == "job" else "the whole machine"
    how = ", estimated (power models)" if any(not d.measured for d in r.devices if d.in_node_total) else ""
    kinds = ", ".join(f"{k} {energy(j)}" for k, j in sorted(r.energy_by_kind_j.items()))
    lines.append(f"  energy        {energy(r.energy_j)} IT ({kinds}) [{whose}{how}, {r.power_scope}]")
    lines.append(f"  emissions     {mass(r.emissions_g)}{plus_minus(r)} CO2e (x PUE x intensity)")
    if r.embodied_g:
        lines.append(f"  embodied      {mass(r.embodied_g)} CO2e, estimated, not included above ({r.embodied_detail})")
    if r.scope == "job":
        lines.append(f"  machine       {energy(r.machine_energy_j)}, {mass(r.machine_emissions_g)} CO2e")
    i = r.intensity
    if i is not None:
        src = f", {i['source']} {i['year']}" if i.get("source") and i.get("year") else ""
        age = i.get("age_s")
        known = isinstance(age, int | float) and math.isfinite(age)
        age = age if known else 0.0
        lines.append(
            f"  intensity     {_number(i['g_per_kwh'])} g/kWh, zone {i['zone']}, provider {i['provider']}{src}, "
            f"age {duration(max(float(age or 0.0), 0.0)) if known else 'unknown'}"
        )
    lines.append(f"  PUE           {r.pue:g}")
    eq = r.equivalents()
    lines.append(
        f"  equivalents   {_scaled(eq['car_km'], _DISTANCE)} by car, {_scaled(eq['tv_hours'] * 3600, _TIME)} of TV, "
        f"{_scaled(eq['household_days'] * 86400, _TIME)} of a household's emissions"
    )
    said = whose.removeprefix("the ") in r.method_detail
    lines.append(f"  attribution   {r.method}: {r.method_detail}" + ("" if said else f" ({whose})"))
    lines += [f"  note          {n}" for n in r.notes]
    if r.phases:
        lines.append("  phases")
        for p in r.phases:
            lines.append(
                f"    {p.name:<12} {duration(p.duration_s):>12}  {energy(p.energy_j):>10}  {mass(p.emissions_g)} CO2e"
            )
    return "\n".join(lines)


def plus_minus(r: Report) -> str:
    """`` +- 2.1 g (mostly: yearly-average intensity)``: the emissions' standard uncertainty, where known."""
    if r.emissions_u_g is None:
        return ""
    mostly = f" (mostly: {r.uncertainty_dominant})" if r.uncertainty_dominant else ""
    return f" +- {mass(r.emissions_u_g)}{mostly}"
