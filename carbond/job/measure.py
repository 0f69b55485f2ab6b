"""``carbond measure [options] -- CMD [ARGS...]``: run a command, measure it, print a summary, exit with its code.

The summary goes to standard error (the command keeps standard output to itself). The exit code is the command's,
or 128 + N when signal N killed it (127: command not found, 126: not executable). SIGINT, SIGTERM and SIGHUP are
forwarded to the command; a SIGINT typed at the terminal already reaches the whole foreground process group, the
command included, so that one is not sent twice. A failure to measure never stops the command from running: the
summary then says why nothing was measured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Any

from carbond.config import load as load_config
from carbond.job.cgroup import JobProbe, Placement, place
from carbond.job.report import summary
from carbond.job.tracker import Tracker

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


def _wait(pid: int) -> tuple[int, float | None]:
    """The child's exit code (128 + N for signal N) and its CPU time with its reaped descendants' (µs)."""
    _, status, usage = os.wait4(pid, 0)  # EINTR is retried by Python (PEP 475); handlers run in between
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code), (usage.ru_utime + usage.ru_stime) * 1e6


def run(args: Any) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("carbond measure: no command (carbond measure [options] -- CMD [ARGS...])", file=sys.stderr)
        return 2
    cfg = load_config(args.config)  # a ConfigError is reported by the CLI, exit 2
    from carbond import logs

    logs.configure("warning", "console")  # to stderr, never into the command's output
    tracker = Tracker(
        args.project, config=cfg, interval_s=args.interval, csv=args.csv, json=args.json, daemon=args.daemon
    )
    tracker.start(attach_self=False)
    method = "machine" if args.daemon else args.attribution
    try:
        placement = place(method, cfg.paths.cgroupfs, cfg.paths.procfs, tracker.run_id[:8])
    except Exception as exc:  # attribution is best effort
        placement = Placement("proctree", "the command's process tree through /proc", notes=[f"placement: {exc}"])
    try:
        proc = subprocess.Popen([*placement.prefix, *cmd], pass_fds=placement.pass_fds)
    except OSError as exc:
        placement.cleanup()
        print(f"carbond measure: {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
        tracker.stop(exit_code=127 if isinstance(exc, FileNotFoundError) else 126, command=cmd)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    previous = _forward(proc.pid)
    probe: JobProbe | None = None
    try:
        try:
            probe = placement.spawned(proc.pid)
        except Exception as exc:
            placement.notes.append(f"attribution failed: {type(exc).__name__}: {exc}")
        tracker.attach(probe, notes=placement.notes, command=cmd)
        code, cpu_usec = _wait(proc.pid)
        proc.returncode = code
    finally:
        _restore(previous)
    if probe is not None and cpu_usec is not None:
        probe.finish(cpu_usec)
    report = tracker.stop(exit_code=code, command=cmd)
    placement.cleanup()
    if not args.quiet:
        print(summary(report), file=sys.stderr)
    return code
