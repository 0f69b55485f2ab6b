"""CPU power model for hosts without a readable energy counter (VMs, containers, non-root users).

Model: for each socket, ``P = TDP x f(u)`` where ``u`` is the socket's busy share over the interval from
``/proc/stat`` and ``f`` is piecewise linear through (0 %, 0.12), (10 %, 0.32), (50 %, 0.75), (100 %, 1.02): the
load profile Teads Engineering fitted on SPECpower_ssj2008 results ("Building an AWS EC2 Carbon Emissions
Dataset", 2021), also used by Boavizta. The 12 % idle floor is that fit's value at zero load.

- TDP per socket from ``cpu.tdp_watts``, else the CPU model (``cpu.model``, else ``/proc/cpuinfo`` "model name")
  looked up in the shipped table (:mod:`carbond.cpu_models`); unknown models use ``DEFAULT_TDP_W`` (65 W, the
  median TDP of the 4,899 parts in the table) with one warning naming the model.
- Sockets from the distinct "physical id" values of ``/proc/cpuinfo`` (1 when absent, as in many VMs); each socket
  gets the utilisation of its own CPUs when the per-CPU lines of ``/proc/stat`` can be mapped to it.
- ``/proc/stat`` counts USER_HZ jiffies. busy = user + nice + system + irq + softirq + steal; idle and iowait are
  not busy; guest and guest_nice are already inside user and nice, so they are not added again.
- The first read has no interval yet and reports zero energy; energy is integrated read to read on the monotonic
  clock, so it is cumulative and monotonic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from carbond.cpu_models import lookup_tdp
from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import DeviceClass, Reading
from carbond.procread import ProcFile, shared
from carbond.sensors.base import BackendOptions, Clock

log = structlog.get_logger("carbond.sensors.tdp")

DEFAULT_TDP_W = 65.0
LOAD_CURVE = ((0.0, 0.12), (0.10, 0.32), (0.50, 0.75), (1.00, 1.02))


def load_factor(u: float) -> float:
    """f(u) of the load curve, u clamped to [0, 1]."""
    u = min(max(u, 0.0), 1.0)
    for (u0, f0), (u1, f1) in itertools.pairwise(LOAD_CURVE):
        if u <= u1:
            return f0 + (f1 - f0) * (u - u0) / (u1 - u0)
    return LOAD_CURVE[-1][1]


def parse_cpuinfo(text: str) -> tuple[str, dict[int, int]]:
    """(first model name, {processor index: physical id})."""
    model, proc = "", None
    cpu_socket: dict[int, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            proc = int(value)
            cpu_socket.setdefault(proc, 0)
        elif key == "model name" and not model:
            model = value
        elif key == "physical id" and proc is not None and value.isdigit():
            cpu_socket[proc] = int(value)
    return model, cpu_socket


def parse_stat(text: str) -> dict[str, tuple[int, int]]:
    """{"cpu": (busy, total), "cpu0": ...} in jiffies."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            break
        parts = line.split()
        fields = [int(x) for x in parts[1:9]] + [0] * (8 - len(parts[1:9]))
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        busy = user + nice + system + irq + softirq + steal
        out[parts[0]] = (busy, busy + idle + iowait)
    if "cpu" not in out:
        raise ValueError("no aggregate cpu line")
    return out


class TdpSensor:
    name = "tdp"
    inline_read = True

    def __init__(self, procfs: Path, clock: Clock, *, tdp_watts: float | None = None, model: str | None = None):
        self._procfs = procfs
        self._clock = clock
        self._tdp_override = tdp_watts
        self._model_override = model
        self._sockets: dict[int, list[str]] = {}
        self.tdp_w = 0.0
        self.model = ""
        self._last: dict[str, tuple[int, int]] | None = None
        self._last_at = 0.0
        self._joules: dict[int, float] = {}
        self._started = False
        self._stat = ProcFile(procfs / "stat")

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"cpu"}) if self._started else frozenset()

    async def start(self) -> None:
        try:
            cpuinfo = (self._procfs / "cpuinfo").read_text(errors="replace")
            stat = parse_stat((self._procfs / "stat").read_text())
        except (OSError, ValueError) as exc:
            raise SensorUnavailable("tdp", f"cannot read {self._procfs}/cpuinfo and stat: {exc}") from None
        model, cpu_socket = parse_cpuinfo(cpuinfo)
        self.model = self._model_override or model
        sockets = sorted(set(cpu_socket.values())) or [0]
        per_cpu = all(f"cpu{p}" in stat for p in cpu_socket) and len(sockets) > 1
        self._sockets = {
            s: [f"cpu{p}" for p, sock in cpu_socket.items() if sock == s] if per_cpu else ["cpu"] for s in sockets
        }
        if self._tdp_override is not None:
            self.tdp_w = self._tdp_override
        else:
            found = lookup_tdp(self.model)
            if found is None:
                self.tdp_w = DEFAULT_TDP_W
                log.warning(
                    "cpu_model_unknown",
                    model=self.model,
                    default_tdp_w=DEFAULT_TDP_W,
                    hint="set cpu.tdp_watts in the config",
                )
            else:
                self.tdp_w = found[0]
        self._joules = dict.fromkeys(self._sockets, 0.0)
        # per-CPU lines only where sockets are told apart; else the aggregate line at the head is enough
        self._stat = shared(self._procfs / "stat", 4096 + 192 * len(stat) if per_cpu else 512)
        self._last, self._last_at = stat, self._clock()
        self._started = True

    def utilisation(self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], socket: int) -> float:
        busy = total = 0
        for cpu in self._sockets[socket]:
            b0, t0 = before.get(cpu, (0, 0))
            b1, t1 = after.get(cpu, (0, 0))
            busy, total = busy + max(b1 - b0, 0), total + max(t1 - t0, 0)
        return busy / total if total > 0 else 0.0

    async def read(self) -> Sequence[Reading]:
        try:
            raw = self._stat.read()  # procfs: never blocks on IO
            if len(raw) == self._stat.size:  # cut short: parse whole lines only
                raw = raw[: raw.rfind(b"\n") + 1]
            stat = parse_stat(raw.decode("ascii", "replace"))
        except (OSError, ValueError) as exc:
            raise SensorReadError(f"{self._procfs}/stat: {exc}") from exc
        now = self._clock()
        if self._last is not None:
            dt = max(now - self._last_at, 0.0)
            for s in self._sockets:
                self._joules[s] += self.tdp_w * load_factor(self.utilisation(self._last, stat, s)) * dt
        self._last, self._last_at = stat, now
        return [Reading(f"cpu-{s}", "cpu", j, now, measured=False) for s, j in self._joules.items()]

    async def close(self) -> None:
        self._started = False
        self._stat.close()


def _opt(section: Any, name: str) -> Any:
    if section is None:
        return None
    return section.get(name) if isinstance(section, dict) else getattr(section, name, None)


def create(opts: BackendOptions) -> TdpSensor:
    return TdpSensor(
        opts.paths.procfs, opts.clock, tdp_watts=_opt(opts.section, "tdp_watts"), model=_opt(opts.section, "model")
    )
