"""The composition root of the daemon: signals, the listener and the measurement pipeline's lifecycle.

:class:`Daemon` is one run: its fields are what a SIGHUP replaces (the config and the pipeline) and what it keeps
(the listener, the state_dir locks, the last snapshot served); :func:`run` is the entry point. With
:mod:`carbond.builder` (the wiring shared with jobs and ``probe``), the only place that reads the whole config.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from carbond import logs
from carbond.builder import NoSensor, build_monitor
from carbond.config import Config, split_listen_address
from carbond.config import load as load_config
from carbond.errors import ConfigError
from carbond.exporter.live import LiveWebConfig
from carbond.exporter.server import start_server
from carbond.exporter.webconfig import WebConfig
from carbond.exporter.webconfig import load as load_web_config
from carbond.logs import get_logger
from carbond.model import Snapshot
from carbond.monitor import Monitor
from carbond.state import StateDirInUse, StateLock

log = get_logger("carbond.app")


def _reloaded(path: str | None, old: Config) -> Config | None:
    """The new config for SIGHUP, or None (logged) when it is invalid or changes what needs a restart."""
    if path is None:
        log.info("reload_skipped", reason="running on embedded defaults: no config file to reload")
        return None
    try:
        new = load_config(path)
        if new.web.config_file is not None and new.web != old.web:
            load_web_config(new.web.config_file)
    except ConfigError as exc:
        log.error("reload_rejected", problems=exc.lines(), kept="the running config")
        return None
    if new.listen_address != old.listen_address or new.web != old.web:
        log.warning("reload_needs_restart", keys=["listen_address", "web"], kept="the running listener")
        new = new.model_copy(update={"listen_address": old.listen_address, "web": old.web})
    return new


async def run(
    cfg: Config, stop: asyncio.Event | None = None, web: WebConfig | None = None, config_path: str | None = None
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); SIGHUP reloads ``config_path``. Returns the exit code."""
    return await Daemon(cfg, stop or asyncio.Event(), config_path).run(web or WebConfig())


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The measurement pipeline of one config: its monitor, and the exit stack its parts are open on."""

    monitor: Monitor
    stack: contextlib.AsyncExitStack


class Daemon:
    """One run of the daemon, from taking the state_dir lock to "stopped".

    A SIGHUP replaces ``cfg`` and ``pipeline``: the monitor and everything :func:`build_monitor` opens (sensors, the
    state file, the intensity cache and its persisted value, the attributor). The new file is validated first (an
    invalid one is logged and the running config kept); the running pipeline is closed, then the new one built.
    When the new config's sensors cannot start, the previous config is built again and the daemon goes on.

    A SIGHUP keeps, for the whole run:

    - the listener (``listen_address`` and ``web`` need a restart) and ``web``, the live web config file (TLS
      files, passwords), which every SIGHUP re-reads whatever becomes of the rest;
    - ``locks``, the state_dir locks: the first is taken before anything else; a reload to another state_dir takes
      that one first (rejected, running config kept, when another process holds it) and lets the old one go once
      the pipeline on the new one runs;
    - ``served``, the last snapshot, which scrapes see until the new monitor has published;
    - the tick-duration histogram, carried into the new monitor (:meth:`Monitor.continue_tick_histogram`); the
      energy and emissions counters continue through the state file.
    """

    def __init__(self, cfg: Config, stop: asyncio.Event, config_path: str | None) -> None:
        self.cfg = cfg  # the running config
        self.config_path = config_path  # what SIGHUP reloads; None: embedded defaults, nothing to reload
        self.stop = stop
        self.cycle = asyncio.Event()  # ends the running pipeline: on stop, or on a valid reload
        self.pending: Config | None = None  # validated by the last SIGHUP, built once the running pipeline ends
        self.locks: dict[Path, StateLock] = {}  # held: the running config's state_dir and the pending one's
        self.pipeline: Pipeline | None = None
        self.web: LiveWebConfig | None = None
        self.served: Snapshot | None = None

    def latest(self) -> Snapshot | None:
        """The running monitor's snapshot; across a reload, the old one until the new monitor has published."""
        snap = self.pipeline.monitor.latest() if self.pipeline is not None else None
        if snap is not None:
            self.served = snap
        return self.served

    def on_hup(self) -> None:
        if self.web is not None:  # the web config file whatever becomes of the rest
            self.web.reload()
        new = _reloaded(self.config_path, self.cfg)
        if new is None:
            return
        try:  # the new state_dir is taken before the old one is let go, and kept whatever the new pipeline does
            _hold(self.locks, new)
        except StateDirInUse as exc:
            log.error("reload_rejected", problems=[str(exc)], kept="the running config")
            return
        self.pending = new
        self.cycle.set()

    def on_stop(self) -> None:
        self.stop.set()
        self.cycle.set()

    async def run(self, web: WebConfig) -> int:
        """Take the lock, build the pipeline, listen, then measure until stopped, rebuilding on each reload."""
        loop = asyncio.get_running_loop()
        logs.install_loop_handler(loop)  # asyncio's reports (accept() out of descriptors ...) as single JSON lines
        for sig, handler in (
            (signal.SIGTERM, self.on_stop),
            (signal.SIGINT, self.on_stop),
            (signal.SIGHUP, self.on_hup),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(log.info, "stopped")  # the last thing on the way out
            try:
                _hold(self.locks, self.cfg)
            except StateDirInUse as exc:
                log.error("state_dir_in_use", error=str(exc))
                return 1
            stack.callback(_let_go, self.locks, [])  # after the pipeline has closed its state file
            relay = asyncio.create_task(_relay(self.stop, self.cycle))
            stack.callback(relay.cancel)
            self.pipeline = await _pipeline(self.cfg)
            if self.pipeline is None:
                return 1
            stack.push_async_callback(self._close_pipeline)  # the pipeline of the moment: one entry for all reloads
            if not await self._listen(stack, web):
                return 1
            # What startup made (modules, config, the pipeline) lives as long as the daemon: out of the collector's
            # sight, a full collection under a connection flood walks only what the connections made.
            gc.freeze()
            notify_systemd(b"READY=1")
            while True:
                await self.pipeline.monitor.run(self.cycle)
                await self.pipeline.stack.aclose()
                if self.stop.is_set() or self.pending is None:
                    return 0
                if not await self._reload():
                    return 1

    async def _listen(self, stack: contextlib.AsyncExitStack, web: WebConfig) -> bool:
        """Start the listener on ``stack``; False (logged) when the address cannot be bound."""
        cfg = self.cfg
        self.web = LiveWebConfig(cfg.web.config_file, web)
        stack.callback(self.web.close)
        host, port = split_listen_address(cfg.listen_address)
        try:
            server = await start_server(self.latest, host, port, self.web, max_connections=cfg.web.max_connections)
        except OSError as exc:
            log.error("listen_failed", address=cfg.listen_address, error=str(exc))
            return False
        stack.push_async_callback(server.close)
        log.info(
            "listening",
            address=cfg.listen_address,
            interval_s=cfg.measure_power_secs,
            tls=web.tls_server_config is not None,
            basic_auth=bool(web.basic_auth_users),
        )
        return True

    async def _reload(self) -> bool:
        """Build the pending config's pipeline in place of the closed one (the previous config's when the new one
        has no sensor that starts); False when neither can be built."""
        assert self.pending is not None
        assert self.pipeline is not None
        previous, self.cfg, self.pending = self.cfg, self.pending, None
        self.cycle.clear()
        opened = await _pipeline(self.cfg)
        if opened is None:
            log.error("reload_failed", reason="no sensor of the new config starts", kept="the running config")
            self.cfg = previous
            opened = await _pipeline(self.cfg)
            if opened is None:
                return False
        else:
            log.info("reloaded", interval_s=self.cfg.measure_power_secs, sensors=opened.monitor.sensor_names)
        # a state_dir left behind is let go once the pipeline on the new one runs (a SIGHUP meanwhile keeps its own)
        _let_go(self.locks, [self.cfg] if self.pending is None else [self.cfg, self.pending])
        opened.monitor.continue_tick_histogram(self.pipeline.monitor)
        self.pipeline = opened
        return True

    async def _close_pipeline(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.stack.aclose()


async def _pipeline(cfg: Config) -> Pipeline | None:
    """The pipeline of ``cfg`` (the caller closes its stack); None (logged) when no sensor works."""
    stack = contextlib.AsyncExitStack()
    try:
        monitor, _ = await build_monitor(cfg, stack)
    except NoSensor as exc:
        await stack.aclose()
        log.error("no_sensor_available", reasons=exc.reasons)
        return None
    except StateDirInUse as exc:
        await stack.aclose()
        log.error("state_dir_in_use", error=str(exc))
        return None
    except BaseException:
        await stack.aclose()
        raise
    if cfg.attribution.slurm.enabled:
        _slurm_ledger(cfg, monitor, stack)
    return Pipeline(monitor, stack)


def _slurm_ledger(cfg: Config, monitor: Monitor, stack: contextlib.AsyncExitStack) -> None:
    """The per-job ledger on the monitor's snapshots, sharing the attributor's spool; closed (the jobs in progress
    saved) first when the pipeline closes."""
    from carbond.slurm.cli import ledger_dir
    from carbond.slurm.ledger import SlurmLedger

    spool = monitor.attributor.slurm if monitor.attributor is not None else None
    if spool is None:
        log.warning("slurm_ledger_off", reason="attribution is off or found no cgroups: no job series to sum")
        return
    section = cfg.attribution.slurm.ledger
    ledger = SlurmLedger(
        spool, ledger_dir(cfg), host=cfg.resolved_host(), max_bytes=section.max_bytes, keep=section.keep
    )
    monitor.on_snapshot(ledger.on_tick)
    stack.push_async_callback(asyncio.to_thread, ledger.close)


def _hold(locks: dict[Path, StateLock], cfg: Config) -> None:
    """Hold the lock of ``cfg``'s state_dir (kept when already held); StateDirInUse when another process has it."""
    lock = StateLock.acquire(cfg.resolved_state_dir())
    locks[StateLock.key(lock.state_dir)] = lock


def _let_go(locks: dict[Path, StateLock], keep: list[Config]) -> None:
    """Release the held locks of every state_dir but those of ``keep``."""
    wanted = {StateLock.key(c.resolved_state_dir()) for c in keep}
    for key in [k for k in locks if k not in wanted]:
        locks.pop(key).release()


def notify_systemd(state: bytes) -> None:
    """sd_notify for the unit's Type=notify: systemd counts the service started (and lets a reload through) only
    once the listener is up, instead of at exec, when SIGHUP would still kill the process. Nothing without
    $NOTIFY_SOCKET (containers, a shell)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(state)


async def _relay(stop: asyncio.Event, cycle: asyncio.Event) -> None:
    await stop.wait()
    cycle.set()
