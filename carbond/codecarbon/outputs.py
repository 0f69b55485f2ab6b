"""CodeCarbon's output methods beside the CSV file, and its ``codecarbon`` logger.

- ``OutputMethod``: CodeCarbon 3.3's enum (``output_methods=[OutputMethod.CSV, ...]`` or the ``save_to_*`` flags);
- ``LOGGER`` (``save_to_logger``): each flushed/final row as one JSON line of ``logging_logger``: a
  :class:`LoggerOutput`, CodeCarbon's own, or a plain :class:`logging.Logger`; default the ``codecarbon`` logger;
- ``PROMETHEUS`` (``save_to_prometheus``): CodeCarbon's ``codecarbon_*`` gauges and ``codecarbon_energy_total``
  counter pushed to the Pushgateway at ``prometheus_url`` (job ``<project>_<experiment>``) at each flush and stop,
  deleted at stop as CodeCarbon does; ``PROMETHEUS_USERNAME``/``PROMETHEUS_PASSWORD`` give basic auth;
- ``output_handlers``: objects with CodeCarbon's ``out(total, delta)``/``live_out(total, delta)``/
  ``task_out(rows, experiment)``/``exit()`` (each optional; :class:`BaseOutput` is CodeCarbon's base class of them).
  ``live_out`` gets the figures so far at every ``api_call_interval``-th measurement, counted as CodeCarbon counts
  them: one at start, one every ``measure_power_secs`` (:class:`Ticker`), one at each flush and at stop;
- ``API``, ``LOGFIRE``, ``BOAMPS`` and ``emissions_endpoint`` are accepted with one warning naming them (they
  need CodeCarbon's dashboard account, logfire, or BoAmps' schema: not carbond's business).

An output that fails is logged (``carbond.codecarbon``), never raised into the program.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Collection
from enum import StrEnum
from typing import Any

from carbond.codecarbon.data import EmissionsData

log = logging.getLogger("carbond.codecarbon")
CODECARBON_LOGGER = "codecarbon"
PUSH_TIMEOUT_S = 10.0


class OutputMethod(StrEnum):
    """CodeCarbon 3.3's output methods."""

    CSV = "csv"
    API = "api"
    LOGGER = "logger"
    PROMETHEUS = "prometheus"
    LOGFIRE = "logfire"
    BOAMPS = "boamps"


NOT_IMPLEMENTED = (OutputMethod.API, OutputMethod.LOGFIRE, OutputMethod.BOAMPS)


class BaseOutput:
    """CodeCarbon's base class of outputs: subclass it, override what you need, pass instances in
    ``output_handlers``. ``out``: each flush and stop; ``live_out``: every ``api_call_interval``-th measurement;
    ``task_out``: the tasks, at each flush and stop; ``exit``: once, after the last ``out``."""

    def out(self, total: EmissionsData, delta: EmissionsData) -> None:
        """A flushed or final row (``total``) and the figures since the previous output (``delta``)."""

    def live_out(self, total: EmissionsData, delta: EmissionsData) -> None:
        """The figures so far, during the run."""

    def task_out(self, data: list[EmissionsData], experiment_name: str) -> None:
        """The tasks measured so far."""

    def exit(self) -> None:
        """The run is over."""


class _Unimplemented(BaseOutput):
    """An output of CodeCarbon's that needs its services (its dashboard's API, BoAmps' schema): importable and
    constructible, so code written for CodeCarbon runs, but it writes nothing (said once per object, at creation)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        log.warning(
            "carbond.codecarbon: %s is CodeCarbon's; carbond does not implement it: nothing is sent",
            type(self).__name__,
        )


class CodeCarbonAPIOutput(_Unimplemented):
    """CodeCarbon's dashboard API output (not implemented: see :class:`_Unimplemented`)."""


class BoAmpsOutput(_Unimplemented):
    """CodeCarbon's BoAmps report output (not implemented: see :class:`_Unimplemented`)."""


class Ticker:
    """Calls ``tick`` every ``period_s`` seconds in a daemon thread until :meth:`stop`: CodeCarbon's periodic
    measurement, which the live outputs count."""

    def __init__(self, period_s: float, tick: Callable[[], object]) -> None:
        self._period_s, self._tick = period_s, tick
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carbond-codecarbon-live", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            self._tick()

    def stop(self) -> None:
        """No tick after this returns but one already running (the tracker's lock orders it before stop)."""
        self._stopped.set()


def methods_of(o: dict[str, Any]) -> set[OutputMethod]:
    """The output methods asked for: ``output_methods`` (list or comma-separated names) wins over the flags."""
    given = o["output_methods"]
    if given is None:
        flags = {"csv": "save_to_file", "api": "save_to_api", "logger": "save_to_logger"}
        flags |= {"prometheus": "save_to_prometheus", "logfire": "save_to_logfire"}
        return {OutputMethod(m) for m, flag in flags.items() if o[flag]}
    names = given.split(",") if isinstance(given, str) else list(given)
    out = set()
    for name in names:
        try:
            out.add(OutputMethod(str(getattr(name, "value", name)).strip().lower()))
        except ValueError:
            log.error("carbond.codecarbon: unknown output method %r: ignored", name)
    return out


class LoggerOutput(BaseOutput):
    """CodeCarbon's ``LoggerOutput``: each row as JSON, at ``severity``, on ``logger``."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger], severity: int = logging.INFO):
        self.logger, self.logging_severity = logger, severity

    def out(self, total: EmissionsData, delta: EmissionsData | None) -> None:
        self.logger.log(self.logging_severity, json.dumps(dataclasses.asdict(total), default=str))

    def live_out(self, total: EmissionsData, delta: EmissionsData | None) -> None:
        self.out(total, delta)

    def task_out(self, data: list[EmissionsData], experiment_name: str) -> None:
        """Tasks are not logged (as CodeCarbon's)."""

    def exit(self) -> None:
        """Nothing to close."""


#: (metric, CodeCarbon's help, EmissionsData field) of the gauges; the counter is energy_total
GAUGES = (
    ("codecarbon_duration", "Duration from last measure (s)", "duration"),
    ("codecarbon_emissions", "Emissions as CO2-equivalents [CO2eq] (kg)", "emissions"),
    ("codecarbon_emissions_rate", "Emissions divided per duration (Kg/s)", "emissions_rate"),
    ("codecarbon_cpu_power", "CPU power (W)", "cpu_power"),
    ("codecarbon_gpu_power", "GPU power (W)", "gpu_power"),
    ("codecarbon_ram_power", "RAM power (W)", "ram_power"),
    ("codecarbon_cpu_energy", "Energy used per CPU since last reading (kWh)", "cpu_energy"),
    ("codecarbon_gpu_energy", "Energy used per GPU since last reading (kWh)", "gpu_energy"),
    ("codecarbon_ram_energy", "Energy used per RAM since last reading (kWh)", "ram_energy"),
    ("codecarbon_energy_consumed", "Sum of cpu_energy, gpu_energy and ram_energy (kWh)", "energy_consumed"),
)
LABELS = (  # noqa: SIM905
    "project_name country_name country_iso_code region cloud_provider cloud_region os codecarbon_version cpu_model "
    "cpu_count gpu_model gpu_count tracking_mode ram_total_size"
).split()


class PrometheusOutput(BaseOutput):
    """CodeCarbon's Pushgateway output: the delta since the last push as gauges, energy as a running counter
    (a registry of its own, never the global one)."""

    def __init__(self, prometheus_url: str, job_name: str = "codecarbon") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.prometheus_url, self.job_name = prometheus_url, job_name
        self.registry = CollectorRegistry()
        self._gauges = [(Gauge(n, h, LABELS, registry=self.registry), f) for n, h, f in GAUGES]
        self._total = Counter(
            "codecarbon_energy_total",
            "Accumulated cpu_energy, gpu_energy and ram_energy (kWh) since the start of the run",
            LABELS,
            registry=self.registry,
        )

    def _handler(self) -> Any:
        from prometheus_client.exposition import basic_auth_handler, default_handler

        user, password = os.environ.get("PROMETHEUS_USERNAME"), os.environ.get("PROMETHEUS_PASSWORD")

        def handle(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Any:
            if user is None or password is None:
                return default_handler(url, method, timeout, headers, data)
            return basic_auth_handler(url, method, timeout, headers, data, user, password)

        return handle

    def out(self, total: EmissionsData, delta: EmissionsData | None) -> None:
        from prometheus_client import push_to_gateway

        figures = dataclasses.asdict(delta if delta is not None else total)
        labels = dict.fromkeys(LABELS, "")
        labels["project_name"] = str(figures["project_name"])
        for gauge, field in self._gauges:
            gauge.labels(**labels).set(float(figures[field] or 0.0))
        self._total.labels(**labels).inc(max(float(figures["energy_consumed"] or 0.0), 0.0))
        push_to_gateway(
            self.prometheus_url,
            job=self.job_name,
            registry=self.registry,
            timeout=PUSH_TIMEOUT_S,
            handler=self._handler(),
        )

    def live_out(self, total: EmissionsData, delta: EmissionsData | None) -> None:
        self.out(total, delta)

    def task_out(self, data: list[EmissionsData], experiment_name: str) -> None:
        """Tasks are not pushed (as CodeCarbon's)."""

    def exit(self) -> None:
        from prometheus_client import delete_from_gateway

        delete_from_gateway(self.prometheus_url, job=self.job_name, timeout=PUSH_TIMEOUT_S, handler=self._handler())


def not_implemented(o: dict[str, Any], methods: set[OutputMethod], given: Collection[str]) -> list[str]:
    """The outputs asked for that carbond does not implement, named as given (``save_to_api`` or
    ``output_methods=api``), for the tracker's one warning."""
    flags = {OutputMethod.API: "save_to_api", OutputMethod.LOGFIRE: "save_to_logfire"}
    named = {flags[m] for m in flags if m in methods and o["output_methods"] is None}
    named |= {f"output_methods={m.value}" for m in NOT_IMPLEMENTED if m in methods and o["output_methods"] is not None}
    named |= {flag for flag in flags.values() if flag in given}  # even False: the keyword names a service carbond lacks
    return sorted(named) + (["emissions_endpoint"] if o["emissions_endpoint"] else [])


def handlers_of(o: dict[str, Any], methods: set[OutputMethod]) -> list[Any]:
    """The output objects for ``methods`` (the CSV is the tracker's own), then the user's ``output_handlers``."""
    out: list[Any] = []
    if OutputMethod.LOGGER in methods:
        given = o["logging_logger"]
        if given is None:
            given = logging.getLogger(CODECARBON_LOGGER)
        out.append(LoggerOutput(given) if isinstance(given, logging.Logger | logging.LoggerAdapter) else given)
    if OutputMethod.PROMETHEUS in methods:
        job = re.sub(r"[^a-zA-Z0-9_-]", "_", f"{o['project_name']}_{o['experiment_name']}")
        try:
            out.append(PrometheusOutput(str(o["prometheus_url"]), job_name=job))
        except ImportError as exc:  # prometheus_client is carbond's dependency; say so if a build dropped it
            log.error("carbond.codecarbon: save_to_prometheus needs prometheus_client: %s", exc)
    out += list(o["output_handlers"] or ())
    return out


def call(handler: Any, method: str, *args: Any) -> None:
    """``handler.method(*args)``, a failure logged: an output never breaks the program."""
    fn = getattr(handler, method, None)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the user's handler may raise anything; the program goes on
        log.error(
            "carbond.codecarbon: output %s.%s failed: %s: %s", type(handler).__name__, method, type(exc).__name__, exc
        )


class ToCodeCarbonLogger(logging.Handler):
    """Hands the drop-in's records to the handlers on the ``codecarbon`` logger (where CodeCarbon users attach
    theirs), at that logger's level when one is set; nothing when it has no handlers. Records reach the root
    logger only once, through ``carbond.codecarbon``'s own propagation."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(CODECARBON_LOGGER)
        if not target.handlers:
            self._last_resort(record)
            return
        if target.disabled or (target.level != logging.NOTSET and record.levelno < target.level):
            return
        for handler in target.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)

    @staticmethod
    def _last_resort(record: logging.LogRecord) -> None:
        """What logging does when no handler is configured (this one does not count): ``lastResort``, stderr."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(not isinstance(h, ToCodeCarbonLogger) for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        resort = logging.lastResort
        if resort is not None and record.levelno >= resort.level:
            resort.handle(record)


def bridge_codecarbon_logger() -> None:
    """Install :class:`ToCodeCarbonLogger` on ``carbond.codecarbon`` (once)."""
    if not any(isinstance(h, ToCodeCarbonLogger) for h in log.handlers):
        log.addHandler(ToCodeCarbonLogger())
