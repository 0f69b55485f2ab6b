"""A job's report: the data of one run and its JSON document (schema ``carbond.job.report/1``).

The CSV rows are made by :mod:`carbond.job.csvfile` (columns in ``docs/csv-schema.md``), the text summary by
:mod:`carbond.job.text`, the model-card block by :mod:`carbond.job.modelcard`. Figures are the job's share when
``scope`` is ``job``, the whole machine's when it is ``machine``; ``energy_j`` is IT energy (PUE not applied),
``emissions_g`` is ``energy x PUE x intensity`` integrated tick by tick, ``embodied_g`` the hardware's amortised
manufacturing emissions over the run (SCI's M term, never added to ``emissions_g``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import socket
from dataclasses import asdict, dataclass, field, fields
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
    embodied_g: float = 0.0


@dataclass
class Report:
    """Everything about one measured run; ``scope`` says whose figures the headline ones are."""

    project: str
    run_id: str
    started_at: float  # wall-clock epoch seconds
    duration_s: float
    scope: str = "none"  # job | machine | none (not measured: see error)
    asked_scope: str = ""  # job | machine: what the run was asked to measure (CodeCarbon's tracking_mode)
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
    experiment_id: str = ""  # CodeCarbon's dashboard id, where the drop-in was given one
    embodied_g: float = 0.0  # amortised manufacturing emissions over the run (the job's share in scope job)
    embodied_detail: str = ""
    wue: float = 0.0  # water usage effectiveness, L/kWh (CodeCarbon's wue)
    #: means over the run: cpu_percent (machine CPU busy), ram_percent, ram_used_gib; gpu_percent where read
    utilization: dict[str, float] = field(default_factory=dict)
    #: standard uncertainties of energy_j and emissions_g (None where unknown), and the term that dominates
    energy_u_j: float | None = None
    emissions_u_g: float | None = None
    uncertainty_dominant: str = ""

    @property
    def estimated(self) -> bool:
        """True when a counted figure comes from a power model, or the intensity is an estimate/yearly average."""
        counted = [d for d in self.devices if d.in_node_total]
        return any(not d.measured for d in counted) or bool((self.intensity or {}).get("estimated"))

    @property
    def power_scope(self) -> str:
        """``at the wall`` when a platform sensor (BMC, meter, UPS, plug) gave the machine's draw for this run (its
        part beyond the components is the ``other`` kind), else ``components only`` (CPU, memory, GPU as counted)."""
        wall = any(d.kind == "platform" and d.machine_energy_j > 0 for d in self.devices)
        return "at the wall" if wall and "other" in self.energy_by_kind_j else "components only"

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
        out["power_scope"] = self.power_scope
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


class NotAReport(ValueError):
    """The file is readable but is not a carbond job report."""


def load_json(path: str | Path) -> Report:
    """A report written by ``carbond measure --json`` or ``track(json=...)``; NotAReport for anything else."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        raise NotAReport(f"{path} is not a carbond job report (not JSON)") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise NotAReport(f'{path} is not a carbond job report (no "schema": "{SCHEMA}")')
    try:
        return Report.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise NotAReport(f"{path}: a damaged carbond job report ({exc})") from None


@cache
def _countries() -> dict[str, tuple[str, str]]:
    text = resources.files("carbond.data").joinpath("country_intensity.csv").read_text(encoding="utf-8")
    return {row["alpha2"]: (row["name"], row["alpha3"]) for row in csv.DictReader(io.StringIO(text))}


def location(zone: str) -> dict[str, str]:
    """Country, region and cloud fields of an intensity zone (``FR``, ``US-CA``, ``aws:eu-west-3`` ...)."""
    out = {"country_name": "", "country_iso_code": "", "region": "", "cloud_provider": "", "cloud_region": ""}
    if ":" in zone:
        out["cloud_provider"], _, out["cloud_region"] = zone.partition(":")
        key = zone.strip().lower().replace(" ", "")
        found_cloud = _cloud_countries().get(key)
        grid = _cloud_grids().get(key)
        # a US grid wins over a match of the row's name: "Georgia", the state, is also a country
        if grid is not None and (found_cloud is None or grid == "US" or key.startswith("gcp:")):
            of_grid = location(grid)
            found_cloud = (of_grid["country_name"], of_grid["country_iso_code"]) if of_grid["country_name"] else None
        if found_cloud is not None:
            out["country_name"], out["country_iso_code"] = found_cloud
        return out
    country, _, region = zone.partition("-")
    found = _countries().get(country.upper())
    if found is None and len(country) == 3:
        found = next((v for v in _countries().values() if v[1] == country.upper()), None)
    if found is not None:
        out["country_name"], out["country_iso_code"] = found
        out["region"] = region
    return out


#: the country (alpha-2) of each GCP region the shipped table names by its city or state (Google's region list)
GCP_COUNTRIES = dict(
    pair.split("=")
    for pair in (  # noqa: SIM905 (a list literal would take 40 lines)
        "africa-south1=ZA asia-northeast1=JP asia-northeast2=JP asia-northeast3=KR asia-south1=IN asia-south2=IN "
        "asia-southeast2=ID australia-southeast1=AU australia-southeast2=AU europe-central2=PL europe-north2=SE "
        "europe-southwest1=ES europe-west10=DE europe-west12=IT europe-west2=GB europe-west3=DE europe-west4=NL "
        "europe-west6=CH europe-west8=IT europe-west9=FR me-central1=QA me-central2=SA me-west1=IL "
        "northamerica-northeast1=CA northamerica-northeast2=CA northamerica-south1=MX southamerica-east1=BR "
        "southamerica-west1=CL us-central1=US us-central2=US us-east1=US us-east2=US us-east4=US us-east5=US "
        "us-south1=US us-west1=US us-west2=US us-west3=US us-west4=US"
    ).split()
)


@cache
def _cloud_grids() -> dict[str, str]:
    """The country (alpha-2) of each cloud region the shipped table names by a city: its grid's (``Paris (grid
    FR)``), else, for GCP, :data:`GCP_COUNTRIES`."""
    from carbond.intensity.static import rows

    return {f"gcp:{region}": country for region, country in GCP_COUNTRIES.items()} | {
        r.intensity.zone.lower().replace(" ", ""): m.group(1).upper()
        for provider in ("aws", "gcp", "azure")
        for r in rows(provider)
        if (m := re.search(r"\(grid ([A-Za-z]{2})(?![A-Za-z])", r.name)) is not None
    }


@cache
def _cloud_countries() -> dict[str, tuple[str, str]]:
    """Country name and alpha-3 of the cloud regions whose row in the shipped region table names a country
    (``gcp:europe-west1`` Belgium); regions named by a city or state there (``gcp:europe-west10`` Berlin) have none."""
    from carbond.intensity.static import rows

    by_name = {name: (name, alpha3) for name, alpha3 in _countries().values()}
    return {
        r.intensity.zone.lower().replace(" ", ""): by_name[country]
        for provider in ("aws", "gcp", "azure")
        for r in rows(provider)
        # "Belgium", or "France (grid FR)" where the row is its grid zone's figure
        if (country := r.name.split(" (grid ", 1)[0]) in by_name
    }


def host_info(procfs: Path, device_models: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in (procfs / "cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    ram_gib: float | str = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (procfs / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 3)  # GiB, as CodeCarbon's ram_total_size
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
        "ram_total_gib": ram_gib,
        "gpu_count": len(gpus),
        "gpu_model": ", ".join(f"{n} x {m}" for m, n in counts.items()),
    }
