"""Intel/AMD RAPL energy counters through the powercap sysfs interface.

Zones are found under ``<sysfs>/class/powercap`` and ``<sysfs>/devices/virtual/powercap`` and de-duplicated by
real path (the class entries are symlinks into the devices tree). Only ``intel-rapl`` and ``intel-rapl-mmio``
control types count (AMD exposes its counters under the same names); an mmio zone that repeats an intel-rapl zone's
name (recent Intel client CPUs show package-0 twice) is dropped. Per-die zones of one package that report the same
counter (seen on AMD multi-die parts) are counted once.

``energy_uj`` counts microjoules and wraps to 0 at ``max_energy_range_uj``. A background task samples every zone at
``range / max_power_w / 2`` so that no wrap is ever missed, whatever the tick interval. A read that fails (EIO,
empty, non-numeric, above the range) or implies more than twice ``max_power_w`` gives no reading for that zone; the
next good sample's delta covers the gap, so there is never a spike. After three implausible samples in a row the
counter is taken to have been reset and re-baselined without counting energy.

Node total: psys when present (and ``use_psys``), else packages (or their dies) plus dram; core and uncore are
inside their package and never added.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import DeviceClass, Kind, Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Backend, BlockingCalls, Clock, Context, Settings

log = get_logger("carbond.sensors.rapl")

_ZONE_DIR = re.compile(r"^(intel-rapl(?:-mmio)?):(\d+(?::\d+)*)$")
_DIE = re.compile(r"^package-(\d+)-die-(\d+)$")
PERMISSION_HELP = (
    "{path} is readable only by root (mode 0400 since CVE-2020-8694). Grant read access to carbond's group "
    "only, not to everyone: run carbond under the shipped systemd unit (it grants its group read access at "
    "start), or add a udev rule such as "
    'SUBSYSTEM=="powercap", ACTION=="add", RUN+="/bin/chgrp carbond /sys%p/energy_uj", '
    'RUN+="/bin/chmod g+r /sys%p/energy_uj" '
    "or a systemd-tmpfiles line 'z /sys/class/powercap/intel-rapl:*/energy_uj 0440 root carbond'. "
    "Falling back to the models."
)


#: The most a node can plausibly draw: a counter step implying more is rejected (and downtime energy capped).
MAX_POWER_W = 1000.0


class RaplSettings(Settings):
    """The ``rapl`` config section."""

    use_psys: bool = True
    max_power_w: Annotated[float, Field(gt=0, le=100_000)] = MAX_POWER_W


def read_text(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read()


@dataclass(slots=True)
class Zone:
    path: Path
    device: str
    kind: Kind
    in_node_total: bool
    range_uj: int | None
    last_raw: int | None = None
    last_at: float = 0.0
    total_uj: int = 0
    rejected: int = 0
    warned: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Found:
    path: Path
    control: str
    ident: str
    name: str


def _discover(sysfs: Path, read_file: Callable[[Path], str]) -> list[_Found]:
    seen: set[str] = set()
    found: list[_Found] = []

    def visit(d: Path) -> None:
        m = _ZONE_DIR.match(d.name)
        if not m:
            return
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            name = read_file(d / "name").strip()
        except OSError:
            return
        if (d / "energy_uj").exists():
            found.append(_Found(Path(real), m.group(1), m.group(2), name))
        with contextlib.suppress(OSError):
            for child in sorted(d.iterdir()):
                if child.is_dir():
                    visit(child)

    for root in (sysfs / "class/powercap", sysfs / "devices/virtual/powercap"):
        with contextlib.suppress(OSError):
            for entry in sorted(root.iterdir()):
                if entry.name in ("intel-rapl", "intel-rapl-mmio"):  # control-type directories
                    with contextlib.suppress(OSError):
                        for sub in sorted(entry.iterdir()):
                            visit(sub)
                else:
                    visit(entry)
    return found


def _device(f: _Found, by_ident: dict[tuple[str, str], _Found]) -> tuple[str, Kind] | None:
    name = f.name
    if name.startswith("package-") or _DIE.match(name):
        return name, "cpu"
    if name == "psys":
        return "psys", "psys"
    parent = by_ident.get((f.control, f.ident.rpartition(":")[0])) if ":" in f.ident else None
    index = parent.name.removeprefix("package-") if parent and parent.name.startswith("package-") else f.ident
    if name == "core":
        return f"core-{index}", "core"
    if name == "uncore":
        return f"uncore-{index}", "uncore"
    if name == "dram":
        return f"dram-{index}", "dram"
    return None


class RaplSensor:
    name = "rapl"
    inline = False

    def __init__(
        self,
        sysfs: Path,
        clock: Clock,
        *,
        use_psys: bool = True,
        max_power_w: float = MAX_POWER_W,
        read_file: Callable[[Path], str] = read_text,
    ) -> None:
        self._sysfs = sysfs
        self._clock = clock
        self._use_psys = use_psys
        self._max_power_w = max_power_w
        self._read_file = read_file
        self._zones: list[Zone] = []
        self._lock = asyncio.Lock()
        self._blocking = BlockingCalls("powercap")
        self._poller: asyncio.Task[None] | None = None
        self._poll_s = 60.0
        self._last_sample = 0.0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        kinds = {z.kind for z in self._zones}
        if not kinds:
            return frozenset()
        return frozenset({"cpu", "dram"}) if kinds & {"dram", "psys"} else frozenset({"cpu"})

    @property
    def poll_interval_s(self) -> float:
        return self._poll_s

    def _read_uj(self, path: Path) -> int:
        text = self._read_file(path).strip()
        if not text.isdigit():
            raise ValueError(f"not a counter: {text[:20]!r}")
        return int(text)

    async def start(self) -> None:
        found = await asyncio.to_thread(_discover, self._sysfs, self._read_file)
        if not found:
            raise SensorUnavailable("rapl", f"no powercap RAPL zones under {self._sysfs}")
        names = {f.name for f in found if f.control == "intel-rapl"}
        found = [f for f in found if f.control == "intel-rapl" or f.name not in names]
        by_ident = {(f.control, f.ident): f for f in found}
        zones: list[Zone] = []
        for f in found:
            dev = _device(f, by_ident)
            if dev is None:
                continue
            try:
                self._read_uj(f.path / "energy_uj")
            except PermissionError:
                raise SensorUnavailable("rapl", PERMISSION_HELP.format(path=f.path / "energy_uj")) from None
            except (OSError, ValueError):
                pass  # a transient failure at start: the zone is still used
            try:
                range_uj: int | None = self._read_uj(f.path / "max_energy_range_uj")
            except (OSError, ValueError):
                range_uj = None
                log.warning("rapl_range_unreadable", zone=dev[0], path=str(f.path))
            zones.append(Zone(f.path, dev[0], dev[1], False, range_uj))
        if not any(z.kind in ("cpu", "dram", "psys") for z in zones):  # core, uncore alone add nothing up
            raise SensorUnavailable("rapl", f"no package, dram or psys zone under {self._sysfs}")
        zones = await self._drop_mirrored_dies(zones)
        has_psys = self._use_psys and any(z.kind == "psys" for z in zones)
        for z in zones:
            z.in_node_total = z.kind == "psys" if has_psys else z.kind == "dram" or z.device.startswith("package-")
        self._zones = zones
        ranges = [z.range_uj / 1e6 for z in zones if z.range_uj]
        self._poll_s = max(0.05, min(ranges) / self._max_power_w / 2) if ranges else 1.0
        await self._sample()
        self._poller = asyncio.create_task(self._poll(), name="rapl-wrap-poller")

    async def _drop_mirrored_dies(self, zones: list[Zone]) -> list[Zone]:
        dies: dict[str, list[Zone]] = {}
        for z in zones:
            m = _DIE.match(z.device)
            if m:
                dies.setdefault(m.group(1), []).append(z)
        drop: set[str] = set()
        for package, group in dies.items():
            if len(group) < 2:
                continue
            for attempt in range(3):
                values = []
                for z in group:
                    with contextlib.suppress(OSError, ValueError):
                        values.append(self._read_uj(z.path / "energy_uj"))
                if len(values) == len(group) and len(set(values)) == 1:
                    keep = min(group, key=lambda z: int(_DIE.match(z.device).group(2)))  # type: ignore[union-attr]
                    drop |= {z.device for z in group if z is not keep}
                    log.info("rapl_mirrored_dies", package=package, kept=keep.device, dropped=sorted(drop))
                    break
                if attempt < 2:
                    await asyncio.sleep(0.02)
        return [z for z in zones if z.device not in drop]

    def _sample_sync(self) -> list[Reading]:
        out: list[Reading] = []
        for z in self._zones:
            try:
                raw = self._read_uj(z.path / "energy_uj")
                at = self._clock()
            except (OSError, ValueError) as exc:
                self._warn_once(z, "read", f"{type(exc).__name__}: {exc}")
                continue
            if self._fold(z, raw, at):
                out.append(
                    Reading(
                        z.device,
                        z.kind,
                        z.total_uj / 1e6,
                        z.last_at,
                        measured=True,
                        in_node_total=z.in_node_total,
                        raw_j=raw / 1e6,
                        range_j=z.range_uj / 1e6 if z.range_uj else None,
                    )
                )
        return out

    def _fold(self, z: Zone, raw: int, at: float) -> bool:
        """Fold one raw value into the zone; False when this sample gives no reading."""
        if z.range_uj is not None and raw > z.range_uj:
            self._warn_once(z, "range", f"value {raw} above max_energy_range_uj {z.range_uj}")
            return False
        if z.last_raw is None:
            z.last_raw, z.last_at = raw, at
            return True
        delta = raw - z.last_raw
        if delta < 0:
            if z.range_uj is None:
                self._warn_once(z, "wrap", "counter went back and its range is unknown: interval skipped")
                z.last_raw, z.last_at = raw, at
                return False
            delta += z.range_uj
        elapsed = at - z.last_at
        if delta > 2 * self._max_power_w * max(elapsed, 1e-3) * 1e6:
            z.rejected += 1
            if z.rejected < 3:
                self._warn_once(z, "implausible", f"{delta / 1e6:.0f} J in {elapsed:.3f} s rejected")
                return False
            log.warning("rapl_counter_rebaselined", zone=z.device, raw=raw)
            z.last_raw, z.last_at, z.rejected = raw, at, 0
            return False
        z.rejected = 0
        z.total_uj += delta
        z.last_raw, z.last_at = raw, at
        if z.warned:
            log.info("rapl_zone_recovered", zone=z.device)
            z.warned.clear()
        return True

    def _warn_once(self, z: Zone, what: str, detail: str) -> None:
        if what not in z.warned:
            z.warned.add(what)
            log.warning("rapl_read_rejected", zone=z.device, problem=what, detail=detail)

    async def _sample(self) -> list[Reading]:
        async with self._lock:
            readings = await self._blocking(self._sample_sync)
            self._last_sample = self._clock()
            return readings

    async def _poll(self) -> None:
        while True:
            due = self._last_sample + self._poll_s - self._clock()
            if due > 0:
                await asyncio.sleep(due)
                continue
            try:
                await self._sample()
            except SensorReadError:  # blocked: the tick reports it; poll again later
                self._last_sample = self._clock()

    async def read(self, host: HostSample) -> SensorRead:
        readings = await self._sample()
        if not readings:
            raise SensorReadError("no RAPL zone could be read")
        return SensorRead(tuple(readings))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None


def create(settings: RaplSettings, ctx: Context) -> RaplSensor:
    return RaplSensor(ctx.paths.sysfs, ctx.clock, use_psys=settings.use_psys, max_power_w=settings.max_power_w)


BACKEND = Backend(frozenset({"cpu", "dram"}), RaplSettings, create)
