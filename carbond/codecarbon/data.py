"""CodeCarbon's ``EmissionsData``: what ``stop_task()`` returns and ``final_emissions_data`` holds."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any


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
    country_name: str
    country_iso_code: str
    region: str
    cloud_provider: str
    cloud_region: str
    os: str
    python_version: str
    codecarbon_version: str
    cpu_count: float
    cpu_model: str
    gpu_count: float
    gpu_model: str
    longitude: float | str
    latitude: float | str
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
        """From a CSV row; a figure left empty (not measured) is 0, as CodeCarbon reports it."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            value = row.get(f.name, "")
            kwargs[f.name] = 0.0 if value == "" and "float" in str(f.type) and "str" not in str(f.type) else value
        return cls(**kwargs)

    @property
    def values(self) -> OrderedDict[str, Any]:
        return OrderedDict(asdict(self).items())
