"""``carbond.codecarbon``: CodeCarbon's tracking API, measured by carbond. Change only the import::

    from carbond.codecarbon import EmissionsTracker, OfflineEmissionsTracker, track_emissions

    tracker = EmissionsTracker(project_name="bert", measure_power_secs=10)
    tracker.start()
    train()
    kg = tracker.stop()            # kg CO2e, as CodeCarbon returns (None: nothing could be measured)

    with EmissionsTracker() as t: ...
    @track_emissions(project_name="bert") / @track_emissions
    tracker.start_task("load"); ...; tracker.stop_task()   # returns the task's EmissionsData

Built on :class:`carbond.job.tracker.Tracker` (the daemon's sensors, PUE, intensity and accounting; a failure to
measure is a warning, never an exception in the program). Honoured keywords: ``project_name``, ``experiment_id``,
``experiment_name`` (task file name), ``measure_power_secs``, ``tracking_mode`` (``machine``: the whole machine,
CodeCarbon's default; ``process``: this process tree's share, attributed as the daemon attributes a cgroup),
``gpu_ids`` (indexes or UUIDs; not given: ``CUDA_VISIBLE_DEVICES`` when set, as CodeCarbon), ``output_dir``,
``output_file``, ``save_to_file``, ``on_csv_write`` (``append``/``update``),
``country_iso_code``/``country_2letter_iso_code``/``region``/``cloud_provider``/``cloud_region`` (the intensity
zone: ``FRA`` -> ``FR``, ``USA`` + ``california`` -> ``US-CA``, ``aws`` + ``eu-west-3`` -> ``aws:eu-west-3``),
``pue``, ``wue``, ``log_level`` (of the stdlib ``carbond.codecarbon`` logger, whose children carry carbond's
own messages: ``carbond.codecarbon.sensors.rapl`` ...; as a library, carbond leaves structlog's and the root
logger's configuration as the program set them) and ``allow_multiple_runs`` (False: a second
tracker on this machine does nothing while one runs, as CodeCarbon's lock). CodeCarbon's other keywords (API,
Prometheus, logfire, forced powers ...) are accepted with one warning naming them; a keyword CodeCarbon does not
know either is a TypeError, as with CodeCarbon. A keyword not given is read, as CodeCarbon reads it, from
``CODECARBON_<NAME>`` variables, then ``./.codecarbon.config``, then ``~/.codecarbon.config``
(:mod:`carbond.codecarbon.settings`). One tracker may be shared by threads; in a process forked while it runs,
its calls do nothing (the parent measures the run). carbond's own: ``config`` (a carbond YAML config or
:class:`~carbond.config.Config`: sensors, zone ...) and ``csv_columns`` (``all`` or ``codecarbon``, the latter
giving a new file exactly CodeCarbon 3.3's header, which CodeCarbon itself can append to).

Rows go to ``output_dir/output_file`` (``./emissions.csv``) as :mod:`carbond.job.csvfile` writes them: CodeCarbon
3.3's columns first, units and meanings (energy with PUE), carbond's columns after; tasks to
``emissions_<experiment_name>_<run_id>.csv`` as CodeCarbon's task mode writes them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, cast

from carbond.codecarbon.arguments import OWN
from carbond.codecarbon.data import EmissionsData
from carbond.codecarbon.location import zone_of
from carbond.codecarbon.outputs import BaseOutput, BoAmpsOutput, CodeCarbonAPIOutput, LoggerOutput, OutputMethod
from carbond.codecarbon.settings import DEFAULTS
from carbond.codecarbon.tracker import EmissionsTracker, OfflineEmissionsTracker

__all__ = [
    "BaseOutput",
    "BoAmpsOutput",
    "CodeCarbonAPIOutput",
    "EmissionsData",
    "EmissionsTracker",
    "LoggerOutput",
    "OfflineEmissionsTracker",
    "OutputMethod",
    "TaskEmissionsTracker",
    "track_emissions",
    "track_task_emissions",
    "zone_of",
]

F = TypeVar("F", bound=Callable[..., Any])


def track_emissions(fn: F | None = None, **kwargs: Any) -> Any:
    """CodeCarbon's decorator, bare (``@track_emissions``) or with the trackers' keywords; ``offline=True`` makes
    it an :class:`OfflineEmissionsTracker`. Each call is one run; the function's result is returned unchanged."""
    offline = bool(kwargs.pop("offline", False))
    unknown = sorted(set(kwargs) - set(DEFAULTS) - set(OWN))
    if unknown:  # at decoration time, as CodeCarbon's signature would
        raise TypeError(f"track_emissions() got unexpected keyword argument(s): {', '.join(unknown)}")

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapped(*args: Any, **kw: Any) -> Any:
            tracker = (OfflineEmissionsTracker if offline else EmissionsTracker)(**kwargs)
            tracker.start()
            try:
                return func(*args, **kw)
            finally:
                tracker.stop()

        return cast(F, wrapped)

    return decorate(fn) if fn is not None else decorate


class TaskEmissionsTracker:
    """CodeCarbon's task context manager: ``with TaskEmissionsTracker("load", tracker=t):`` measures one task of
    ``t``; without a tracker, a new :class:`EmissionsTracker` is started and stopped around the task."""

    def __init__(self, task_name: str | None = None, tracker: EmissionsTracker | None = None) -> None:
        self.is_default_tracker = tracker is None
        self.tracker = tracker if tracker is not None else EmissionsTracker()
        self.task_name = task_name

    def __enter__(self) -> TaskEmissionsTracker:
        self.tracker.start_task(self.task_name)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.tracker.stop_task()
        if self.is_default_tracker:
            self.tracker.stop()


def track_task_emissions(fn: F | None = None, tracker: EmissionsTracker | None = None, task_name: str = "") -> Any:
    """CodeCarbon's task decorator: each call of the function is a task of ``tracker`` (without one, of a new
    :class:`EmissionsTracker`, created here and stopped after each call, as CodeCarbon's)."""
    own = tracker is None
    chosen = tracker if tracker is not None else EmissionsTracker()

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapped(*args: Any, **kw: Any) -> Any:
            chosen.start_task(task_name or None)
            try:
                return func(*args, **kw)
            finally:
                chosen.stop_task()
                if own:
                    chosen.stop()

        return cast(F, wrapped)

    return decorate(fn) if fn is not None else decorate
