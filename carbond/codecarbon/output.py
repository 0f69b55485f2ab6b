"""CodeCarbon's ``codecarbon.output`` module path (its outputs and ``EmissionsData``), for
``from carbond.codecarbon.output import BaseOutput`` where CodeCarbon's users write ``from codecarbon.output``."""

from carbond.codecarbon.data import EmissionsData, TaskEmissionsData
from carbond.codecarbon.outputs import (
    BaseOutput,
    BoAmpsOutput,
    CodeCarbonAPIOutput,
    LoggerOutput,
    OutputMethod,
    PrometheusOutput,
)

__all__ = [
    "BaseOutput",
    "BoAmpsOutput",
    "CodeCarbonAPIOutput",
    "EmissionsData",
    "LoggerOutput",
    "OutputMethod",
    "PrometheusOutput",
    "TaskEmissionsData",
]
