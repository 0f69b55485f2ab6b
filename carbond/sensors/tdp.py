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
- Utilisation from the tick's ``/proc/stat`` jiffies (:mod:`carbond.procfs`, read once per tick for every reader).
- The first read has no interval yet and reports zero energy; energy is integrated read to read on the monotonic
  clock, so it is cumulative and monotonic.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import structlog
from pydantic import Field

from carbond.cpu_models import lookup_tdp
from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import DeviceClass, Reading, SensorRead
from carbond.procfs import CpuTimes, HostSample, parse_stat
from carbond.sensors.base import Backend, Clock, Context, Settings

log = structlog.get_logger("carbond.sensors.tdp")

DEFAULT_TDP_W = 65.0
LOAD_CURVE = ((0.0, 0.12), (0.10, 0.32), (0.50, 0.75), (1.00, 1.02))


class CpuSettings(Settings):
    """The ``cpu`` config section: overrides for the model."""

    tdp_watts: Annotated[float, Field(gt=0, le=2000)] | None = None
    model: str | None = None


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


class TdpSensor:
    name = "tdp"
    inline = True

    def __init__(self, procfs: Path, clock: Clock, *, tdp_watts: float | None = None, model: str | None = None):
        self._procfs = procfs
        self._clock = clock
        self._tdp_override = tdp_watts
        self._model_override = model
        self._sockets: dict[int, list[str]] = {}
        self._per_cpu = False
        self.tdp_w = 0.0
        self.model = ""
        self._last: Mapping[str, CpuTimes] | None = None
        self._last_at = 0.0
        self._joules: dict[int, float] = {}
        self._started = False

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"cpu"}) if self._started else frozenset()

    async def start(self) -> None:
        try:
            cpuinfo = (self._procfs / "cpuinfo").read_text(errors="replace")
            stat = parse_stat((self._procfs / "stat").read_bytes())
        except (OSError, ValueError) as exc:
            raise SensorUnavailable("tdp", f"cannot read {self._procfs}/cpuinfo and stat: {exc}") from None
        model, cpu_socket = parse_cpuinfo(cpuinfo)
        self.model = self._model_override or model
        sockets = sorted(set(cpu_socket.values())) or [0]
        # per-CPU lines only where sockets are told apart; else the aggregate line is enough
        self._per_cpu = all(f"cpu{p}" in stat for p in cpu_socket) and len(sockets) > 1
        self._sockets = {
            s: [f"cpu{p}" for p, sock in cpu_socket.items() if sock == s] if self._per_cpu else ["cpu"] for s in sockets
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
        self._last, self._last_at = stat, self._clock()
        self._started = True

    def utilisation(self, before: Mapping[str, CpuTimes], after: Mapping[str, CpuTimes], socket: int) -> float:
        busy = total = 0
        for cpu in self._sockets[socket]:
            b0, t0 = before.get(cpu, (0, 0))
            b1, t1 = after.get(cpu, (0, 0))
            busy, total = busy + max(b1 - b0, 0), total + max(t1 - t0, 0)
        return busy / total if total > 0 else 0.0

    async def read(self, host: HostSample) -> SensorRead:
        try:
            stat = host.per_cpu() if self._per_cpu else {"cpu": host.cpu}
        except ValueError as exc:
            raise SensorReadError(f"{self._procfs}/stat: {exc}") from exc
        now = self._clock()
        if self._last is not None:
            dt = max(now - self._last_at, 0.0)
            for s in self._sockets:
                self._joules[s] += self.tdp_w * load_factor(self.utilisation(self._last, stat, s)) * dt
        self._last, self._last_at = stat, now
        return SensorRead(tuple(Reading(f"cpu-{s}", "cpu", j, now, measured=False) for s, j in self._joules.items()))

    async def close(self) -> None:
        self._started = False


def create(settings: CpuSettings, ctx: Context) -> TdpSensor:
    return TdpSensor(ctx.paths.procfs, ctx.clock, tdp_watts=settings.tdp_watts, model=settings.model)


BACKEND = Backend(frozenset({"cpu"}), CpuSettings, create)
