"""CodeCarbon's ``codecarbon.emissions_tracker`` module path: ``from codecarbon.emissions_tracker import X`` keeps
working with only the package name changed (``from carbond.codecarbon.emissions_tracker import X``)."""

from carbond.codecarbon import (
    EmissionsTracker,
    OfflineEmissionsTracker,
    TaskEmissionsTracker,
    track_emissions,
    track_task_emissions,
)

__all__ = [
    "EmissionsTracker",
    "OfflineEmissionsTracker",
    "TaskEmissionsTracker",
    "track_emissions",
    "track_task_emissions",
]
