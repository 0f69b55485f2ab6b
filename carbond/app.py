"""The composition root: the only place that reads the whole config and wires the parts together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from carbond import sensors as backends
from carbond.config import Config, split_listen_address
from carbond.errors import SensorUnavailable
from carbond.exporter.server import make_app, start_server
from carbond.exporter.webconfig import WebConfig, ssl_context
from carbond.intensity import FixedIntensity, IntensitySource
from carbond.intensity.static import StaticProvider
from carbond.model import DeviceClass
from carbond.monitor import Monitor
from carbond.sensors.base import BackendOptions, Clock, Paths, Sensor
from carbond.state import Persistence, StateStore, read_boot_id

log = structlog.get_logger("carbond.app")


def backend_options(name: str, cfg: Config, clock: Clock = time.monotonic) -> BackendOptions:
    """Each backend gets the filesystem roots, the clock and only its own config section."""
    sections: dict[str, Any] = {"rapl": cfg.rapl, "tdp": cfg.cpu, "ram": cfg.ram, "fake": cfg.fake}
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


async def build_intensity(cfg: Config) -> IntensitySource:
    value = await StaticProvider(cfg.intensity.zone).current(cfg.intensity.zone)
    return FixedIntensity(value)


async def run(cfg: Config, stop: asyncio.Event | None = None, web: WebConfig | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); return the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    sensors = await start_sensors(cfg)
    for name, reason in sensors.unavailable.items():
        log.info("sensor_unavailable", sensor=name, reason=reason)
    if not sensors.started:
        log.error("no_sensor_available", reasons=explain(sensors))
        return 1
    covered = {c for s in sensors.started for c in s.covers}
    for missing in sorted(backends.EXCLUSIVE - covered):
        log.warning("device_class_unmeasured", device_class=missing, reasons=explain(sensors))
    log.info("sensors_started", sensors=[s.name for s in sensors.started], covers=sorted(covered))
    intensity = await build_intensity(cfg)
    monitor = Monitor(
        sensors.started,
        host=cfg.resolved_host(),
        interval_s=cfg.measure_power_secs,
        pue=cfg.pue,
        intensity=intensity,
        sensor_timeout_s=cfg.sensor_timeout(),
        persistence=Persistence(
            StateStore(cfg.resolved_state_dir()),
            host=cfg.resolved_host(),
            boot_id=read_boot_id(cfg.paths.procfs),
            max_power_w=cfg.rapl.max_power_w,
        ),
    )
    host, port = split_listen_address(cfg.listen_address)
    try:
        web = web or WebConfig()
        tls = ssl_context(web.tls_server_config) if web.tls_server_config else None
        runner = await start_server(make_app(monitor.latest, web.basic_auth_users), host, port, tls)
    except OSError as exc:
        log.error("listen_failed", address=cfg.listen_address, error=str(exc))
        await close_sensors(sensors.started)
        return 1
    log.info(
        "listening",
        address=cfg.listen_address,
        interval_s=cfg.measure_power_secs,
        tls=tls is not None,
        basic_auth=bool(web.basic_auth_users),
    )
    try:
        await monitor.run(stop)
    finally:
        await runner.cleanup()
        await close_sensors(sensors.started)
        log.info("stopped")
    return 0
