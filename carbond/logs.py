"""structlog set-up: JSON lines when not on a TTY (journald, Kubernetes) or when asked, console otherwise; and the
event loop's exception handler, so that asyncio's own error reports are single structured lines too.

Until a program configures logging (:func:`configure`, its own structlog set-up, or :func:`library`), carbond's
module loggers print only warnings and errors, to stderr: a program that imports carbond (``track()``) gets no
start-up lines in its output."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

#: set while carbond runs as a library (the CodeCarbon drop-in): the stdlib logger prefix its module loggers use
_library: str | None = None


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    global _library
    _library = None  # carbond's own program (daemon, CLI): structlog's output, as configured here
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def library(prefix: str) -> None:
    """carbond used as a library: from now on its module loggers (:func:`get_logger`) log through the stdlib
    loggers ``<prefix>.<module>`` (``carbond.sensors.rapl`` -> ``carbond.codecarbon.sensors.rapl``), leaving
    structlog's global configuration and the root logger as the program set them. :func:`configure` ends it."""
    global _library
    _library = prefix


def _render(logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    """``<logger>: <event> key=value ...`` (the stdlib logger's name: where the line comes from)."""
    text = f"{getattr(logger, 'name', 'carbond')}: {event.pop('event', '')}"
    event.pop("level", None)
    return " ".join([text, *(f"{k}={v!r}" for k, v in event.items())])


_WARNING_AND_ABOVE = frozenset({"warning", "warn", "error", "err", "exception", "critical", "fatal", "failure"})


def _at_least_warning(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if method not in _WARNING_AND_ABOVE:
        raise structlog.DropEvent
    return event


def _plain(name: str) -> structlog.typing.Processor:
    def render(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
        text = f"{name}: {event.pop('event', '')}"
        return " ".join([text, *(f"{k}={v!r}" for k, v in event.items())])

    return render


class _ModuleLogger:
    """A carbond module's logger: structlog's (global configuration) unless carbond runs as a library."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._structlog = structlog.get_logger(name)
        self._stdlib: tuple[str, Any] | None = None
        self._quiet: Any = None

    def _target(self) -> Any:
        prefix = _library
        if prefix is None and not structlog.is_configured():
            # nobody configured logging (carbond imported by a program, e.g. track()): warnings and errors only,
            # to stderr, never structlog's default of every event printed on the program's stdout
            if self._quiet is None:
                self._quiet = structlog.wrap_logger(
                    _STDERR_LOGGER,
                    processors=[_at_least_warning, structlog.processors.format_exc_info, _plain(self._name)],
                    context_class=dict,
                )
            return self._quiet
        if prefix is None:
            return self._structlog
        if self._stdlib is None or self._stdlib[0] != prefix:
            child = self._name.removeprefix("carbond").lstrip(".")
            std = logging.getLogger(f"{prefix}.{child}" if child else prefix)
            wrapped = structlog.wrap_logger(
                std,
                processors=[structlog.stdlib.filter_by_level, structlog.processors.format_exc_info, _render],
                wrapper_class=structlog.stdlib.BoundLogger,
                context_class=dict,
                cache_logger_on_first_use=True,
            )
            self._stdlib = (prefix, wrapped)
        return self._stdlib[1]

    def __getattr__(self, method: str) -> Any:
        return getattr(self._target(), method)


def get_logger(name: str) -> Any:
    """``structlog.get_logger(name)`` for carbond's modules; routed to stdlib logging while :func:`library` is on."""
    return _ModuleLogger(name)


class StderrLogger:
    """A structlog logger writing each rendered event as one line to ``sys.stderr`` as it is when the event is
    logged. structlog's PrintLogger keeps the stream it was given when logging was configured: after a stream
    swap (a redirect, pytest's capture of one test), events went to a stale or closed stream."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = err = critical = fatal = exception = failure = msg


_STDERR_LOGGER = StderrLogger()


def _stderr_logger(*_args: Any) -> StderrLogger:
    return _STDERR_LOGGER


#: accept() and friends failing for want of descriptors or memory: the same condition, one streak.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LoopErrors:
    """The event loop's exception handler: each error asyncio reports (a failing accept(), a task's unhandled
    exception) becomes one single-line structured event instead of a multi-line traceback.

    Repeats make streaks: while the same error recurs with gaps under ``quiet_s``, only its first occurrence is
    logged; when it stops, one more event gives the count. Out of file descriptors, asyncio's accept loop retries
    every second for as long as the condition lasts; that is one event when it starts and one when it ends.
    """

    def __init__(self, quiet_s: float = 5.0) -> None:
        self._quiet = quiet_s
        self._streaks: dict[str, tuple[int, float, asyncio.TimerHandle | None]] = {}
        self._log = structlog.get_logger("carbond.loop")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        exhausted = isinstance(exc, OSError) and exc.errno in _EXHAUSTED
        key = "exhausted" if exhausted else message
        count, started, timer = self._streaks.get(key, (0, loop.time(), None))
        if timer is not None:
            timer.cancel()
        if count == 0:
            error = f"{type(exc).__name__}: {exc}" if exc is not None else None
            if exhausted:
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                self._log.error("out_of_file_descriptors", error=error, open_files_limit=limit, during=message)
            else:
                self._log.error("event_loop_error", message=message, error=error)
        timer = loop.call_later(self._quiet, self._end, loop, key)
        self._streaks[key] = (count + 1, started, timer)

    def _end(self, loop: asyncio.AbstractEventLoop, key: str) -> None:
        count, started, _ = self._streaks.pop(key, (0, 0.0, None))
        if count > 1 or key == "exhausted":
            event = "out_of_file_descriptors_over" if key == "exhausted" else "event_loop_error_repeated"
            self._log.info(event, times=count, seconds=round(loop.time() - started, 1))


def install_loop_handler(loop: asyncio.AbstractEventLoop, quiet_s: float = 5.0) -> None:
    loop.set_exception_handler(LoopErrors(quiet_s))
