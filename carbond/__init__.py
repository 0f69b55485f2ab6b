"""carbond: energy and carbon footprint of a machine's computing, for Prometheus.

Importing this package does nothing: no hardware library is loaded, no thread or task is started.
``carbond.track`` (job-level measurement) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carbond.job.tracker import track as track

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "track":
        from carbond.job.tracker import track

        return track
    raise AttributeError(f"module 'carbond' has no attribute {name!r}")
