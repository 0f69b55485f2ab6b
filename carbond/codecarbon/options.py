"""The trackers' keywords checked as CodeCarbon checks them, and mapped onto carbond's config.

carbond's promise is CodeCarbon's: a bad value is logged (an error of the ``carbond.codecarbon`` logger, naming the
keyword and the value) and replaced by the default, never an exception in the program. What each ``force_*`` and
hardware keyword becomes:

- ``force_carbon_intensity_g_co2e_kwh``: ``intensity.override_g_per_kwh`` (a fixed intensity; negative: ignored);
- ``force_cpu_power``: the CPU is the TDP model at this full-load power (``cpu.power_watts``) scaled by the load,
  the measuring CPU backends (rapl, powermetrics) left out, as CodeCarbon's "User Input TDP constant";
- ``force_mode_cpu_load``: the CPU is the TDP model (load x TDP), the measuring CPU backends left out;
- ``force_ram_power``: the memory model gives this power (``ram.watts_per_gb`` = watts / installed GiB); a
  readable RAPL DRAM domain is a measurement and is kept;
- ``rapl_prefer_psys``: ``rapl.use_psys`` when given (carbond's default prefers psys where it is readable);
- ``rapl_include_dram``: nothing to do: carbond counts RAPL's DRAM domain as memory where readable (the
  measurement), never inside the CPU figure, so there is no double count to avoid.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carbond.codecarbon.settings import DEFAULTS

if TYPE_CHECKING:
    from carbond.config import Config

log = logging.getLogger("carbond.codecarbon")
#: measuring CPU backends, left out when CodeCarbon's CPU model is forced
CPU_METERS = ("rapl", "powermetrics")
PUE_RANGE = (1.0, 10.0)


def _error(key: str, value: Any, why: str, fallback: Any) -> None:
    log.error("carbond.codecarbon: %s=%r %s: %r used instead", key, value, why, fallback)


def _number(o: dict[str, Any], key: str) -> float | None:
    """``o[key]`` as a finite float (None stays None); anything else is logged and becomes the default."""
    value = o[key]
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number):
        return number
    _error(key, value, "is not a number", "the default" if DEFAULTS[key] is None else DEFAULTS[key])
    return None if DEFAULTS[key] is None else float(DEFAULTS[key])


def checked(o: dict[str, Any]) -> dict[str, Any]:
    """The options with every bad value replaced by its default (each logged once)."""
    for key in ("measure_power_secs", "api_call_interval", "pue", "wue", "force_cpu_power", "force_ram_power"):
        o[key] = _number(o, key)
    o["force_carbon_intensity_g_co2e_kwh"] = _number(o, "force_carbon_intensity_g_co2e_kwh")
    secs = o["measure_power_secs"]
    if secs is None or secs < 0:
        _error("measure_power_secs", secs, "is negative", DEFAULTS["measure_power_secs"])
        o["measure_power_secs"] = float(DEFAULTS["measure_power_secs"])
    pue = o["pue"]
    if pue is not None and not PUE_RANGE[0] <= pue <= PUE_RANGE[1]:
        bounded = min(max(pue, PUE_RANGE[0]), PUE_RANGE[1])
        _error("pue", pue, f"is outside {PUE_RANGE[0]:g}-{PUE_RANGE[1]:g} (a PUE is facility / IT energy)", bounded)
        o["pue"] = bounded
    if o["wue"] is None or o["wue"] < 0:
        _error("wue", o["wue"], "is negative", 0.0)
        o["wue"] = 0.0
    for key in ("force_cpu_power", "force_ram_power", "force_carbon_intensity_g_co2e_kwh"):
        if o[key] is not None and (o[key] < 0 or (o[key] == 0 and key != "force_carbon_intensity_g_co2e_kwh")):
            _error(key, o[key], "must be above 0", None)
            o[key] = None
    choices = {"tracking_mode": ("machine", "process"), "on_csv_write": ("append", "update")}
    for key, allowed in choices.items():
        if o[key] not in allowed:
            _error(key, o[key], f"is not one of {', '.join(allowed)}", DEFAULTS[key])
            o[key] = DEFAULTS[key]
    return o


def _mem_gib(procfs: Path) -> float | None:
    from carbond.procfs import mem_total_bytes

    try:
        return mem_total_bytes((procfs / "meminfo").read_bytes()) / 2**30
    except (OSError, ValueError):
        return None


def config_update(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The changes to carbond's config that the ``force_*`` and hardware keywords ask for."""
    update: dict[str, Any] = {}
    intensity = o["force_carbon_intensity_g_co2e_kwh"]
    if intensity is not None:
        log.info("carbond.codecarbon: using forced carbon intensity: %g gCO2e/kWh", intensity)
        update["intensity"] = cfg.intensity.model_copy(update={"override_g_per_kwh": intensity})
    sections = dict(cfg)
    cpu_power = o["force_cpu_power"]
    if cpu_power is not None or o["force_mode_cpu_load"]:
        sensors = [s for s in cfg.sensors if s not in CPU_METERS]
        if "tdp" not in sensors:
            sensors.append("tdp")
        update["sensors"] = sensors
        if cpu_power is not None:
            update["cpu"] = sections["cpu"].model_copy(update={"power_watts": cpu_power})
        log.info("carbond.codecarbon: CPU from the TDP model (force_cpu_power=%s): %s", cpu_power, ", ".join(sensors))
    ram_power = o["force_ram_power"]
    if ram_power is not None:
        gib = _mem_gib(Path(cfg.paths.procfs))
        if gib:
            update["ram"] = sections["ram"].model_copy(update={"watts_per_gb": ram_power / gib})
            sensors = list(update.get("sensors", cfg.sensors))
            update["sensors"] = sensors if "ram" in sensors else [*sensors, "ram"]
        else:
            _error("force_ram_power", ram_power, "cannot be spread: MemTotal is unreadable", None)
    if o["rapl_prefer_psys"] is not None and "rapl" in sections:
        update["rapl"] = sections["rapl"].model_copy(update={"use_psys": bool(o["rapl_prefer_psys"])})
    return update
