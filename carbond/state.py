"""Restart-safe counters: per-device totals and raw hardware counters persisted under ``state_dir``.

Written atomically (temp file, fsync, rename, fsync of the directory) after every tick. After a restart the
exported counters continue from the saved totals, so Prometheus sees no reset. When the boot is the same
(``/proc/sys/kernel/random/boot_id``) and a device reports its raw hardware counter, the energy used while carbond
was down is added too, provided the downtime was short enough that the counter cannot have wrapped more than once.
A corrupted, truncated or foreign file is logged and ignored, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("carbond.state")

FORMAT = "carbond-state/1"


@dataclass(slots=True)
class DeviceTotals:
    energy_j_total: float
    emissions_g_total: float
    raw_j: float | None = None  # the hardware counter at the last reading, where the sensor reports it
    range_j: float | None = None  # the counter's wrap range


@dataclass(slots=True)
class SavedState:
    host: str
    boot_id: str
    saved_wall: float
    node_energy_j_total: float = 0.0
    node_emissions_g_total: float = 0.0
    devices: dict[str, DeviceTotals] = field(default_factory=dict)


def read_boot_id(procfs: Path) -> str:
    try:
        return (procfs / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} is not a finite non-negative number")
    return float(value)


def _optional(value: Any, name: str) -> float | None:
    return None if value is None else _finite(value, name)


def decode(data: Any, host: str) -> SavedState:
    """Validate a parsed state document; ValueError says what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a carbond state file of this version")
    if data.get("host") != host:
        raise ValueError(f"written for host {data.get('host')!r}, not {host!r}")
    devices_raw = data.get("devices")
    if not isinstance(devices_raw, dict):
        raise ValueError("devices is not a mapping")
    devices = {}
    for key, d in devices_raw.items():
        if not isinstance(key, str) or not isinstance(d, dict):
            raise ValueError("malformed device entry")
        devices[key] = DeviceTotals(
            _finite(d.get("energy_j_total"), f"{key}.energy_j_total"),
            _finite(d.get("emissions_g_total"), f"{key}.emissions_g_total"),
            _optional(d.get("raw_j"), f"{key}.raw_j"),
            _optional(d.get("range_j"), f"{key}.range_j"),
        )
    boot_id = data.get("boot_id")
    if not isinstance(boot_id, str):
        raise ValueError("boot_id is not a string")
    return SavedState(
        host=host,
        boot_id=boot_id,
        saved_wall=_finite(data.get("saved_wall"), "saved_wall"),
        node_energy_j_total=_finite(data.get("node_energy_j_total"), "node_energy_j_total"),
        node_emissions_g_total=_finite(data.get("node_emissions_g_total"), "node_emissions_g_total"),
        devices=devices,
    )


class StateStore:
    """Loads and saves :class:`SavedState` at ``state_dir/counters.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "counters.json"

    def load(self, host: str) -> SavedState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        try:
            return decode(json.loads(text), host)
        except (ValueError, RecursionError) as exc:
            log.warning("state_ignored", path=str(self.path), reason=str(exc))
            return None

    def save(self, state: SavedState) -> None:
        """Atomic replace; raises OSError (the caller counts it and goes on measuring)."""
        doc = {"format": FORMAT, **asdict(state)}
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".counters.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def downtime_joules(
    saved: DeviceTotals, raw_j: float | None, range_j: float | None, downtime_s: float, max_power_w: float
) -> float | None:
    """Energy the hardware counter recorded while carbond was down, or None when it cannot be known exactly.

    Known only if the counter's range is known and the downtime is too short for two wraps at ``max_power_w``.
    """
    if saved.raw_j is None or raw_j is None or range_j is None or range_j <= 0 or downtime_s < 0:
        return None
    if downtime_s * max_power_w >= range_j:
        return None
    delta = raw_j - saved.raw_j
    if delta < 0:
        delta += range_j
    return delta


class Persistence:
    """What the monitor uses: restored totals for devices it meets again, and a save after every tick."""

    def __init__(self, store: StateStore, host: str, boot_id: str, max_power_w: float = 1000.0) -> None:
        self._store = store
        self._host = host
        self._boot_id = boot_id
        self._max_power_w = max_power_w
        self.restored = store.load(host)
        self.errors_total = 0
        self._failing = False
        if self.restored is not None:
            log.info("state_restored", devices=len(self.restored.devices), same_boot=self.same_boot)

    @property
    def same_boot(self) -> bool:
        return self.restored is not None and bool(self._boot_id) and self.restored.boot_id == self._boot_id

    def node_totals(self) -> tuple[float, float]:
        r = self.restored
        return (r.node_energy_j_total, r.node_emissions_g_total) if r else (0.0, 0.0)

    def device(
        self, key: str, raw_j: float | None, range_j: float | None, now_wall: float
    ) -> tuple[float, float, float]:
        """(energy total, emissions total, energy used while down) for a device seen for the first time."""
        saved = self.restored.devices.get(key) if self.restored else None
        if saved is None or self.restored is None:
            return 0.0, 0.0, 0.0
        gap = 0.0
        if self.same_boot:
            down = downtime_joules(saved, raw_j, range_j, now_wall - self.restored.saved_wall, self._max_power_w)
            if down is None and saved.raw_j is not None:
                log.warning("downtime_energy_unknown", device=key)
            gap = down or 0.0
        return saved.energy_j_total, saved.emissions_g_total, gap

    def save(self, state: SavedState) -> None:
        try:
            self._store.save(state)
        except OSError as exc:
            self.errors_total += 1
            if not self._failing:
                log.warning("state_persist_failed", path=str(self._store.path), error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("state_persist_recovered", path=str(self._store.path))
        self._failing = False

    def new_state(self, saved_wall: float) -> SavedState:
        return SavedState(host=self._host, boot_id=self._boot_id, saved_wall=saved_wall)
