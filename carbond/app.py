"""The composition root of the daemon: signals, the listener and the measurement pipeline's lifecycle.

With :mod:`carbond.builder` (the wiring shared with jobs and ``probe``), the only place that reads the whole config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
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
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); SIGHUP reloads ``config_path``. Returns the exit code.

    The listener lives for the whole run; the measurement pipeline lives on an exit stack of its own. A reload
    validates the new file first (an invalid one is logged and the running config kept), then closes the
    pipeline's stack and builds the new one (counters continue through the state file). When the new config's
    sensors cannot start, the previous config is built again and the daemon goes on. The state_dir lock is taken
    once, before anything else, and held until the process ends; a reload to another state_dir takes that one
    first (rejected, running config kept, when another process holds it) and lets the old one go after.
    """
    stop = stop or asyncio.Event()
    cycle = asyncio.Event()  # ends the current pipeline: on stop, or on a valid reload
    pending: list[Config] = []
    loop = asyncio.get_running_loop()
    logs.install_loop_handler(loop)  # asyncio's reports (accept() out of descriptors ...) as single JSON lines

    live: list[LiveWebConfig] = []
    locks: dict[Path, StateLock] = {}  # state_dir locks held for the whole run: the running config's, pending ones'

    def on_hup() -> None:
        for web_config in live:  # the web config file (TLS files, passwords) whatever becomes of the rest
            web_config.reload()
        new = _reloaded(config_path, cfg)
        if new is None:
            return
        try:  # the new state_dir is taken before the old one is let go, and kept whatever the new pipeline does
            _hold(locks, new)
        except StateDirInUse as exc:
            log.error("reload_rejected", problems=[str(exc)], kept="the running config")
            return
        pending.append(new)
        cycle.set()

    def on_stop() -> None:
        stop.set()
        cycle.set()

    for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
    current: list[Monitor] = []
    served: list[Snapshot | None] = [None]

    def latest() -> Snapshot | None:
        """The running monitor's snapshot; across a reload, the old one until the new monitor has published."""
        snap = current[0].latest() if current else None
        if snap is not None:
            served[0] = snap
        return served[0]

    async with contextlib.AsyncExitStack() as daemon:
        daemon.callback(log.info, "stopped")  # the last thing on the way out
        try:
            _hold(locks, cfg)
        except StateDirInUse as exc:
            log.error("state_dir_in_use", error=str(exc))
            return 1
        daemon.callback(_let_go, locks, [])  # after the pipeline has closed its state file
        relay = asyncio.create_task(_relay(stop, cycle))
        daemon.callback(relay.cancel)
        opened = await _pipeline(cfg)
        if opened is None:
            return 1
        monitor, pipeline = opened
        current.append(monitor)
        daemon.push_async_callback(lambda: pipeline.aclose())  # the pipeline of the moment: one entry for all reloads
        host, port = split_listen_address(cfg.listen_address)
        web = web or WebConfig()
        live.append(LiveWebConfig(cfg.web.config_file, web))
        daemon.callback(live[0].close)
        tls = web.tls_server_config is not None
        try:
            server = await start_server(latest, host, port, live[0], max_connections=cfg.web.max_connections)
        except OSError as exc:
            log.error("listen_failed", address=cfg.listen_address, error=str(exc))
            return 1
        daemon.push_async_callback(server.close)
        log.info(
            "listening",
            address=cfg.listen_address,
            interval_s=cfg.measure_power_secs,
            tls=tls,
            basic_auth=bool(web.basic_auth_users),
        )
        notify_systemd(b"READY=1")
        while True:
            await current[0].run(cycle)
            await pipeline.aclose()
            if stop.is_set() or not pending:
                break
            previous, cfg = cfg, pending.pop()
            pending.clear()
            cycle.clear()
            opened = await _pipeline(cfg)
            if opened is None:
                log.error("reload_failed", reason="no sensor of the new config starts", kept="the running config")
                cfg = previous
                opened = await _pipeline(cfg)
                if opened is None:
                    return 1
            else:
                log.info("reloaded", interval_s=cfg.measure_power_secs, sensors=opened[0].sensor_names)
            _let_go(locks, [cfg, *pending])  # a state_dir left behind, once the pipeline on the new one runs
            current[0], pipeline = opened
    return 0


async def _pipeline(cfg: Config) -> tuple[Monitor, contextlib.AsyncExitStack] | None:
    """The monitor of ``cfg`` on a new exit stack (the caller closes it); None (logged) when no sensor works."""
    pipeline = contextlib.AsyncExitStack()
    try:
        monitor, _ = await build_monitor(cfg, pipeline)
    except NoSensor as exc:
        await pipeline.aclose()
        log.error("no_sensor_available", reasons=exc.reasons)
        return None
    except StateDirInUse as exc:
        await pipeline.aclose()
        log.error("state_dir_in_use", error=str(exc))
        return None
    except BaseException:
        await pipeline.aclose()
        raise
    return monitor, pipeline


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
