"""Run the real daemon as a subprocess on a config of the test's, and scrape it (end-to-end tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.wait import DEFAULT_TIMEOUT_S, NotYet, eventually

T = TypeVar("T")
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def parse_metrics(text: str) -> Metrics:
    """Sample name + sorted labels -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Daemon:
    """``with Daemon(tmp, config) as d: d.scrape()``; the process gets SIGTERM on exit."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cfg = {"listen_address": f"127.0.0.1:{self.port}", "state_dir": str(workdir / "state"), **config}
        self.config_path = workdir / "carbond.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / "carbond.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, ready_timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Start the daemon and return once ``/readyz`` answers 200 (its first snapshot is published)."""
        if self._log_file is not None:
            self._log_file.close()
        log = self._log_file = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "carbond", "run", "--config", str(self.config_path), "--log-format", "json"]
        proc = self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env)

        def ready() -> bool:
            if proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"carbond exited with {proc.returncode}: {self.log()}")
            return self.get("/readyz")[0] == 200

        try:
            eventually(ready, ready_timeout, what="/readyz answering 200", ignore=(OSError,))
        except NotYet:
            raise RuntimeError(f"carbond not ready after {ready_timeout}s: {self.log()}") from None

    def stop(self, timeout: float = 10.0) -> int | None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return None if self.proc is None else self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def scrape(self) -> Metrics:
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode())

    def wait_for(
        self,
        predicate: Callable[[Metrics], T | None],
        timeout: float = DEFAULT_TIMEOUT_S,
        what: str = "",
        show: Callable[[Metrics], object] | None = None,
    ) -> T:
        """Scrape until ``predicate(metrics)`` is truthy and return its value (a failed scrape counts as not yet).

        On timeout the failure names ``what`` and adds ``show(last scrape)`` (the series that matter) and the log's
        tail, so a stuck wait says what the daemon was serving."""
        last: list[Metrics] = []

        def check() -> T | None:
            m = self.scrape()
            last[:] = [m]
            return predicate(m)

        try:
            return eventually(check, timeout, what=what, ignore=(OSError, RuntimeError))
        except NotYet as err:
            shown = show(last[0]) if show is not None and last else None
            raise NotYet(f"{err}; last scrape: {shown!r}; log tail: {self.log()[-1500:]}") from None

    def wait_for_ticks(self, count: int, timeout: float = DEFAULT_TIMEOUT_S) -> Metrics:
        """Scrape until the daemon has completed ``count`` more ticks than now (its tick histogram's count)."""
        start = self.wait_for(lambda m: tick_count(m) if tick_count(m) >= 1 else None, timeout, "a first tick")
        return self.wait_for(lambda m: m if tick_count(m) >= start + count else None, timeout, f"{count} more ticks")

    def wait_for_log(self, needle: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """Wait until the daemon's log contains ``needle``; returns the log."""
        return eventually(lambda: self.log() if needle in self.log() else None, timeout, what=f"log line {needle!r}")


def tick_count(metrics: Metrics) -> float:
    """Ticks the daemon has completed (``carbond_tick_duration_seconds_count``), 0 before the first."""
    return next((v for (name, _), v in metrics.items() if name == "carbond_tick_duration_seconds_count"), 0.0)
