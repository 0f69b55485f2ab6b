"""``carbond probe``: every backend, available or the exact reason not, its devices and their power (a platform
source: its last reading, its update period and how it was found)."""

from __future__ import annotations

import asyncio
import contextlib
import math

from carbond import sensors as backends
from carbond.builder import open_sensor
from carbond.config import Config
from carbond.model import Reading, SensorRead
from carbond.procfs import HostReader
from carbond.sensors.base import Sensor
from carbond.sensors.platform import PlatformSensor


async def _sample(
    sensor: Sensor, reader: HostReader, seconds: float
) -> tuple[list[tuple[Reading, float]], SensorRead, str]:
    try:
        first = {r.device: r for r in (await sensor.read(reader.sample())).readings}
        await asyncio.sleep(seconds)
        second = await sensor.read(reader.sample())
    except Exception as exc:  # noqa: BLE001 - shown in the table, not raised
        return [], SensorRead(()), f"read failed: {type(exc).__name__}: {exc}"
    rows = []
    for r in second.readings:
        before = first.get(r.device)
        dt = r.at - before.at if before else 0.0
        rows.append((r, (r.joules - before.joules) / dt if before and dt > 0 else math.nan))
    return rows, second, ""


async def probe(cfg: Config, seconds: float = 1.0) -> str:
    names = [n for n in backends.BACKENDS if n != "fake" or "fake" in cfg.sensors]
    async with contextlib.AsyncExitStack() as stack:
        reader = HostReader(cfg.paths.procfs)
        stack.callback(reader.close)
        tried = await asyncio.gather(*(open_sensor(n, cfg, stack) for n in names))
        live = [(n, s) for n, s in zip(names, tried, strict=True) if not isinstance(s, str)]
        samples = await asyncio.gather(*(_sample(s, reader, seconds) for _, s in live))
    by_name = dict(zip([n for n, _ in live], samples, strict=True))
    lines = [f"{'SENSOR':<13} {'STATUS':<11} {'DEVICE':<18} {'KIND':<5} {'POWER_W':>9}  NOTE"]
    for name, opened in zip(names, tried, strict=True):
        if "sensors" in cfg.model_fields_set:  # the config lists its sensors
            used = "in config" if name in cfg.sensors else "not in config"
        else:
            used = "a default sensor" if name in cfg.sensors else "not a default sensor"
        if isinstance(opened, str):
            lines.append(f"{name:<13} {'unavailable':<11} {'-':<18} {'-':<5} {'-':>9}  {opened}")
            continue
        rows, read, err = by_name[name]
        if isinstance(opened, PlatformSensor):  # a wall meter: its own reading, period and how it was found
            for device, watts, how in opened.describe():
                power = f"{watts:>9.2f}" if watts is not None else f"{'-':>9}"
                lines.append(f"{name:<13} {'available':<11} {device:<18} {'platform':<5} {power}  {how}; {used}")
            continue
        described = {
            i.device: " ".join(x for x in (i.model, i.uuid, f"[{i.method}: {i.detail}]" if i.detail else "") if x)
            for i in read.device_info
        }
        if err:
            lines.append(f"{name:<13} {'error':<11} {'-':<18} {'-':<5} {'-':>9}  {err}")
        for down in read.down:  # known but not readable (a lost GPU): its own line and reason
            lines.append(f"{name:<13} {'down':<11} {down.device:<18} {down.kind:<5} {'-':>9}  {down.reason}; {used}")
        for reading, watts in rows:
            note = "measured" if reading.measured else "model"
            if reading.device in described:
                note = f"{described[reading.device]}, {note}"
            if not reading.in_node_total:
                note += ", inside another domain"
            lines.append(
                f"{name:<13} {'available':<11} {reading.device:<18} {reading.kind:<5} {watts:>9.2f}  {note}; {used}"
            )
    return "\n".join(lines)
