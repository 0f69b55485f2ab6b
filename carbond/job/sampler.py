"""Where a job's figures come from: the daemon's own pipeline run locally, or a running daemon's /metrics.

:class:`LocalSampler` builds the daemon's own pipeline through the public builder
(:func:`carbond.builder.build_monitor` with ``daemon=False``: the same sensors, intensity, PUE and accounting,
without the state file, cgroup attribution or embodied emissions) and drives the monitor from a private event loop
in a background thread: every ``interval_s``, at each :meth:`mark` (phase boundaries) and once more at
:meth:`stop`. Nothing global is touched: no signal handler,
no logging set-up, no event loop of the caller's.

:class:`carbond.job.daemon.DaemonSampler` reads a running daemon's counters instead, prorated to the job's span.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from carbond.builder import NoSensor, build_monitor  # the daemon's own wiring
from carbond.config import Config
from carbond.config import load as load_config
from carbond.job.cgroup import JobProbe, JobUsage, MachineUsage, ProcTreeProbe, read_machine
from carbond.job.ledger import NOTHING, Checkpoint, Ledger, Shares, shares
from carbond.model import Snapshot

START_TIMEOUT_S = 60.0


class MeasureFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sampler(Protocol):
    source: str
    sensors: list[str]
    unavailable: dict[str, str]
    attribution_error: str

    @property
    def last(self) -> Checkpoint: ...

    def start(self, probe: JobProbe | None = None, whole_machine: bool = False) -> None: ...

    def attach(self, probe: JobProbe | None, whole_machine: bool = False, fresh: bool = True) -> Checkpoint:
        """Attribute from now on to ``probe`` (None and ``whole_machine``: the machine); the checkpoint of now."""
        ...

    def mark(self) -> Checkpoint: ...

    def stop(self) -> Checkpoint: ...


class LocalSampler:
    source = "local"

    def __init__(self, cfg: Config, interval_s: float, gpus: frozenset[str] | None = None) -> None:
        self._cfg = cfg
        self._interval = interval_s
        self._procfs = Path(cfg.paths.procfs)
        self._tick_timeout = cfg.sensor_timeout() + 10.0
        self.sensors: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.attribution_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gpus = gpus
        self._ledger = Ledger(time.monotonic(), time.time(), gpus)
        self._stack = contextlib.AsyncExitStack()
        self._probe: JobProbe | None = None
        self._whole = False
        self._prev: tuple[MachineUsage, JobUsage] | None = None

    @property
    def last(self) -> Checkpoint:
        return self._ledger.last

    def _call(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, probe: JobProbe | None = None, whole_machine: bool = False) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="carbond-job", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(probe, whole_machine), START_TIMEOUT_S)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5.0)
            raise

    def _serve(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self, probe: JobProbe | None, whole_machine: bool) -> None:
        try:
            self._monitor, found = await build_monitor(self._cfg, self._stack, daemon=False, interval_s=self._interval)
            self.unavailable = dict(found.unavailable)
            self.sensors = [s.name for s in found.started]
            await self._wire(probe, whole_machine)
        except NoSensor as exc:
            await self._stack.aclose()
            raise MeasureFailed(str(exc)) from None
        except BaseException:
            await self._stack.aclose()
            raise

    async def _wire(self, probe: JobProbe | None, whole_machine: bool) -> None:
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        await self._monitor.prime()
        self._ledger = Ledger(time.monotonic(), time.time(), self._gpus)
        self._set_probe(probe, whole_machine)
        self._ticker = asyncio.create_task(self._periodic())

    def _set_probe(self, probe: JobProbe | None, whole_machine: bool, fresh: bool = False) -> None:
        """``fresh``: the job has just started, its usage so far counts (baseline zero)."""
        self._probe, self._whole, self._prev = probe, whole_machine, None
        if probe is not None:
            try:
                base = JobUsage(0.0, 0.0, frozenset()) if fresh else probe.sample()
                self._prev = (read_machine(self._procfs), base)
            except Exception as exc:  # noqa: BLE001 - attribution is best effort: say why in the report
                self.attribution_error = f"{type(exc).__name__}: {exc}"

    async def _periodic(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)
                return
            except TimeoutError:
                await self._tick()

    async def _tick(self) -> Checkpoint:
        async with self._lock:
            snap = await self._monitor.tick()
            return self._ledger.add(snap, self._shares(snap))

    def _shares(self, snap: Snapshot) -> Shares | None:
        if self._whole:
            return None
        if self._probe is None or self._prev is None:
            return NOTHING  # the job has not started yet (or cannot be observed: see attribution_error)
        try:
            now = (read_machine(self._procfs), self._probe.sample())
        except Exception as exc:  # noqa: BLE001 - attribution is best effort: the report says why
            self.attribution_error = f"{type(exc).__name__}: {exc}"
            return NOTHING
        (m0, u0), (m1, u1) = self._prev, now
        self._prev = now
        return shares(
            u1.cpu_usec - u0.cpu_usec,
            m1.busy_usec - m0.busy_usec,
            m1.total_usec - m0.total_usec,
            u1.rss_bytes,
            m1.mem_used_bytes,
            snap.devices.process_shares,
            u1.pids,
        )

    async def _attach(self, probe: JobProbe | None, whole_machine: bool, fresh: bool) -> Checkpoint:
        cp = await self._tick()  # close the span before the job started
        self._set_probe(probe, whole_machine, fresh)
        return cp

    def attach(self, probe: JobProbe | None, whole_machine: bool = False, fresh: bool = True) -> Checkpoint:
        cp: Checkpoint = self._call(self._attach(probe, whole_machine, fresh), self._tick_timeout)
        return cp

    def mark(self) -> Checkpoint:
        cp: Checkpoint = self._call(self._tick(), self._tick_timeout)
        return cp

    async def _stop(self) -> Checkpoint:
        self._stopping.set()
        try:
            await self._ticker
            return await self._tick()
        finally:
            await self._stack.aclose()

    def stop(self) -> Checkpoint:
        assert self._loop is not None
        assert self._thread is not None
        try:
            cp: Checkpoint = self._call(self._stop(), self._tick_timeout)
            return cp
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)


def job_config(config: str | Path | Config | None, interval_s: float | None) -> tuple[Config, float]:
    """A job's config (a path, a Config, or None: the default search) and its sampling interval (0.1 s to 1 h;
    None: the config's ``measure_power_secs``)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    interval = min(max(interval_s or cfg.measure_power_secs, 0.1), 3600.0)
    return cfg.model_copy(update={"measure_power_secs": interval}), interval


def own_processes(procfs: Path) -> ProcTreeProbe:
    """This process and its descendants (``track``'s default scope), the measuring thread excluded."""
    pid = os.getpid()
    detail = f"this process ({pid}) and its descendants through /proc, the measuring thread excluded"
    return ProcTreeProbe(pid, exclude_calling_thread=True, procfs=procfs, detail=detail)
