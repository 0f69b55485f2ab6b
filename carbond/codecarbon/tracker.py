"""``EmissionsTracker`` and ``OfflineEmissionsTracker`` (see :mod:`carbond.codecarbon`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from carbond.codecarbon import settings
from carbond.codecarbon.data import EmissionsData
from carbond.codecarbon.location import zone_of

if TYPE_CHECKING:  # the measuring machinery is imported by the first tracker: importing this module stays cheap
    from carbond.config import Config
    from carbond.job.csvfile import Columns
    from carbond.job.report import Report

log = logging.getLogger("carbond.codecarbon")
F = TypeVar("F", bound=Callable[..., Any])
LOCK = Path(tempfile.gettempdir()) / ".carbond_codecarbon.lock"
#: CodeCarbon 3.3 keywords carbond accepts without acting on them
IGNORED = frozenset(
    "api_call_interval api_endpoint api_key output_methods save_to_api save_to_logger logging_logger "  # noqa: SIM905
    "save_to_prometheus save_to_logfire prometheus_url output_handlers emissions_endpoint electricitymaps_api_token "
    "co2_signal_api_token logger_preamble force_cpu_power force_ram_power force_carbon_intensity_g_co2e_kwh "
    "force_mode_cpu_load rapl_include_dram rapl_prefer_psys metadata offline".split()
)


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


def _gpu_ids(given: list[int | str] | str | None) -> list[int | str] | None:
    """The GPUs that count: ``gpu_ids`` as given, else, as CodeCarbon, ``CUDA_VISIBLE_DEVICES`` (then
    ``ROCR_VISIBLE_DEVICES``) when set and not empty: indexes or UUIDs, read as CUDA reads them, up to the first
    entry that is neither (``-1`` hides every GPU)."""
    variable = next((v for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES") if os.environ.get(v)), None)
    if given is None and variable is not None:
        ids: list[int | str] = []
        for entry in os.environ[variable].split(","):
            entry = entry.strip()
            if entry.isdigit():
                ids.append(int(entry))
            elif entry.upper().startswith(("GPU-", "MIG-")):
                ids.append(entry)
            else:  # "-1", the usual way to hide every GPU, or a typo: CUDA sees none from here on
                break
        log.info("carbond.codecarbon: gpu_ids from %s: %s", variable, ids)
        return ids
    if isinstance(given, str):
        return [g.strip() for g in given.split(",") if g.strip()]
    return given


def _level(value: int | str) -> int:
    if isinstance(value, int):
        return value
    found = logging.getLevelNamesMapping().get(value.upper())
    if found is None:
        raise ValueError(f"log_level: unknown level {value!r} (debug, info, warning, error, critical)")
    return found


class EmissionsTracker:
    """CodeCarbon's ``EmissionsTracker`` on carbond's measurement (see the module's documentation)."""

    _offline = False

    def __init__(
        self,
        project_name: str | None = None,
        measure_power_secs: float | None = None,
        *,
        experiment_id: str | None = None,
        experiment_name: str | None = None,
        tracking_mode: str | None = None,
        gpu_ids: list[int | str] | str | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        output_file: str | None = None,
        save_to_file: bool | None = None,
        on_csv_write: str | None = None,
        country_iso_code: str | None = None,
        country_2letter_iso_code: str | None = None,
        region: str | None = None,
        cloud_provider: str | None = None,
        cloud_region: str | None = None,
        pue: float | None = None,
        wue: float | None = None,
        log_level: int | str | None = None,
        allow_multiple_runs: bool | None = None,
        config: str | Path | Config | None = None,
        csv_columns: Columns = "all",
        **others: Any,
    ) -> None:
        """Keywords not given come from CodeCarbon's configuration (:mod:`carbond.codecarbon.settings`)."""
        unknown = sorted(set(others) - IGNORED)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s): {', '.join(unknown)}")
        given = {k: v for k, v in locals().items() if k in settings.DEFAULTS}
        o, configured = settings.resolve(given)
        log.setLevel(_level(o["log_level"] or "warning"))
        ignored = sorted({*others, *(k for k in configured if k in IGNORED)})
        if ignored:
            log.warning(
                "carbond.codecarbon: CodeCarbon options carbond does not implement, ignored: %s", ", ".join(ignored)
            )
        if o["tracking_mode"] not in ("machine", "process"):
            raise ValueError(f"tracking_mode must be 'machine' or 'process', not {o['tracking_mode']!r}")
        if o["on_csv_write"] not in ("append", "update"):
            raise ValueError(
                f"Unknown `on_csv_write` value: {o['on_csv_write']} (should be one of 'append' or 'update')"
            )
        if not float(o["measure_power_secs"]) > 0:
            raise ValueError(f"measure_power_secs must be above 0, not {o['measure_power_secs']!r}")
        if o["pue"] is not None and not 1.0 <= float(o["pue"]) <= 10.0:
            raise ValueError(f"pue must be between 1 and 10, not {o['pue']!r}")
        if o["save_to_file"] and not Path(o["output_dir"]).is_dir():
            raise OSError(f"Folder '{o['output_dir']}' doesn't exist !")
        location = [o[k] for k in ("country_iso_code", "region", "cloud_provider", "cloud_region")]
        if self._offline and not (location[0] or o["country_2letter_iso_code"] or location[2]):
            raise ValueError(
                "OfflineEmissionsTracker needs country_iso_code (e.g. 'FRA') or cloud_provider/cloud_region"
            )
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
        update: dict[str, Any] = {"measure_power_secs": float(o["measure_power_secs"])}
        if o["pue"] is not None:
            update["pue"] = float(o["pue"])
        zone = zone_of(location[0], location[1], location[2], location[3], o["country_2letter_iso_code"])
        if zone is not None and cfg is not None:
            update["intensity"] = cfg.intensity.model_copy(update={"zone": zone})
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
        self._csv = Path(o["output_dir"]) / o["output_file"] if o["save_to_file"] else None
        self._tracker = Tracker(
            o["project_name"],
            config=cfg.model_copy(update=update) if cfg is not None else config,
            interval_s=float(o["measure_power_secs"]),
            scope="job" if o["tracking_mode"] == "process" else "machine",
            csv=self._csv,
            gpu_ids=gpus,
            experiment_id=o["experiment_id"],
            experiment_name=o["experiment_name"],
            wue=float(o["wue"]),
            on_csv_write=o["on_csv_write"],
            csv_columns=csv_columns,
            on_warning=_log_warning,
        )
        self._lock_file: IO[bytes] | None = None
        self._mutex = threading.RLock()
        self._owner: int | None = None  # the pid that started the run (a forked child leaves it alone)
        self._forked_warned = 0
        self._inert = not o["allow_multiple_runs"] and not self._take_lock()
        self._started = False
        self._tasks: dict[str, tuple[str, float, Any, Any]] = {}
        self._active_task: str | None = None
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
    def run_id(self) -> str:
        return self._tracker.run_id

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
        self.final_emissions = self.final_emissions_data = None
        self._tasks, self._active_task = {}, None
        self._tracker.start()

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
        return None if report.scope == "none" else self._data(report).emissions

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
        import uuid

        name = task_name or str(uuid.uuid4())
        if name in self._tasks:
            name += "_" + str(uuid.uuid4())
        self._tasks[name] = self._tracker.begin_phase(name)
        self._active_task = name

    @_guarded
    def stop_task(self, task_name: str | None = None) -> EmissionsData | None:
        """End the task; its figures (a row of the task file at the next flush/stop)."""
        name = task_name or self._active_task
        if name is None or name not in self._tasks or name != self._active_task:
            log.warning("carbond.codecarbon: stop_task: no active task to stop")
            return None
        self._active_task = None
        phase = self._tracker.end_phase(self._tasks[name])
        from carbond.job.csvfile import task_row

        return EmissionsData.from_row(task_row(self._tracker.report(), phase))

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
