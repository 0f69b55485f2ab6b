"""``carbond probe``: every backend, available or the exact reason not, its devices and their power."""

from __future__ import annotations

import asyncio
import math
import time

from carbond import sensors as backends
from carbond.app import backend_options, close_sensors
from carbond.config import Config
from carbond.errors import SensorUnavailable
from carbond.model import Reading
from carbond.sensors.base import Sensor


async def _try(name: str, cfg: Config) -> tuple[Sensor | None, str]:
    try:
        sensor = backends.load(name)(backend_options(name, cfg, time.monotonic))
        await sensor.start()
    except SensorUnavailable as exc:
        return None, exc.reason
    except ImportError as exc:
        return None, f"backend not installed: {exc}"
    except Exception as exc:  # report a backend bug as a reason rather than crash the probe
        return None, f"failed to start: {type(exc).__name__}: {exc}"
    return sensor, ""


async def _sample(sensor: Sensor, seconds: float) -> tuple[list[tuple[Reading, float]], str]:
    try:
        first = {r.device: r for r in await sensor.read()}
        await asyncio.sleep(seconds)
        second = await sensor.read()
    except Exception as exc:  # shown in the table, not raised
        return [], f"read failed: {type(exc).__name__}: {exc}"
    rows = []
    for r in second:
        before = first.get(r.device)
        dt = r.at - before.at if before else 0.0
        rows.append((r, (r.joules - before.joules) / dt if before and dt > 0 else math.nan))
    return rows, ""


async def probe(cfg: Config, seconds: float = 1.0) -> str:
    names = [n for n in backends.BACKENDS if n != "fake" or "fake" in cfg.sensors]
    tried = await asyncio.gather(*(_try(n, cfg) for n in names))
    live = [(n, s) for n, (s, _) in zip(names, tried, strict=True) if s is not None]
    samples = await asyncio.gather(*(_sample(s, seconds) for _, s in live))
    by_name = dict(zip([n for n, _ in live], samples, strict=True))
    lines = [f"{'SENSOR':<13} {'STATUS':<11} {'DEVICE':<18} {'KIND':<5} {'POWER_W':>9}  NOTE"]
    for name, (sensor, reason) in zip(names, tried, strict=True):
        used = "in config" if name in cfg.sensors else "not in config"
        if sensor is None:
            lines.append(f"{name:<13} {'unavailable':<11} {'-':<18} {'-':<5} {'-':>9}  {reason}")
            continue
        rows, err = by_name[name]
        described = {d: f"{m} {u}" for d, m, u in getattr(sensor, "device_info", list)()}
        if err:
            lines.append(f"{name:<13} {'error':<11} {'-':<18} {'-':<5} {'-':>9}  {err}")
        for reading, watts in rows:
            note = "measured" if reading.measured else "model"
            if reading.device in described:
                note = f"{described[reading.device]}, {note}"
            if not reading.in_node_total:
                note += ", inside another domain"
            lines.append(
                f"{name:<13} {'available':<11} {reading.device:<18} {reading.kind:<5} {watts:>9.2f}  {note}; {used}"
            )
    await close_sensors([s for _, s in live])
    return "\n".join(lines)
