"""A job's report: the summary text, the JSON document, the CodeCarbon-compatible CSV row, the model-card block.

CSV schema (one row per run; every column of CodeCarbon's ``emissions.csv`` with its meaning and unit, so code
written for CodeCarbon reads it; then carbond's own columns). ``energy_consumed`` and the ``*_energy`` columns are IT
energy; ``emissions = energy_consumed x pue x intensity``. Figures are the job's share when ``tracking_mode`` is
``process``, the whole machine's when it is ``machine`` (see ``docs/csv-schema.md``).

======================  ======  ===========================================================================
column                  unit    meaning
======================  ======  ===========================================================================
timestamp                       end of the run, ISO 8601 UTC
project_name                    ``--project`` / ``track(project=...)``
run_id                          a UUID4 per run
experiment_id                   empty (CodeCarbon's dashboard id)
duration                s       wall-clock duration of the run
emissions               kg      CO2e of ``energy_consumed`` (x PUE x intensity)
emissions_rate          kg/s    emissions / duration
cpu_power               W       mean power of CPU-like devices (cpu, psys, soc) over the run
gpu_power               W       mean power of GPUs
ram_power               W       mean power of memory (dram, ram)
cpu_energy              kWh     energy of CPU-like devices
gpu_energy              kWh     energy of GPUs
ram_energy              kWh     energy of memory
energy_consumed         kWh     cpu_energy + gpu_energy + ram_energy (devices counted in the node total)
country_name                    the intensity zone's country, where it is one
country_iso_code                ISO 3166 alpha-3 of that country
region                          the sub-zone after ``-`` (``US-CA`` -> ``CA``), else empty
cloud_provider                  ``aws``/``gcp``/``azure`` for a ``provider:region`` zone, else empty
cloud_region                    the region of such a zone, else empty
os                              ``platform.platform()``
python_version                  of the interpreter running carbond
codecarbon_version              empty: carbond is not CodeCarbon (see ``carbond_version``)
cpu_count                       logical CPUs
cpu_model                       first ``model name`` of /proc/cpuinfo
gpu_count                       GPUs the sensors described
gpu_model                       their models, ``N x model`` joined by ``, ``
longitude, latitude             empty (carbond does not geolocate)
ram_total_size          GB      total memory (10^9 bytes)
tracking_mode                   ``process`` (the job's share) or ``machine`` (whole machine)
on_cloud                        ``Y`` when cloud_provider is set, else ``N``
pue                             power usage effectiveness applied
carbond_version                 carbond's version
host                            host name
scope                           ``job``, ``machine`` or ``none`` (not measured: see ``error``)
attribution_method              cgroup, systemd, proctree, machine, daemon or none
intensity_g_per_kwh     g/kWh   grid intensity in force at the end
intensity_zone                  its zone
intensity_provider              its provider (``static`` ...)
intensity_age_s         s       its age
emissions_g             g       ``emissions`` in grams
machine_energy_consumed kWh     the whole machine's energy over the run
machine_emissions       kg      the whole machine's emissions over the run
exit_code                       the command's exit code (``carbond measure``), else empty
command                         the command line (``carbond measure``), else empty
error                           why nothing was measured, else empty
======================  ======  ===========================================================================

The file is only ever appended to: the header is written when the file is new or empty; an existing file keeps
its own header and the new row follows its column order (columns it lacks are left out of that row).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import shlex
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from carbond import __version__
from carbond.job.ledger import DeviceFigures
from carbond.units import JOULES_PER_KWH

SCHEMA = "carbond.job.report/1"
CPU_KINDS, GPU_KINDS, RAM_KINDS = ("cpu", "psys", "soc"), ("gpu",), ("dram", "ram")

# The same constants as the Grafana dashboard's equivalents panels (see ../shared/data/README.md):
#: US EPA passenger car: about 404 g CO2 per mile (8,887 g per gallon at 22 mpg), i.e. about 251 g/km.
CAR_G_PER_KM = 251.0
#: A 32-inch LCD TV: about 97 g CO2 per hour (EPA figure, as used by CodeCarbon's dashboard).
TV_G_PER_HOUR = 97.0
#: A US household: 8.35 t CO2 per year (EPA).
HOUSEHOLD_G_PER_DAY = 8.35e6 / 365.0
EQUIVALENT_SOURCES = {
    "car_km": "US EPA passenger car, about 251 g CO2/km (404 g/mile)",
    "tv_hours": "32-inch LCD TV, about 97 g CO2/hour (EPA)",
    "household_days": "US household, 8.35 t CO2/year (EPA)",
}

CODECARBON_COLUMNS = (  # noqa: SIM905 (a list literal would take 46 lines)
    "timestamp project_name run_id experiment_id duration emissions emissions_rate cpu_power gpu_power ram_power "
    "cpu_energy gpu_energy ram_energy energy_consumed country_name country_iso_code region cloud_provider "
    "cloud_region os python_version codecarbon_version cpu_count cpu_model gpu_count gpu_model longitude latitude "
    "ram_total_size tracking_mode on_cloud pue"
).split()
CARBOND_COLUMNS = (  # noqa: SIM905
    "carbond_version host scope attribution_method intensity_g_per_kwh intensity_zone intensity_provider "
    "intensity_age_s emissions_g machine_energy_consumed machine_emissions exit_code command error"
).split()
COLUMNS = (*CODECARBON_COLUMNS, *CARBOND_COLUMNS)


@dataclass(frozen=True, slots=True)
class PhaseReport:
    name: str
    started_s: float  # from the start of the run
    duration_s: float
    energy_j: float
    emissions_g: float
    machine_energy_j: float
    machine_emissions_g: float
    energy_by_kind_j: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    """Everything about one measured run; ``scope`` says whose figures the headline ones are."""

    project: str
    run_id: str
    started_at: float  # wall-clock epoch seconds
    duration_s: float
    scope: str = "none"  # job | machine | none (not measured: see error)
    method: str = "none"  # cgroup | systemd | proctree | machine | daemon | none
    method_detail: str = ""
    energy_j: float = 0.0
    emissions_g: float = 0.0
    machine_energy_j: float = 0.0
    machine_emissions_g: float = 0.0
    energy_by_kind_j: dict[str, float] = field(default_factory=dict)
    devices: list[DeviceFigures] = field(default_factory=list)
    phases: list[PhaseReport] = field(default_factory=list)
    intensity: dict[str, Any] | None = None
    pue: float = 1.0
    source: str = "local"
    sensors: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    command: list[str] | None = None
    exit_code: int | None = None
    carbond_version: str = __version__

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / JOULES_PER_KWH

    @property
    def emissions_kg(self) -> float:
        return self.emissions_g / 1000.0

    def equivalents(self) -> dict[str, float]:
        return {
            "car_km": self.emissions_g / CAR_G_PER_KM,
            "tv_hours": self.emissions_g / TV_G_PER_HOUR,
            "household_days": self.emissions_g / HOUSEHOLD_G_PER_DAY,
        }

    def kind_group_j(self, kinds: tuple[str, ...]) -> float:
        return math.fsum(j for k, j in self.energy_by_kind_j.items() if k in kinds)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA}
        out.update(asdict(self))
        out["energy_kwh"] = self.energy_kwh
        out["machine_energy_kwh"] = self.machine_energy_j / JOULES_PER_KWH
        out["equivalents"] = {**self.equivalents(), "sources": EQUIVALENT_SOURCES}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["devices"] = [DeviceFigures(**d) for d in data.get("devices", [])]
        kwargs["phases"] = [PhaseReport(**p) for p in data.get("phases", [])]
        return cls(**kwargs)

    def write_json(self, path: str | Path) -> None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
        tmp.replace(target)


def load_json(path: str | Path) -> Report:
    return Report.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _g(x: float) -> str:
    return f"{x:.4g}"


def summary(r: Report) -> str:
    """The text printed at the end of ``carbond measure``."""
    head = f"carbond: {r.project} run {r.run_id[:8]}"
    if r.command is not None:
        head += f": {shlex.join(r.command)}"
    if r.exit_code is not None:
        head += f" (exit code {r.exit_code})"
    lines = [head, f"  duration      {r.duration_s:.3f} s"]
    if r.scope == "none":
        lines.append(f"  not measured: {r.error}")
        return "\n".join(lines)
    whose = "the job's share" if r.scope == "job" else "the whole machine"
    kinds = ", ".join(f"{k} {_g(j / JOULES_PER_KWH)}" for k, j in sorted(r.energy_by_kind_j.items()))
    lines.append(f"  energy        {_g(r.energy_kwh)} kWh ({kinds}) [{whose}]")
    lines.append(f"  emissions     {_g(r.emissions_g)} g CO2e")
    if r.scope == "job":
        lines.append(
            f"  machine       {_g(r.machine_energy_j / JOULES_PER_KWH)} kWh, {_g(r.machine_emissions_g)} g CO2e"
        )
    i = r.intensity
    if i is not None:
        src = f", {i['source']} {i['year']}" if i.get("source") and i.get("year") else ""
        lines.append(
            f"  intensity     {_g(i['g_per_kwh'])} g/kWh, zone {i['zone']}, provider {i['provider']}{src}, "
            f"age {_g(i['age_s'])} s"
        )
    lines.append(f"  PUE           {r.pue:g}")
    eq = r.equivalents()
    lines.append(
        f"  equivalents   {_g(eq['car_km'])} km by car, {_g(eq['tv_hours'])} h of TV, "
        f"{_g(eq['household_days'])} days of a household's emissions"
    )
    lines.append(f"  attribution   {r.method}: {r.method_detail} ({whose})")
    lines += [f"  note          {n}" for n in r.notes]
    if r.phases:
        lines.append("  phases")
        for p in r.phases:
            lines.append(
                f"    {p.name:<12} {p.duration_s:9.3f} s  {_g(p.energy_j / JOULES_PER_KWH)} kWh  "
                f"{_g(p.emissions_g)} g CO2e"
            )
    return "\n".join(lines)


@cache
def _countries() -> dict[str, tuple[str, str]]:
    text = resources.files("carbond.data").joinpath("country_intensity.csv").read_text(encoding="utf-8")
    return {row["alpha2"]: (row["name"], row["alpha3"]) for row in csv.DictReader(io.StringIO(text))}


def location(zone: str) -> dict[str, str]:
    """Country, region and cloud fields of an intensity zone (``FR``, ``US-CA``, ``aws:eu-west-3`` ...)."""
    out = {"country_name": "", "country_iso_code": "", "region": "", "cloud_provider": "", "cloud_region": ""}
    if ":" in zone:
        out["cloud_provider"], _, out["cloud_region"] = zone.partition(":")
        return out
    country, _, region = zone.partition("-")
    found = _countries().get(country.upper())
    if found is None and len(country) == 3:
        found = next((v for v in _countries().values() if v[1] == country.upper()), None)
    if found is not None:
        out["country_name"], out["country_iso_code"] = found
        out["region"] = region
    return out


def csv_row(r: Report) -> dict[str, Any]:
    dur = r.duration_s
    cpu, gpu, ram = (r.kind_group_j(k) for k in (CPU_KINDS, GPU_KINDS, RAM_KINDS))
    i = r.intensity or {}
    loc = location(str(i.get("zone", "")))
    h = r.host
    num = (lambda x: x) if r.scope != "none" else (lambda x: "")
    return {
        "timestamp": datetime.fromtimestamp(r.started_at + dur, UTC).isoformat(timespec="seconds"),
        "project_name": r.project,
        "run_id": r.run_id,
        "experiment_id": "",
        "duration": dur,
        "emissions": num(r.emissions_kg),
        "emissions_rate": num(r.emissions_kg / dur if dur > 0 else 0.0),
        "cpu_power": num(cpu / dur if dur > 0 else 0.0),
        "gpu_power": num(gpu / dur if dur > 0 else 0.0),
        "ram_power": num(ram / dur if dur > 0 else 0.0),
        "cpu_energy": num(cpu / JOULES_PER_KWH),
        "gpu_energy": num(gpu / JOULES_PER_KWH),
        "ram_energy": num(ram / JOULES_PER_KWH),
        "energy_consumed": num(r.energy_kwh),
        **loc,
        "os": h.get("os", ""),
        "python_version": h.get("python_version", ""),
        "codecarbon_version": "",
        "cpu_count": h.get("cpu_count", ""),
        "cpu_model": h.get("cpu_model", ""),
        "gpu_count": h.get("gpu_count", 0),
        "gpu_model": h.get("gpu_model", ""),
        "longitude": "",
        "latitude": "",
        "ram_total_size": h.get("ram_total_gb", ""),
        "tracking_mode": "process" if r.scope == "job" else "machine",
        "on_cloud": "Y" if loc["cloud_provider"] else "N",
        "pue": r.pue,
        "carbond_version": r.carbond_version,
        "host": h.get("name", ""),
        "scope": r.scope,
        "attribution_method": r.method,
        "intensity_g_per_kwh": i.get("g_per_kwh", ""),
        "intensity_zone": i.get("zone", ""),
        "intensity_provider": i.get("provider", ""),
        "intensity_age_s": i.get("age_s", ""),
        "emissions_g": num(r.emissions_g),
        "machine_energy_consumed": num(r.machine_energy_j / JOULES_PER_KWH),
        "machine_emissions": num(r.machine_emissions_g / 1000.0),
        "exit_code": "" if r.exit_code is None else r.exit_code,
        "command": "" if r.command is None else shlex.join(r.command),
        "error": r.error,
    }


def append_csv(path: str | Path, r: Report) -> list[str]:
    """Append the run's row (header first if the file is new); returns our columns the existing header lacks."""
    row = csv_row(r)
    with Path(path).open("ab+") as f:
        with contextlib.suppress(ImportError, OSError):  # concurrent runs appending to one file
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        first = f.readline().decode("utf-8", "replace")
        header = next(csv.reader([first])) if first.strip() else list(COLUMNS)
        end = f.seek(0, os.SEEK_END)
        buf = io.StringIO()
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                buf.write("\n")
        writer = csv.DictWriter(buf, fieldnames=header, restval="", extrasaction="ignore", lineterminator="\n")
        if not first.strip():
            writer.writeheader()
        writer.writerow(row)
        f.write(buf.getvalue().encode("utf-8"))
    return [c for c in COLUMNS if c not in header]


def host_info(procfs: Path, device_models: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in (procfs / "cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    ram_gb: float | str = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (procfs / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) * 1024 / 1e9, 3)
    gpus = [model for device, model in device_models if device.startswith("gpu")]
    counts: dict[str, int] = {}
    for model in gpus:
        counts[model] = counts.get(model, 0) + 1
    return {
        "name": socket.gethostname(),
        "os": platform.platform(),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count() or 0,
        "ram_total_gb": ram_gb,
        "gpu_count": len(gpus),
        "gpu_model": ", ".join(f"{n} x {m}" for m, n in counts.items()),
    }
