"""``track``: measure a block or a function from inside Python, with the daemon's sensors and accounting.

::

    from carbond import track

    with track(project="bert") as t:
        with t.phase("train"):
            train()
        with t.phase("eval"):
            evaluate()
    print(t.energy_kwh, t.emissions_g, t.duration_s)
    t.report()                # a carbond.job.report.Report: per device, per phase, intensity, method

    @track(project="bert", csv="emissions.csv")
    def train(): ...

Sensors start inside ``track`` (not at import) and run on a private event loop in a background thread; nothing
global is touched. By default the figures are this process's share (its process tree's CPU time and memory, the
measuring thread excluded, GPU energy by its processes), attributed as the daemon attributes a cgroup;
``scope="machine"`` reports the whole machine. A failure to measure never breaks the program: a
:class:`MeasurementWarning` and a report with ``scope == "none"`` and the reason in ``error``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, cast, overload

from carbond.config import Config
from carbond.errors import ConfigError
from carbond.job import embodied, figures
from carbond.job.cgroup import JobProbe, MachineUsage
from carbond.job.csvfile import Columns, write_outputs
from carbond.job.daemon import DaemonSampler, without_credentials
from carbond.job.ledger import Checkpoint
from carbond.job.report import PhaseReport, Report, host_info
from carbond.job.sampler import LocalSampler, MeasureFailed, Sampler, job_config, own_processes

F = TypeVar("F", bound=Callable[..., Any])


class MeasurementWarning(RuntimeWarning):
    """Measuring failed (or partly failed); the program goes on."""


def _serialized(method: F) -> F:
    """One call at a time (threads may share a tracker); a forked child first lets go of its parent's run."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        self._after_fork()
        with self._mutex:
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


class Tracker:
    """One measurement at a time; reusable: each ``with`` (or decorated call) is a new run with a new run_id.
    Thread-safe; in a process forked while it measures, the run is the parent's: the child's copy measures and
    writes nothing for it."""

    def __init__(
        self,
        project: str = "carbond",
        *,
        config: str | Path | Config | None = None,
        interval_s: float | None = None,
        scope: Literal["job", "machine"] = "job",
        csv: str | Path | None = None,
        json: str | Path | None = None,
        daemon: str | None = None,
        gpu_ids: Iterable[str | int] | None = None,
        experiment_id: str = "",
        experiment_name: str = "base",
        wue: float = 0.0,
        on_csv_write: Literal["append", "update"] = "append",
        csv_columns: Columns = "all",
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        """``gpu_ids``: only these GPUs count (``0`` or ``gpu-0``); ``on_csv_write``/``csv_columns``: see
        :func:`carbond.job.csvfile.append_csv`; phases go to CodeCarbon's task file named after ``experiment_name``;
        ``on_warning``: where measuring problems go instead of a :class:`MeasurementWarning`.
        """
        self.project, self._on_warning = project, on_warning
        self._gpus = None if gpu_ids is None else frozenset(f"gpu-{g}" if str(g).isdigit() else str(g) for g in gpu_ids)
        self._ids = (experiment_id, experiment_name, wue)
        self._csv_how: tuple[Literal["append", "update"], Columns] = (on_csv_write, csv_columns)
        self._embodied = figures.Embodied(self._gpus)
        self._config_arg, self._interval, self._scope = config, interval_s, scope
        self._csv, self._json, self._daemon_url = csv, json, daemon
        self._sampler: Sampler | None = None
        self._running = False
        self._final: Report | None = None
        self._mutex, self._pid = threading.RLock(), os.getpid()
        self._reset()

    def _reset(self) -> None:
        self.run_id, self.error, self._procfs = str(uuid.uuid4()), "", Path("/proc")
        self._daemon = self._embodied.daemon = self._daemon_url  # None after a fallback to local sampling
        self._t0, self._wall0 = time.monotonic(), time.time()
        self._phases: list[PhaseReport] = []
        self._method, self._detail, self._notes = "none", "", list[str]()
        self._command: list[str] | None = None
        self._base: Checkpoint | None = None  # the report covers from here (the job's start), when attached
        self._usage0: MachineUsage | None = None

    def _warn(self, message: str) -> None:
        if self._on_warning is not None:
            return self._on_warning(message)
        with contextlib.suppress(Warning):  # -W error makes it an exception: measuring must still not break the program
            warnings.warn(message, MeasurementWarning, stacklevel=5)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent's thread may have held this one), and the parent's run left
        to the parent (the child has no measuring thread: waiting for it would hang, writing would double)."""
        if self._pid == os.getpid():
            return
        self._pid, self._mutex = os.getpid(), threading.RLock()
        if self._running:
            self._running, self._sampler, self._csv, self._json = False, None, None, None
            self.error = f"a forked child (pid {os.getpid()}) of the measuring process: the parent measures the run"
            self._final = self._build(None)

    @_serialized
    def start(self, *, attach_self: bool = True) -> Tracker:
        """Start measuring (``attach_self=False``: the job is attached later, as ``carbond measure`` does)."""
        if self._running:
            self._warn("carbond: this tracker is already measuring; the inner use is not measured separately")
            return self
        self._reset()
        self._final = None
        self._running = True
        try:
            self._sampler = self._open(attach_self)
        except MeasureFailed as exc:
            self._fail(exc.reason)
        except ConfigError as exc:
            self._fail("config error: " + "; ".join(exc.lines()))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the user's program goes on
            self._fail(f"{type(exc).__name__}: {exc}")
        self._t0, self._wall0 = time.monotonic(), time.time()
        self._usage0 = figures.machine_usage(self._procfs)
        return self

    def _open(self, attach_self: bool) -> Sampler:
        if self._daemon:
            self._method = "daemon"
            self._detail = f"the whole machine, from the daemon at {without_credentials(self._daemon)[0]}"
            sampler: Sampler = DaemonSampler(self._daemon, gpus=self._gpus)
            try:
                sampler.start()
                return sampler
            except MeasureFailed as exc:  # the job is still measured, by this machine's own sensors
                self._notes.append(f"{exc.reason}: measured with this machine's own sensors instead")
                self._daemon = self._embodied.daemon = None
        cfg, interval = job_config(self._config_arg, self._interval)
        self._procfs, self._embodied.cfg = Path(cfg.paths.procfs), cfg
        probe: JobProbe | None = None
        if self._scope == "machine":
            self._method, self._detail = "machine", "no attribution: the whole machine's figures"
        elif attach_self:
            probe = own_processes(self._procfs)
            self._method, self._detail = probe.method, probe.detail
        sampler = LocalSampler(cfg, interval, gpus=self._gpus)
        sampler.start(probe, whole_machine=self._scope == "machine")
        return sampler

    @_serialized
    def attach(
        self, probe: JobProbe | None, *, notes: list[str] | None = None, command: list[str] | None = None
    ) -> None:
        """The job to attribute (None: the whole machine); its command line for the report."""
        self._command = command
        self._notes += notes or []
        if probe is None:
            self._method, self._detail = ("daemon", self._detail) if self._daemon else ("machine", "no attribution")
        else:
            self._method, self._detail = probe.method, probe.detail
        if self._sampler is None:
            return
        try:
            self._base = self._sampler.attach(probe, whole_machine=probe is None)
            self._t0, self._wall0 = time.monotonic(), time.time()
        except Exception as exc:  # noqa: BLE001 - the user's program goes on with the whole machine
            self._notes.append(f"attribution failed: {type(exc).__name__}: {exc}; whole machine used")
            self._method = "machine"

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        self._warn(f"carbond: not measuring: {reason}")
        if self._sampler is not None:
            sampler, self._sampler = self._sampler, None
            try:
                sampler.stop()
            except Exception as exc:  # noqa: BLE001 - the user's program goes on; the note says why
                self._notes.append(f"stopping the sampler failed: {type(exc).__name__}: {exc}")

    @_serialized
    def stop(self, *, exit_code: int | None = None, command: list[str] | None = None) -> Report:
        """Take the final measurement, write the CSV/JSON outputs asked for, and return the report."""
        if not self._running:
            return self._final if self._final is not None else self._build(None)
        self._running = False
        end: Checkpoint | None = None
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            try:
                end = sampler.stop()
            except Exception as exc:  # noqa: BLE001 - the user's program goes on; the report says why
                self._fail(f"final measurement failed: {type(exc).__name__}: {exc}")
        report = self._build(end, sampler)
        report.exit_code = exit_code
        report.command = command if command is not None else self._command
        self._final = report
        self._write(report)
        return report

    def _write(self, report: Report) -> None:
        mode, columns = self._csv_how
        for problem in write_outputs(report, self._csv, self._json, mode, columns, self._ids[1]):
            self._warn(problem)

    def _build(self, cp: Checkpoint | None, sampler_of: Sampler | None = None) -> Report:
        if cp is not None and self._base is not None:
            cp = cp.since(self._base)
        duration = (cp.monotonic if cp is not None else time.monotonic()) - self._t0
        models = cp.device_models if cp is not None else ()
        r = Report(
            project=self.project,
            run_id=self.run_id,
            started_at=self._wall0,
            duration_s=max(duration, 0.0),
            method=self._method,
            method_detail=self._detail,
            host=host_info(self._procfs, models),
            notes=list(self._notes),
            error=self.error,
            command=self._command,
            source=self.source,
            phases=list(self._phases),
            experiment_id=self._ids[0],
            wue=self._ids[2],
            asked_scope=self._scope,
        )
        if cp is None or self.error:
            r.scope, r.method = "none", "none"
            r.error = r.error or "not measured"
            return r
        src = sampler_of or self._sampler
        if src is not None:
            r.sensors, r.unavailable = list(src.sensors), dict(src.unavailable)
            if src.attribution_error:
                r.notes.append(f"attribution error: {src.attribution_error}")
            r.notes += getattr(src, "notes", [])
        r.scope = figures.scope_of(self._method)
        r.energy_j, r.emissions_g, r.machine_energy_j, r.machine_emissions_g = cp.node_totals()
        r.energy_by_kind_j = figures.by_kind(cp)
        r.devices = list(cp.devices)
        r.pue = cp.pue
        r.utilization = figures.utilization(self._procfs, self._usage0)
        grams, r.embodied_detail = self._embodied.over(cp, r.duration_s)
        r.embodied_g = grams * embodied.job_share(r.scope, r.energy_j, r.machine_energy_j)
        r.intensity = figures.intensity(cp)
        if not math.isnan(cp.emissions_rel_u):
            r.energy_u_j = r.energy_j * cp.energy_rel_u if not math.isnan(cp.energy_rel_u) else None
            r.emissions_u_g = r.emissions_g * cp.emissions_rel_u
            r.uncertainty_dominant = cp.dominant
        return r

    def report(self) -> Report:
        """The final report after the run; while running, the figures up to the last measurement."""
        if self._running:
            return self._build(self._sampler.last if self._sampler is not None else None)
        return self._final if self._final is not None else self._build(None)

    @property
    def source(self) -> str:
        """``daemon`` when a running daemon's counters are read, else ``local``."""
        return "daemon" if self._daemon else "local"

    @property
    def energy_kwh(self) -> float:
        return self.report().energy_kwh

    @property
    def emissions_g(self) -> float:
        return self.report().emissions_g

    @property
    def duration_s(self) -> float:
        return self.report().duration_s

    @_serialized
    def flush(self) -> Report:
        """The figures so far, measured now and written to the CSV/JSON outputs; the run goes on."""
        sampler = self._sampler
        if not self._running or sampler is None:
            return self.report()
        try:
            cp = sampler.mark()
        except Exception as exc:  # noqa: BLE001 - the user's program goes on; the note says why
            self._notes.append(f"flush: measurement failed: {type(exc).__name__}: {exc}")
            cp = sampler.last
        report = self._build(cp)
        self._write(report)
        return report

    @_serialized
    def begin_phase(self, name: str) -> tuple[str, float, Checkpoint | None, Sampler | None]:
        """Start a phase (what ``phase`` does on entry); pass the token to :meth:`end_phase`."""
        sampler, begin = self._sampler, None
        t0 = time.monotonic()
        if sampler is not None:
            try:
                begin = sampler.mark()
            except Exception as exc:  # noqa: BLE001 - the user's program goes on; the note says why
                self._notes.append(f"phase {name!r}: measurement failed: {type(exc).__name__}: {exc}")
        return name, t0, begin, sampler

    @_serialized
    def end_phase(self, token: tuple[str, float, Checkpoint | None, Sampler | None]) -> PhaseReport:
        """End a phase: its figures are one entry of the report's ``phases`` (and a row of the task file)."""
        name, t0, begin, sampler = token
        end = None
        if begin is not None and sampler is self._sampler and sampler is not None:
            try:
                end = sampler.mark().since(begin)
            except Exception as exc:  # noqa: BLE001 - the user's program goes on; the note says why
                self._notes.append(f"phase {name!r}: measurement failed: {type(exc).__name__}: {exc}")
        j, g, mj, mg = end.node_totals() if end is not None else (0.0, 0.0, 0.0, 0.0)
        dur = time.monotonic() - t0
        share = embodied.job_share(figures.scope_of(self._method), j, mj)
        m = self._embodied.over(end, dur)[0] * share if end is not None else 0.0
        kinds = figures.by_kind(end) if end is not None else {}
        phase = PhaseReport(name, t0 - self._t0, dur, j, g, mj, mg, kinds, m)
        self._phases.append(phase)
        return phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Figures for a part of the run (phases may nest or repeat; each use is one entry)."""
        token = self.begin_phase(name)
        try:
            yield
        finally:
            self.end_phase(token)

    # -- context manager and decorator -----------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                if self._running:
                    return await func(*args, **kwargs)
                with self:
                    return await func(*args, **kwargs)

            return cast(F, awrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._running:  # recursion or nesting: measured by the outer call
                return func(*args, **kwargs)
            with self:
                return func(*args, **kwargs)

        wrapper.tracker = self  # type: ignore[attr-defined]
        return cast(F, wrapper)


@overload
def track(project: F) -> F: ...


@overload
def track(project: str = "carbond", **options: Any) -> Tracker: ...


def track(project: str | Callable[..., Any] = "carbond", **options: Any) -> Any:
    """A :class:`Tracker`: ``with track(project="x") as t``, ``@track(project="x")`` or bare ``@track``."""
    if callable(project):
        return Tracker()(project)
    return Tracker(project, **options)
