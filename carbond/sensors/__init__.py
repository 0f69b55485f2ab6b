"""Sensor backends: an explicit name -> (module, config section) table; a module is imported only when needed.

Each backend module owns its config model (a :class:`~carbond.sensors.base.Settings`), its factory and its
device classes, exported as ``BACKEND``. Adding a backend is one module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from carbond.model import DeviceClass
from carbond.sensors.base import Backend


class BackendRef(NamedTuple):
    module: str
    section: str  # its config key (the TDP model's is ``cpu``, as the config contract names it)


BACKENDS: dict[str, BackendRef] = {
    "rapl": BackendRef("carbond.sensors.rapl", "rapl"),
    "nvml": BackendRef("carbond.sensors.nvml", "nvml"),
    "amdsmi": BackendRef("carbond.sensors.amdsmi", "amdsmi"),
    "powermetrics": BackendRef("carbond.sensors.powermetrics", "powermetrics"),
    "tdp": BackendRef("carbond.sensors.tdp", "cpu"),
    "ram": BackendRef("carbond.sensors.ram", "ram"),
    "hwmon": BackendRef("carbond.sensors.hwmon", "hwmon"),
    "ipmi": BackendRef("carbond.sensors.ipmi", "ipmi"),
    "redfish": BackendRef("carbond.sensors.redfish", "redfish"),
    "ups": BackendRef("carbond.sensors.ups", "ups"),
    "smartplug": BackendRef("carbond.sensors.smartplug", "smartplug"),
    "fake": BackendRef("carbond.sensors.fake", "fake"),
}

#: ``cpu``, ``dram`` and ``platform`` go to the first configured backend that works; every working ``gpu`` backend
#: runs (a host may have GPUs of two vendors).
EXCLUSIVE: frozenset[DeviceClass] = frozenset({"cpu", "dram", "platform"})


def load(name: str) -> Backend[Any]:
    """Import the backend ``name`` and return its description (KeyError for an unknown name)."""
    backend: Backend[Any] = importlib.import_module(BACKENDS[name].module).BACKEND
    return backend
