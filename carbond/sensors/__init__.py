"""Sensor backends: an explicit name -> "module:factory" table, imported only when chosen.

A factory takes :class:`carbond.sensors.base.BackendOptions` and returns an object implementing
:class:`carbond.sensors.base.Sensor`. Adding a backend is one module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from carbond.model import DeviceClass
from carbond.sensors.base import BackendOptions, Sensor

BACKENDS: dict[str, str] = {
    "rapl": "carbond.sensors.rapl:create",
    "nvml": "carbond.sensors.nvml:create",
    "amdsmi": "carbond.sensors.amdsmi:create",
    "powermetrics": "carbond.sensors.powermetrics:create",
    "tdp": "carbond.sensors.tdp:create",
    "ram": "carbond.sensors.ram:create",
    "fake": "carbond.sensors.fake:create",
}

#: Device classes each backend can provide. ``cpu`` and ``dram`` go to the first configured backend that works;
#: every working ``gpu`` backend runs (a host may have GPUs of two vendors).
CLASSES: dict[str, frozenset[DeviceClass]] = {
    "rapl": frozenset({"cpu", "dram"}),
    "nvml": frozenset({"gpu"}),
    "amdsmi": frozenset({"gpu"}),
    "powermetrics": frozenset({"cpu", "gpu"}),
    "tdp": frozenset({"cpu"}),
    "ram": frozenset({"dram"}),
    "fake": frozenset({"cpu", "dram", "gpu"}),
}
EXCLUSIVE: frozenset[DeviceClass] = frozenset({"cpu", "dram"})

Factory = Callable[[BackendOptions], Sensor]


def load(name: str) -> Factory:
    """Import the backend ``name`` and return its factory (KeyError for an unknown name)."""
    module_name, _, attr = BACKENDS[name].partition(":")
    module = importlib.import_module(module_name)
    return cast(Factory, getattr(module, attr))
