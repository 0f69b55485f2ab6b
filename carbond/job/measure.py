"""``carbond measure [options] -- CMD [ARGS...]``: run a command, measure it, print a summary, exit with its code.

The summary goes to standard error (the command keeps standard output to itself). The exit code is the command's,
or 128 + N when signal N killed it (127: command not found, 126: not executable). SIGINT, SIGTERM and SIGHUP are
forwarded to the command; a SIGINT typed at the terminal already reaches the whole foreground process group, the
command included, so that one is not sent twice. A failure to measure never stops the command from running: the
summary then says why nothing was measured. On a terminal a job running longer than 5 s gets a live progress line;
``-q`` prints only errors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from types import FrameType
from typing import Any

from carbond.config import Config
from carbond.config import load as load_config
from carbond.job.cgroup import JobProbe, Placement, place
from carbond.job.report import Report
from carbond.job.text import progress, summary
from carbond.job.tracker import MeasurementWarning, Tracker

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _terminal_sent_it() -> bool:
    """True when we are in the terminal's foreground process group (a typed Ctrl-C reached the child already)."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
    return False


def _forward(pid: int) -> dict[int, Any]:
    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_sent_it():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous: dict[int, Any] = {}
    for sig in FORWARDED:
        with contextlib.suppress(ValueError):  # not the main thread: no forwarding, nothing else changes
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _wait(pid: int) -> tuple[int, float, float]:
    """The child's exit code (128 + N for signal N), its CPU time with its reaped descendants' (µs) and the peak
    RSS of the largest of them (bytes; ``ru_maxrss`` is in KiB on Linux)."""
    _, status, usage = os.wait4(pid, 0)  # EINTR is retried by Python (PEP 475); handlers run in between
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code), (usage.ru_utime + usage.ru_stime) * 1e6, usage.ru_maxrss * 1024.0


class _Progress:
    """A live line on a terminal (standard error) while a long job runs: time, energy and emissions so far."""

    AFTER_S = 5.0  # a job shorter than this ends before the line would be worth showing
    EVERY_S = 1.0

    def __init__(self, tracker: Tracker, enabled: bool) -> None:
        self._tracker = tracker
        self._done = threading.Event()
        self._shown = False
        self._thread = threading.Thread(target=self._run, name="carbond-progress", daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        if self._done.wait(self.AFTER_S):
            return
        while True:
            try:
                line = progress(self._tracker.report())
                sys.stderr.write("\r\x1b[K" + line[: shutil.get_terminal_size().columns - 1])
                sys.stderr.flush()
                self._shown = True
            except Exception as exc:  # noqa: BLE001 - progress is decoration: it stops, says why once, never fatal
                sys.stderr.write(f"\r\x1b[Kcarbond: progress line stopped: {type(exc).__name__}: {exc}\n")
                return
            if self._done.wait(self.EVERY_S):
                return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _show(caught: list[warnings.WarningMessage]) -> None:
    """Warnings as plain lines (``carbond: warning: ...``), once each, never Python's file:line form."""
    seen: set[str] = set()
    for w in caught:
        text = str(w.message).removeprefix("carbond: ")
        if text not in seen:
            seen.add(text)
            print(f"carbond: warning: {text}", file=sys.stderr)


def run(args: Any) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("carbond measure: no command (carbond measure [options] -- CMD [ARGS...])", file=sys.stderr)
        return 2
    cfg = load_config(args.config)  # a ConfigError is reported by the CLI, exit 2
    from carbond import logs

    logs.configure("error" if args.quiet else "warning")  # to stderr (JSON unless a terminal), never to stdout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MeasurementWarning)
        code, report = _measured(args, cfg, cmd)
    if not args.quiet:
        _show([w for w in caught if issubclass(w.category, MeasurementWarning)])
        print(summary(report), file=sys.stderr)
    elif report.scope == "none":  # an error, even with -q: nothing was measured
        print(f"carbond: error: not measured: {report.error}", file=sys.stderr)
    return code


def _measured(args: Any, cfg: Config, cmd: list[str]) -> tuple[int, Report]:
    tracker = Tracker(
        args.project,
        config=cfg,
        interval_s=args.interval,
        csv=args.csv,
        json=args.json,
        daemon=args.daemon,
        csv_columns=args.csv_columns,
    )
    tracker.start(attach_self=False)
    method = "machine" if args.daemon else args.attribution
    try:
        placement = place(method, cfg.paths.cgroupfs, cfg.paths.procfs, tracker.run_id[:8])
    except Exception as exc:  # noqa: BLE001 - attribution is best effort
        placement = Placement("proctree", "the command's process tree through /proc", notes=[f"placement: {exc}"])
    try:
        proc = subprocess.Popen([*placement.prefix, *cmd], pass_fds=placement.pass_fds)
    except OSError as exc:
        placement.cleanup()
        print(f"carbond measure: {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return code, tracker.stop(exit_code=code, command=cmd)
    previous = _forward(proc.pid)
    probe: JobProbe | None = None
    live = _Progress(tracker, not args.quiet and sys.stderr.isatty())
    try:
        try:
            probe = placement.spawned(proc.pid)
        except Exception as exc:  # noqa: BLE001 - attribution is best effort: the note says why
            placement.notes.append(f"attribution failed: {type(exc).__name__}: {exc}")
        tracker.attach(probe, notes=placement.notes, command=cmd)
        code, cpu_usec, peak_rss = _wait(proc.pid)
        proc.returncode = code
    finally:
        live.close()
        _restore(previous)
    if probe is not None:
        probe.finish(cpu_usec, peak_rss)
    if tracker.source == "daemon" and not args.quiet and not tracker.error:
        print("carbond: waiting for the daemon's next tick to prorate the job's span", file=sys.stderr)
    report = tracker.stop(exit_code=code, command=cmd)
    placement.cleanup()
    return code, report
