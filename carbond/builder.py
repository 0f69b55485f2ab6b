"""The one wiring of sensors, intensity and accounting, for the daemon, ``carbond measure``/``track`` and ``probe``.

Part of the composition root (with :mod:`carbond.app`): it reads the whole config and hands each part only its
own section. Everything it opens is registered on the caller's :class:`contextlib.AsyncExitStack`, so closing the
stack closes the sensors, the intensity source, the attributor, the pod-name refresh and the state file, in the
reverse order of opening. A reload closes one stack and builds on a new one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

from carbond import sensors as backends
from carbond.attribution.attributor import Attributor
from carbond.attribution.kubernetes import PodDirectory, endpoint, running
from carbond.attribution.labels import LabelPolicy
from carbond.config import Config
from carbond.embodied import Embodied, log_plan, plan, resolved_cloud
from carbond.errors import SensorUnavailable
from carbond.intensity import ManagedIntensity
from carbond.intensity.build import build_source
from carbond.logs import get_logger
from carbond.model import DeviceClass
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.base import Clock, Context, Paths, Sensor
from carbond.sensors.rapl import MAX_POWER_W, RaplSettings
from carbond.slurm.spool import SlurmSpool
from carbond.state import Persistence, StateStore, read_boot_id
from carbond.wallfit import WallCalibration

log = get_logger("carbond.builder")


class NoSensor(Exception):
    """No configured sensor could start; ``reasons`` has one line per backend."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("no sensor available (" + "; ".join(reasons) + ")")
        self.reasons = reasons


@dataclass
class SensorSet:
    started: list[Sensor] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # name -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # name -> the sensors that already cover its classes

    def explain(self) -> list[str]:
        """One line per backend not in use, with its reason (Kepler's errors.Join, in words)."""
        lines = [f"{name}: {reason}" for name, reason in self.unavailable.items()]
        return lines + [f"{name}: not needed, covered by {by}" for name, by in self.skipped.items()]

    def explain_for(self, device_class: str) -> list[str]:
        """:meth:`explain` of the backends that could have measured ``device_class`` (never NVML's for dram)."""

        def could(name: str) -> bool:
            try:
                return device_class in backends.load(name).classes
            except ImportError:
                return True

        return [line for line in self.explain() if could(line.partition(":")[0])]


def context(cfg: Config, clock: Clock = time.monotonic) -> Context:
    p = cfg.paths
    e = cfg.embodied
    cloud = resolved_cloud(e, cfg.intensity.zone, p.sysfs, p.procfs)
    instance = (cloud, e.instance_type) if cloud and e.instance_type else None
    return Context(Paths(sysfs=p.sysfs, procfs=p.procfs, cgroupfs=p.cgroupfs), clock, instance)


async def open_sensor(
    name: str, cfg: Config, stack: contextlib.AsyncExitStack, clock: Clock = time.monotonic
) -> Sensor | str:
    """Start backend ``name`` with its own config section; the sensor (closed with the stack) or why not."""
    try:
        sensor = backends.load(name).build(cfg.backend_settings(name), context(cfg, clock))
        await sensor.start()
    except SensorUnavailable as exc:
        return exc.reason
    except ImportError as exc:
        return f"backend not installed: {exc}"
    except Exception as exc:  # noqa: BLE001 - a backend bug must not take the daemon down: report it like unavailability
        return f"failed to start: {type(exc).__name__}: {exc}"
    stack.push_async_callback(_close, sensor)
    return sensor


async def _close(sensor: Sensor) -> None:
    try:
        await sensor.close()
    except Exception as exc:  # noqa: BLE001 - closing is best effort; say so
        log.warning("sensor_close_failed", sensor=sensor.name, error=f"{type(exc).__name__}: {exc}")


async def start_sensors(cfg: Config, stack: contextlib.AsyncExitStack, clock: Clock = time.monotonic) -> SensorSet:
    """Try the configured backends in order; ``cpu`` and ``dram`` go to the first that works."""
    result = SensorSet()
    covered: dict[DeviceClass, str] = {}
    for name in cfg.sensors:
        classes = backends.load(name).classes
        exclusive = classes & backends.EXCLUSIVE
        if exclusive and classes <= backends.EXCLUSIVE and all(c in covered for c in exclusive):
            result.skipped[name] = ", ".join(sorted({covered[c] for c in exclusive}))
            continue
        opened = await open_sensor(name, cfg, stack, clock)
        if isinstance(opened, str):
            result.unavailable[name] = opened
            continue
        result.started.append(opened)
        for c in opened.covers:
            covered.setdefault(c, name)
    return result


async def open_intensity(cfg: Config, stack: contextlib.AsyncExitStack, persist: bool = True) -> ManagedIntensity:
    """The intensity source of ``cfg.intensity``, refreshing in the background until the stack closes."""
    source = await build_source(cfg.intensity, cfg.resolved_state_dir() if persist else None)
    await source.start()
    stack.push_async_callback(source.close)
    return source


async def build_monitor(
    cfg: Config,
    stack: contextlib.AsyncExitStack,
    *,
    daemon: bool = True,
    interval_s: float | None = None,
    clock: Clock = time.monotonic,
) -> tuple[Monitor, SensorSet]:
    """The monitor a config asks for, its parts open on ``stack``; NoSensor when no sensor works.

    ``daemon``: with the state file, cgroup attribution and embodied emissions (a job measures without them).
    """
    sensors = await start_sensors(cfg, stack, clock)
    covered = {c for s in sensors.started for c in s.covers}
    failed = configured_down(cfg, sensors, covered)
    for name, reason in sensors.unavailable.items():
        (log.warning if name in failed else log.info)("sensor_unavailable", sensor=name, reason=reason)
    if not sensors.started:
        raise NoSensor(sensors.explain())
    if daemon:
        for advice in cfg.advisories():
            log.warning("config_advice", advice=advice)
        for missing in sorted(backends.EXCLUSIVE - covered - {"platform"}):  # a wall meter is optional
            log.warning("device_class_unmeasured", device_class=missing, reasons=sensors.explain_for(missing))
        # the kinds the devices report: memory modelled by the ram backend is "ram", measured memory "dram"
        kinds = {"ram" if c == "dram" and s.name == "ram" else c for s in sensors.started for c in s.covers}
        log.info("sensors_started", sensors=[s.name for s in sensors.started], covers=sorted(kinds))
    host_reader = HostReader(cfg.paths.procfs)
    stack.callback(host_reader.close)
    intensity = await open_intensity(cfg, stack, persist=daemon)
    persistence = attributor = embodied = None
    if daemon:
        log.info(
            "intensity_source", zone=intensity.zone, providers=cfg.intensity.providers, signal=cfg.intensity.signal
        )
        persistence = _persistence(cfg, stack)
        attributor = await _attributor(cfg, stack)
        embodied = build_embodied(cfg, intensity.zone, persistence)
    monitor = Monitor(
        sensors.started,
        host=cfg.resolved_host(),
        interval_s=interval_s or cfg.measure_power_secs,
        pue=cfg.pue,
        pue_u=cfg.pue_uncertainty,
        intensity=intensity,
        sensor_timeout_s=cfg.sensor_timeout(),
        host_reader=host_reader,
        clock=clock,
        persistence=persistence,
        attributor=attributor,
        embodied=embodied,
        unavailable=failed if daemon else {},
        calibration=_calibration(cfg, sensors, daemon),
    )
    return monitor, sensors


def _calibration(cfg: Config, sensors: SensorSet, daemon: bool) -> WallCalibration | None:
    """The wall calibration of the platform sensor in use, persisted in state_dir by the daemon; None without one."""
    wall = next((s.name for s in sensors.started if "platform" in s.covers), None)
    if wall is None:
        return None
    return WallCalibration(wall, cfg.resolved_state_dir() if daemon else None)


def configured_down(cfg: Config, sensors: SensorSet, covered: set[DeviceClass]) -> dict[str, str]:
    """Sensors the config names (``sensors:`` set explicitly) that could not start and whose device classes no
    other sensor covers: exported as down (``carbond_sensor_up 0``, so ``CarbondSensorDown`` fires) and logged at
    warning. A failed sensor whose classes a later one covers (rapl before the tdp model on a VM) is a fallback at
    work, and auto-detected sensors (the default list) that are absent stay quiet. GPU sensors are the exception:
    each vendor's (nvml, amdsmi, powermetrics) reads its own devices, so one that works never covers another that
    failed (a broken NVIDIA driver beside a working AMD GPU is down, not covered)."""
    if "sensors" not in cfg.model_fields_set:
        return {}
    return {
        name: reason
        for name, reason in sensors.unavailable.items()
        if "gpu" in (classes := backends.load(name).classes) or not classes <= covered
    }


def _persistence(cfg: Config, stack: contextlib.AsyncExitStack) -> Persistence:
    rapl = cfg.backend_settings("rapl")
    persistence = Persistence(
        StateStore(cfg.resolved_state_dir()),
        host=cfg.resolved_host(),
        boot_id=read_boot_id(cfg.paths.procfs),
        max_power_w=rapl.max_power_w if isinstance(rapl, RaplSettings) else MAX_POWER_W,
    )
    stack.callback(persistence.close)
    return persistence


async def _attributor(cfg: Config, stack: contextlib.AsyncExitStack) -> Attributor | None:
    if not cfg.attribution.enabled:
        return None
    candidate = Attributor(
        cfg.paths.cgroupfs,
        cfg.paths.procfs,
        max_cgroups=cfg.attribution.max_cgroups,
        retention_s=cfg.attribution.retention_secs,
        pods=_pod_directory(cfg),
        granularity=cfg.attribution.granularity,
        policy=_label_policy(cfg),
        slurm=SlurmSpool(cfg.attribution.slurm.spool_dir) if cfg.attribution.slurm.enabled else None,
    )
    if not candidate.reader.available:
        log.info("attribution_unavailable", reason=f"no readable cgroup CPU hierarchy under {cfg.paths.cgroupfs}")
        return None
    stack.callback(candidate.close)  # its kept cgroup descriptors
    await stack.enter_async_context(running(candidate.pods))
    return candidate


def build_embodied(cfg: Config, zone: str, persistence: Persistence | None) -> Embodied | None:
    if not cfg.embodied.enabled:
        return None
    settings = cfg.embodied
    p = cfg.paths
    found = plan(settings, zone, p.sysfs, p.procfs, p.cgroupfs)  # the one rule, shared with measure/track
    log_plan(found, settings)
    settings, kg = settings.model_copy(update={"share": found.share}), found.kg
    restored = persistence.restored.embodied_g_total if persistence and persistence.restored else None
    return Embodied(settings, kg, restored)


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
    return PodDirectory(ep, refresh_s=k.refresh_secs, policy=_label_policy(cfg))


def _label_policy(cfg: Config) -> LabelPolicy:
    slurm = cfg.attribution.slurm
    return LabelPolicy.of(cfg.attribution.labels, cfg.attribution.units, slurm.labels if slurm.enabled else None)
