"""CodeCarbon's ``EmissionsData``: what ``stop_task()`` returns and ``final_emissions_data`` holds."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DELTA_FIELDS = ("duration", "emissions", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed", "water_consumed")
UNKNOWN_IS_NONE = frozenset({"country_name", "country_iso_code", "region", "longitude", "latitude"})


@dataclass
class EmissionsData:
    """CodeCarbon's EmissionsData: one run's (or task's) figures, its fields in CodeCarbon 3.3's order and units."""

    timestamp: str
    project_name: str
    run_id: str
    experiment_id: str
    duration: float
    emissions: float
    emissions_rate: float
    cpu_power: float
    gpu_power: float
    ram_power: float
    cpu_energy: float
    gpu_energy: float
    ram_energy: float
    energy_consumed: float
    water_consumed: float
    country_name: str | None
    country_iso_code: str | None
    region: str | None
    cloud_provider: str
    cloud_region: str
    os: str
    python_version: str
    codecarbon_version: str
    cpu_count: float
    cpu_model: str
    gpu_count: float
    gpu_model: str
    longitude: float | None
    latitude: float | None
    ram_total_size: float
    tracking_mode: str
    cpu_utilization_percent: float = 0.0
    gpu_utilization_percent: float = 0.0
    ram_utilization_percent: float = 0.0
    ram_used_gb: float = 0.0
    on_cloud: str = "N"
    pue: float = 1.0
    wue: float = 0.0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EmissionsData:
        """From a CSV row; a figure left empty (not measured) is 0, as CodeCarbon reports it; an unknown place
        (country, region, coordinates) is None, as CodeCarbon's."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            value = row.get(f.name, "")
            if value == "" and f.name in UNKNOWN_IS_NONE:
                value = None
            elif value == "" and "float" in str(f.type) and "str" not in str(f.type):
                value = 0.0
            kwargs[f.name] = value
        return cls(**kwargs)

    def minus(self, previous: EmissionsData) -> EmissionsData:
        """The figures since ``previous`` (an earlier row of the same run): CodeCarbon's delta for its outputs."""
        kw: dict[str, Any] = {
            f: float(getattr(self, f) or 0.0) - float(getattr(previous, f) or 0.0) for f in DELTA_FIELDS
        }
        delta = replace(self, **kw)
        delta.emissions_rate = delta.emissions / delta.duration if delta.duration > 0 else 0.0
        return delta

    def toJSON(self) -> str:
        """The fields as a JSON object, keys sorted, indented: CodeCarbon's ``toJSON()``."""
        return json.dumps(self, default=lambda o: o.__dict__, sort_keys=True, indent=4)

    @property
    def values(self) -> OrderedDict[str, Any]:
        return OrderedDict(asdict(self).items())


@dataclass
class TaskEmissionsData(EmissionsData):
    """CodeCarbon's TaskEmissionsData: a task's figures (``stop_task()``'s result), named by ``task_name``."""

    task_name: str = ""
