"""``EmissionsTracker`` and ``OfflineEmissionsTracker`` (see :mod:`carbond.codecarbon`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from carbond.codecarbon import options, outputs, settings
from carbond.codecarbon.arguments import (
    _gpu_ids,
    _level,
    _merge_arguments,
    _physical_cores,
    _zone,
)
from carbond.codecarbon.data import EmissionsData, TaskEmissionsData
from carbond.codecarbon.outputs import OutputMethod

if TYPE_CHECKING:  # the measuring machinery is imported by the first tracker: importing this module stays cheap
    from carbond.job.report import Report

log = logging.getLogger("carbond.codecarbon")
F = TypeVar("F", bound=Callable[..., Any])
LOCK = Path(tempfile.gettempdir()) / ".carbond_codecarbon.lock"
ONCE_S = 3600.0  # the longest tick: measure_power_secs=0 measures at stop (and flush, tasks) only
#: CodeCarbon 3.3 keywords carbond accepts without acting on them (one warning names those given)
IGNORED = frozenset(
    ["api_endpoint", "api_key", "electricitymaps_api_token", "co2_signal_api_token", "logger_preamble", "metadata"]
)


@dataclass
class Task:
    """A task of the run, as CodeCarbon keeps it in ``tracker._tasks``: its figures once stopped."""

    token: tuple[str, float, Any, Any]  # carbond's phase, from Tracker.begin_phase
    emissions_data: EmissionsData | None = None
    is_active: bool = True


def _log_warning(message: str) -> None:
    """carbond's measuring problems as lines of the ``carbond.codecarbon`` logger, where CodeCarbon users look (not
    Python warnings caught around each call: ``catch_warnings`` is process-wide, so two trackers in two threads
    would leave each other's filters in place and swallow the program's own warnings)."""
    log.warning("%s", message)


def _guarded(method: F) -> F:
    """One call at a time on a tracker (threads share it), and none in a forked child of the process that started
    it: the child has no measuring thread, and the parent's ``stop()`` writes the run's row."""

    @functools.wraps(method)
    def wrapper(self: EmissionsTracker, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        if owner is not None and owner != os.getpid():
            if self._forked_warned != os.getpid():
                self._forked_warned = os.getpid()
                log.warning(
                    "carbond.codecarbon: %s() in a forked child (pid %d) of the process that started this tracker "
                    "(pid %d): ignored, the parent measures and writes the run",
                    method.__name__,
                    os.getpid(),
                    owner,
                )
            return None
        with self._mutex:
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


class EmissionsTracker:
    """CodeCarbon's ``EmissionsTracker`` on carbond's measurement (see the module's documentation). Positional
    arguments follow CodeCarbon 3.3's order (``project_name``, ``measure_power_secs``, ``api_call_interval`` ...)."""

    _offline = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Keywords not given come from CodeCarbon's configuration (:mod:`carbond.codecarbon.settings`)."""
        outputs.bridge_codecarbon_logger()
        _merge_arguments(type(self).__name__, args, kwargs)
        config = kwargs.get("config")
        given = {k: v for k, v in kwargs.items() if k in settings.DEFAULTS}
        resolved, _ = settings.resolve(given)
        o = options.checked(resolved)
        level = _level(o["log_level"] or "warning")
        if level is not None:
            log.setLevel(level)
        methods = outputs.methods_of(o)
        ignored = [k for k in IGNORED if k in given or resolved[k] != settings.DEFAULTS[k]]
        ignored = sorted([*ignored, *outputs.not_implemented(o, methods, given)])
        if ignored:
            log.warning(
                "carbond.codecarbon: CodeCarbon options carbond does not implement, ignored: %s", ", ".join(ignored)
            )
        self._outputs = outputs.handlers_of(o, methods)
        if OutputMethod.CSV in methods and not Path(o["output_dir"]).is_dir():
            raise OSError(f"Folder '{o['output_dir']}' doesn't exist !")  # as CodeCarbon: the run would write nowhere
        from carbond import logs

        logs.library("carbond.codecarbon")  # carbond's module logs: children of this logger, no global config
        if config is None and os.environ.get("CARBOND_CONFIG"):
            config = os.environ["CARBOND_CONFIG"]
        from carbond.config import Config
        from carbond.config import load as load_config
        from carbond.errors import ConfigError
        from carbond.job.tracker import Tracker

        try:
            cfg = config if isinstance(config, Config) else load_config(config)
        except ConfigError:  # reported by the tracker at start: a warning and a run with nothing measured
            cfg = None
        secs = float(o["measure_power_secs"])
        if secs == 0:  # CodeCarbon's 0: no periodic measurement, one at stop (and at each flush or task)
            log.info("carbond.codecarbon: measure_power_secs=0: measured once, at stop")
            secs = ONCE_S
        update: dict[str, Any] = {"measure_power_secs": min(max(secs, 0.1), ONCE_S)}
        if o["pue"] is not None:
            update["pue"] = float(o["pue"])
        zone = _zone(o, self._offline)
        if cfg is not None:
            update |= options.config_update(o, cfg)
            if zone is not None:
                update["intensity"] = update.get("intensity", cfg.intensity).model_copy(update={"zone": zone})
        gpus = _gpu_ids(o["gpu_ids"])
        uuids = [g for g in gpus or () if str(g).upper().startswith(("GPU-", "MIG-"))]
        odd = [str(g) for g in gpus or () if not str(g).isdigit() and not str(g).startswith("gpu-") and g not in uuids]
        if odd:
            log.warning("carbond.codecarbon: gpu_ids are indexes or UUIDs; not matched: %s", ", ".join(odd))
        nvml = getattr(cfg, "nvml", None)  # a backend section: not in Config's static type
        if uuids and cfg is not None and nvml is not None:
            # NVML knows UUIDs: its sensor reads only the GPUs given, and every GPU it reads counts
            ids = [int(g) if str(g).isdigit() else str(g) for g in gpus or () if str(g) not in odd]
            update["nvml"] = nvml.model_copy(update={"devices": ids})
            gpus = None
        self._csv = Path(o["output_dir"]) / o["output_file"] if OutputMethod.CSV in methods else None
        self._tracker = Tracker(
            o["project_name"],
            config=cfg.model_copy(update=update) if cfg is not None else config,
            interval_s=update["measure_power_secs"],
            scope="job" if o["tracking_mode"] == "process" else "machine",
            csv=self._csv,
            gpu_ids=gpus,
            experiment_id=o["experiment_id"],
            experiment_name=o["experiment_name"],
            wue=float(o["wue"]),
            on_csv_write=o["on_csv_write"],
            csv_columns=kwargs.get("csv_columns", "all"),
            on_warning=_log_warning,
        )
        self._experiment_name, self._gpu_ids_given = str(o["experiment_name"]), o["gpu_ids"]
        self._lock_file: IO[bytes] | None = None
        self._mutex = threading.RLock()
        self._owner: int | None = None  # the pid that started the run (a forked child leaves it alone)
        self._forked_warned = 0
        self._inert = not o["allow_multiple_runs"] and not self._take_lock()
        self._started = False
        self._tasks: dict[str, Task] = {}
        self._task_data: list[EmissionsData] = []
        self._active_task: str | None = None
        self._pushed: EmissionsData | None = None  # the figures of the last output, for CodeCarbon's deltas
        self._live = [h for h in self._outputs if callable(getattr(h, "live_out", None))]
        self._api_calls = int(o["api_call_interval"] if o["api_call_interval"] is not None else 8)  # -1: never live
        self._period_s = secs if secs < ONCE_S and self._live and self._api_calls != -1 else None
        self._measures = 0  # CodeCarbon's measurements since the last live output
        self._ticker: outputs.Ticker | None = None
        self.final_emissions: float | None = None
        self.final_emissions_data: EmissionsData | None = None

    def _take_lock(self) -> bool:
        import fcntl

        try:
            f = LOCK.open("ab")
        except OSError as exc:  # another user's lock file: CodeCarbon's lock is per machine, this one cannot be
            log.warning("carbond.codecarbon: cannot open %s (%s): running without the lock", LOCK, exc.strerror)
            return True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            log.error("carbond.codecarbon: another tracker holds %s (allow_multiple_runs=False): not measuring", LOCK)
            return False
        self._lock_file = f
        return True

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    @property
    def run_id(self) -> uuid.UUID:
        """The run's id, a UUID as CodeCarbon's (``str(run_id)`` is the CSV's ``run_id``)."""
        return uuid.UUID(self._tracker.run_id)

    def get_detected_hardware(self) -> dict[str, Any]:
        """CodeCarbon's hardware summary: memory (GiB), CPUs, CPU model, GPUs (those measured so far)."""
        host = self._tracker.report().host
        return {
            "ram_total_size": host.get("ram_total_gib") or None,
            "cpu_count": host.get("cpu_count"),
            "cpu_physical_count": _physical_cores(),
            "cpu_model": host.get("cpu_model"),
            "gpu_count": host.get("gpu_count", 0),
            "gpu_model": host.get("gpu_model", ""),
            "gpu_ids": self._gpu_ids_given,
        }

    def _deliver(self, total: EmissionsData, final: bool) -> None:
        """The row to the other outputs (logger, Pushgateway, the user's handlers), with the delta since the last
        one as CodeCarbon computes it; at stop, the tasks and each output's ``exit()``."""
        delta = total.minus(self._pushed) if self._pushed is not None else total
        self._pushed = total
        for handler in self._outputs:
            outputs.call(handler, "out", total, delta)
            if final and self._task_data:
                outputs.call(handler, "task_out", list(self._task_data), self._experiment_name)
            if final:
                outputs.call(handler, "exit")

    def _measured(self, data: EmissionsData | None) -> None:
        """One of CodeCarbon's measurements: every ``api_call_interval``-th hands the figures so far (``data``, or
        carbond's last sample) to the outputs' ``live_out``, with the delta since the last output."""
        self._measures += 1
        if not self._live or self._api_calls == -1 or self._measures < self._api_calls:
            return
        self._measures = 0
        if data is None:
            report = self._tracker.report()
            if report.scope == "none":
                return
            data = self._data(report)
        delta = data.minus(self._pushed) if self._pushed is not None else data
        self._pushed = data
        for handler in self._live:
            outputs.call(handler, "live_out", data, delta)

    @_guarded
    def _tick(self) -> None:
        if self._started:
            self._measured(None)

    # -- running ---------------------------------------------------------------------------------------------------
    @_guarded
    def start(self) -> None:
        if self._inert:
            log.warning("carbond.codecarbon: another instance is running: not measuring")
            return
        if self._started:
            log.warning("carbond.codecarbon: already started tracking")
            return
        self._started, self._owner = True, os.getpid()
        self.final_emissions = self.final_emissions_data = self._pushed = None
        self._tasks, self._active_task, self._task_data = {}, None, []
        self._tracker.start()
        self._measures = 1  # CodeCarbon measures once at start (nothing yet to hand to live_out)
        if self._period_s is not None:
            self._ticker = outputs.Ticker(self._period_s, self._tick)

    def _data(self, report: Report) -> EmissionsData:
        from carbond.job.csvfile import csv_row

        return EmissionsData.from_row(csv_row(report))

    @_guarded
    def flush(self) -> float | None:
        """Write a row of the figures so far (CodeCarbon's flush); kg CO2e so far (None: not measured)."""
        if self._inert or not self._started:
            log.error("carbond.codecarbon: you first need to start the tracker")
            return None
        report = self._tracker.flush()
        if report.scope == "none":
            return None
        data = self._data(report)
        self._measured(data)
        self._deliver(data, final=False)
        return data.emissions

    @_guarded
    def stop(self) -> float | None:
        """Stop measuring, write the row (and the task file); kg CO2e of the run (None: not measured)."""
        if self._inert or not self._started:
            if not self._inert:
                log.warning("carbond.codecarbon: tracker already stopped or never started")
            return self.final_emissions
        for name in [n for n in self._tasks if n == self._active_task]:
            self.stop_task(name)
        self._started = False
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        try:
            report = self._tracker.stop()
        finally:
            self._release_lock()
        self._owner = None
        if report.scope == "none":  # not measured (the log line says why): unknown, not 0 kg, as CodeCarbon's None
            self.final_emissions = self.final_emissions_data = None
            return None
        self.final_emissions_data = self._data(report)
        self.final_emissions = self.final_emissions_data.emissions
        self._measured(self.final_emissions_data)
        self._deliver(self.final_emissions_data, final=True)
        return self.final_emissions

    def report(self) -> Report:
        """carbond's full report of the run (per device, per task, intensity, method, embodied)."""
        return self._tracker.report()

    # -- tasks -------------------------------------------------------------------------------------------------------
    @_guarded
    def start_task(self, task_name: str | None = None) -> None:
        """Measure a task apart (one at a time, as CodeCarbon); starts the tracker if it was not."""
        if self._inert:
            return
        if self._active_task is not None:
            log.warning("carbond.codecarbon: a task is already under measure")
            return
        if not self._started:
            self.start()
        name = task_name or str(uuid.uuid4())
        if name in self._tasks:
            name += "_" + str(uuid.uuid4())
        self._tasks[name] = Task(self._tracker.begin_phase(name))
        self._active_task = name

    @_guarded
    def stop_task(self, task_name: str | None = None) -> EmissionsData | None:
        """End the task; its figures (a row of the task file at the next flush/stop)."""
        name = task_name or self._active_task
        if name is None or name not in self._tasks or name != self._active_task:
            log.warning("carbond.codecarbon: stop_task: no active task to stop")
            return None
        self._active_task = None
        task = self._tasks[name]
        phase = self._tracker.end_phase(task.token)
        from carbond.job.csvfile import task_row

        data = TaskEmissionsData.from_row(task_row(self._tracker.report(), phase))
        task.emissions_data, task.is_active = data, False
        self._task_data.append(data)
        return data

    # -- context manager ---------------------------------------------------------------------------------------------
    def __enter__(self) -> EmissionsTracker:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release_lock()


class OfflineEmissionsTracker(EmissionsTracker):
    """CodeCarbon's offline tracker: the location is given (``country_iso_code`` or ``cloud_provider``/``_region``)."""

    _offline = True
