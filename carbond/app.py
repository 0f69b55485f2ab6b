"""The composition root: the only place that reads the whole config and wires the parts together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from carbond import sensors as backends
from carbond.attribution.attributor import Attributor
from carbond.attribution.kubernetes import PodDirectory, endpoint
from carbond.config import Config, split_listen_address
from carbond.config import load as load_config
from carbond.embodied import Embodied, server_kg
from carbond.errors import ConfigError, SensorUnavailable
from carbond.exporter.server import start_server
from carbond.exporter.webconfig import WebConfig, ssl_context
from carbond.exporter.webconfig import load as load_web_config
from carbond.intensity import ManagedIntensity
from carbond.intensity.build import build_source
from carbond.model import DeviceClass, Snapshot
from carbond.monitor import Monitor
from carbond.sensors.base import BackendOptions, Clock, Paths, Sensor
from carbond.state import Persistence, StateStore, read_boot_id

log = structlog.get_logger("carbond.app")


def backend_options(name: str, cfg: Config, clock: Clock = time.monotonic) -> BackendOptions:
    """Each backend gets the filesystem roots, the clock and only its own config section."""
    sections: dict[str, Any] = {
        "rapl": cfg.rapl,
        "tdp": cfg.cpu,
        "ram": cfg.ram,
        "fake": cfg.fake,
        "nvml": cfg.nvml,
        "amdsmi": cfg.amdsmi,
        "powermetrics": cfg.powermetrics,
    }
    paths = Paths(sysfs=cfg.paths.sysfs, procfs=cfg.paths.procfs, cgroupfs=cfg.paths.cgroupfs)
    return BackendOptions(paths=paths, clock=clock, section=sections.get(name))


@dataclass
class SensorSet:
    started: list[Sensor] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # name -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # name -> the sensors that already cover its classes


async def start_sensors(cfg: Config, clock: Clock = time.monotonic) -> SensorSet:
    """Try the configured backends in order; ``cpu`` and ``dram`` go to the first that works."""
    result = SensorSet()
    covered: dict[DeviceClass, str] = {}
    for name in cfg.sensors:
        classes = backends.CLASSES[name]
        exclusive = classes & backends.EXCLUSIVE
        if exclusive and classes <= backends.EXCLUSIVE and all(c in covered for c in exclusive):
            result.skipped[name] = ", ".join(sorted({covered[c] for c in exclusive}))
            continue
        try:
            sensor = backends.load(name)(backend_options(name, cfg, clock))
            await sensor.start()
        except SensorUnavailable as exc:
            result.unavailable[name] = exc.reason
            continue
        except ImportError as exc:
            result.unavailable[name] = f"backend not installed: {exc}"
            continue
        except Exception as exc:  # a backend bug must not take the daemon down: report it like unavailability
            result.unavailable[name] = f"failed to start: {type(exc).__name__}: {exc}"
            continue
        result.started.append(sensor)
        for c in sensor.covers:
            covered.setdefault(c, name)
    return result


def explain(sensors: SensorSet) -> list[str]:
    """One line per backend not in use, with its reason (Kepler's errors.Join, in words)."""
    lines = [f"{name}: {reason}" for name, reason in sensors.unavailable.items()]
    lines += [f"{name}: not needed, covered by {by}" for name, by in sensors.skipped.items()]
    return lines


async def close_sensors(sensors: Sequence[Sensor]) -> None:
    for sensor in sensors:
        try:
            await sensor.close()
        except Exception as exc:  # closing is best effort; say so
            log.warning("sensor_close_failed", sensor=sensor.name, error=f"{type(exc).__name__}: {exc}")


async def build_intensity(cfg: Config, persist: bool = True) -> ManagedIntensity:
    """The intensity source of ``cfg.intensity`` (not started); ``persist`` keeps its cache under state_dir."""
    return await build_source(cfg.intensity, cfg.resolved_state_dir() if persist else None)


def build_embodied(cfg: Config, zone: str, persistence: Persistence | None) -> Embodied | None:
    if not cfg.embodied.enabled:
        return None
    kg, how = server_kg(cfg.embodied, zone, cfg.paths.sysfs, cfg.paths.procfs)
    log.info("embodied_server", kg=round(kg, 1), source=how, lifetime_years=cfg.embodied.lifetime_years)
    restored = persistence.restored.embodied_g_total if persistence and persistence.restored else None
    return Embodied(cfg.embodied, kg, restored)


async def build_monitor(cfg: Config) -> tuple[Monitor, list[Sensor]] | None:
    """Start the sensors and the monitor a config asks for; None (logged) when no sensor works."""
    sensors = await start_sensors(cfg)
    for name, reason in sensors.unavailable.items():
        log.info("sensor_unavailable", sensor=name, reason=reason)
    if not sensors.started:
        log.error("no_sensor_available", reasons=explain(sensors))
        return None
    covered = {c for s in sensors.started for c in s.covers}
    for missing in sorted(backends.EXCLUSIVE - covered):
        log.warning("device_class_unmeasured", device_class=missing, reasons=explain(sensors))
    log.info("sensors_started", sensors=[s.name for s in sensors.started], covers=sorted(covered))
    attributor = None
    if cfg.attribution.enabled:
        candidate = Attributor(
            cfg.paths.cgroupfs,
            cfg.paths.procfs,
            max_cgroups=cfg.attribution.max_cgroups,
            retention_s=cfg.attribution.retention_secs,
            pods=_pod_directory(cfg),
        )
        if candidate.reader.available:
            attributor = candidate
        else:
            log.info("attribution_unavailable", reason=f"no readable cgroup CPU hierarchy under {cfg.paths.cgroupfs}")
    persistence = Persistence(
        StateStore(cfg.resolved_state_dir()),
        host=cfg.resolved_host(),
        boot_id=read_boot_id(cfg.paths.procfs),
        max_power_w=cfg.rapl.max_power_w,
    )
    intensity = await build_intensity(cfg)
    log.info("intensity_source", zone=intensity.zone, providers=cfg.intensity.providers, signal=cfg.intensity.signal)
    monitor = Monitor(
        sensors.started,
        host=cfg.resolved_host(),
        interval_s=cfg.measure_power_secs,
        pue=cfg.pue,
        intensity=intensity,
        sensor_timeout_s=cfg.sensor_timeout(),
        persistence=persistence,
        attributor=attributor,
        embodied=build_embodied(cfg, intensity.zone, persistence),
    )
    return monitor, sensors.started


def _pod_directory(cfg: Config) -> PodDirectory | None:
    k = cfg.attribution.kubernetes
    if not k.enabled:
        return None
    node = k.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    ep = endpoint(
        k.source,
        node,
        api_url=k.api_url,
        kubelet_url=k.kubelet_url,
        token_file=k.token_file,
        ca_file=k.ca_file,
        insecure_skip_tls_verify=k.insecure_skip_tls_verify,
    )
    log.info("pod_names_enabled", source=k.source, url=ep.url, refresh_s=k.refresh_secs)
    return PodDirectory(ep, refresh_s=k.refresh_secs)


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

    A reload validates the new file first: an invalid one is logged and the running config kept. A valid one
    restarts the measurement pipeline in place (counters continue through the state file); the listener stays.
    """
    stop = stop or asyncio.Event()
    cycle = asyncio.Event()  # ends the current pipeline: on stop, or on a valid reload
    pending: list[Config] = []
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        new = _reloaded(config_path, cfg)
        if new is not None:
            pending.append(new)
            cycle.set()

    def on_stop() -> None:
        stop.set()
        cycle.set()

    for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
    relay = asyncio.create_task(_relay(stop, cycle))
    built = await build_monitor(cfg)
    if built is None:
        relay.cancel()
        return 1
    current = [built]
    served: list[Snapshot | None] = [None]

    def latest() -> Snapshot | None:
        """The running monitor's snapshot; across a reload, the old one until the new monitor has published."""
        snap = current[0][0].latest()
        if snap is not None:
            served[0] = snap
        return served[0]

    host, port = split_listen_address(cfg.listen_address)
    web = web or WebConfig()
    try:
        tls = ssl_context(web.tls_server_config) if web.tls_server_config else None
        server = await start_server(latest, host, port, tls, web.basic_auth_users)
    except OSError as exc:
        log.error("listen_failed", address=cfg.listen_address, error=str(exc))
        await close_sensors(built[1])
        relay.cancel()
        return 1
    log.info(
        "listening",
        address=cfg.listen_address,
        interval_s=cfg.measure_power_secs,
        tls=tls is not None,
        basic_auth=bool(web.basic_auth_users),
    )
    try:
        while True:
            monitor, sensors = current[0]
            try:
                await monitor.run(cycle)
            finally:
                await close_sensors(sensors)
            if stop.is_set() or not pending:
                break
            cfg = pending.pop()
            pending.clear()
            cycle.clear()
            rebuilt = await build_monitor(cfg)
            if rebuilt is None:
                log.error("reload_failed", reason="no sensor available with the new config; stopping")
                return 1
            current[0] = rebuilt
            log.info("reloaded", interval_s=cfg.measure_power_secs, sensors=[s.name for s in rebuilt[1]])
    finally:
        relay.cancel()
        await server.close()
        log.info("stopped")
    return 0


async def _relay(stop: asyncio.Event, cycle: asyncio.Event) -> None:
    await stop.wait()
    cycle.set()
