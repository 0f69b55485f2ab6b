"""A run's figures beside its energy: machine utilisation (CodeCarbon's columns), embodied emissions, the
intensity in force, energy by device kind."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from carbond.config import Config
from carbond.job import embodied
from carbond.job.cgroup import MachineUsage, read_machine
from carbond.job.ledger import Checkpoint
from carbond.procfs import mem_total_bytes

ATTRIBUTED = ("cgroup", "systemd", "proctree")


def scope_of(method: str) -> str:
    """``job`` when the figures are the job's share (an attribution method), else ``machine``."""
    return "job" if method in ATTRIBUTED else "machine"


def machine_usage(procfs: Path) -> MachineUsage | None:
    try:
        return read_machine(procfs)
    except (OSError, ValueError, IndexError):
        return None


def utilization(procfs: Path, u0: MachineUsage | None) -> dict[str, float]:
    """Mean machine CPU busy %, memory in use (% and GiB) since ``u0``, as CodeCarbon's columns give them."""
    u1 = machine_usage(procfs)
    if u0 is None or u1 is None:
        return {}
    out: dict[str, float] = {}
    if u1.total_usec > u0.total_usec:
        out["cpu_percent"] = round(100.0 * (u1.busy_usec - u0.busy_usec) / (u1.total_usec - u0.total_usec), 2)
    used = (u0.mem_used_bytes + u1.mem_used_bytes) / 2
    out["ram_used_gib"] = round(used / 1024**3, 3)
    with contextlib.suppress(OSError, ValueError):
        out["ram_percent"] = round(100.0 * used / mem_total_bytes((procfs / "meminfo").read_bytes()), 2)
    return out


def by_kind(cp: Checkpoint) -> dict[str, float]:
    """The job's joules by device kind, devices inside another (a core in its package) left out."""
    kinds: dict[str, float] = {}
    for d in cp.devices:
        if d.in_node_total:
            kinds[d.kind] = kinds.get(d.kind, 0.0) + d.energy_j
    return kinds


def intensity(cp: Checkpoint) -> dict[str, Any] | None:
    """The intensity in force at the checkpoint, as the report's JSON has it."""
    i = cp.intensity
    if i is None:
        return None
    return {
        "g_per_kwh": i.g_per_kwh,
        "zone": i.zone,
        "provider": i.provider,
        "age_s": cp.intensity_age_s if math.isfinite(cp.intensity_age_s) else None,  # JSON has no NaN
        "signal": i.signal,
        "factor_type": i.factor_type,
        "source": i.source,
        "year": i.year,
        "estimated": i.estimated,
    }


class Embodied:
    """The machine's embodied grams over a span: the daemon's counter, else this machine's rate x duration."""

    def __init__(self, gpus: frozenset[str] | None) -> None:
        self.cfg: Config | None = None  # set when the local sampler starts
        self.daemon: str | None = None  # the daemon whose counter is read, if one is
        self._gpus = gpus
        self._rate: tuple[tuple[str, ...], float, str] | None = None

    def over(self, cp: Checkpoint, duration_s: float) -> tuple[float, str]:
        if self.daemon:
            return cp.embodied_g, "the daemon's carbond_embodied_emissions_grams_total over the run"
        if self.cfg is None:
            return 0.0, ""
        gpus = tuple(m for d, m in cp.device_models if d.startswith("gpu") and (self._gpus is None or d in self._gpus))
        if self._rate is None or self._rate[0] != gpus:
            try:
                self._rate = (gpus, *embodied.rate(self.cfg, self.cfg.intensity.zone, gpus))
            except Exception as exc:  # noqa: BLE001 - an estimate must never break the report
                self._rate = (gpus, 0.0, f"not estimated: {type(exc).__name__}: {exc}")
        _, g_per_s, how = self._rate
        return g_per_s * duration_s, how
