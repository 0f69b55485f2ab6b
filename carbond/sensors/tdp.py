"""CPU power model for hosts without a readable energy counter (VMs, containers, non-root users).

Model: for each socket, ``P = TDP x f(u)`` where ``u`` is the socket's busy share over the interval from
``/proc/stat`` and ``f`` is piecewise linear through (0 %, 0.12), (10 %, 0.32), (50 %, 0.75), (100 %, 1.02): the
load profile Teads Engineering fitted on SPECpower_ssj2008 results ("Building an AWS EC2 Carbon Emissions
Dataset", 2021), also used by Boavizta. The 12 % idle floor is that fit's value at zero load.

- What "TDP" is depends on the machine (:mod:`carbond.sensors.cpuhost`): ``cpu.power_watts`` (this machine's own
  figure); ``cpu.tdp_watts`` (one socket of the part, a VM charged its share); the table's TDP of the CPU model
  (``cpu.model``, else ``/proc/cpuinfo`` "model name", else on ARM the core its implementer and part name,
  :mod:`carbond.cpu_models`) on bare metal; on a VM
  the part's TDP x its vCPU share, else Cloud Carbon Footprint's per-vCPU coefficients (linear from idle to busy) of
  the instance type's microarchitecture (``embodied.instance_type``, else DMI on AWS), of the microarchitecture the
  model name gives, or of the cloud; else 4 W per thread. The method and its inputs are logged at start and
  exported on ``carbond_device_info``; a VM charged more than any CCF microarchitecture's maximum per vCPU gets a
  ``cpu_power_implausible`` warning.
- Sockets from the distinct "physical id" values of ``/proc/cpuinfo`` on bare metal (one device for a whole VM);
  each socket gets the utilisation of its own CPUs when the per-CPU lines of ``/proc/stat`` can be mapped to it.
- Utilisation from the tick's ``/proc/stat`` jiffies (:mod:`carbond.procfs`, read once per tick for every reader).
- The first read has no interval yet and reports zero energy; energy is integrated read to read on the monotonic
  clock, so it is cumulative and monotonic.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field

from carbond.cpu_models import Part, arm_part, arm_power, lookup_part
from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import DeviceClass, DeviceInfo, Reading, SensorRead
from carbond.procfs import CpuTimes, HostSample, parse_stat
from carbond.sensors.base import Backend, Clock, Context, Settings
from carbond.sensors.cpuhost import (
    MAX_W_PER_VCPU,
    CpuModel,
    choose,
    detect,
    implausible_per_vcpu,
    lookup_instance,
    own_quota,
    parse_cpuinfo,
)

log = get_logger("carbond.sensors.tdp")

LOAD_CURVE = ((0.0, 0.12), (0.10, 0.32), (0.50, 0.75), (1.00, 1.02))


class CpuSettings(Settings):
    """The ``cpu`` config section: overrides for the model.

    ``tdp_watts``: the TDP of one socket of the named part (the host's part on a VM, charged at the VM's share of
    its threads); ``power_watts``: this machine's own CPU power at full load (a whole VM, every socket of a host),
    charged as is; ``model``: the CPU model name to look up when cpuinfo hides it ("AMD EPYC 7763").
    """

    tdp_watts: Annotated[float, Field(gt=0, le=2000)] | None = None
    power_watts: Annotated[float, Field(gt=0, le=10_000)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=128)] | None = None


def load_factor(u: float) -> float:
    """f(u) of the load curve, u clamped to [0, 1]."""
    u = min(max(u, 0.0), 1.0)
    for (u0, f0), (u1, f1) in itertools.pairwise(LOAD_CURVE):
        if u <= u1:
            return f0 + (f1 - f0) * (u - u0) / (u1 - u0)
    return LOAD_CURVE[-1][1]


class TdpSensor:
    name = "tdp"
    inline = True

    def __init__(
        self,
        procfs: Path,
        clock: Clock,
        *,
        tdp_watts: float | None = None,
        model: str | None = None,
        power_watts: float | None = None,
        sysfs: Path = Path("/sys"),
        cgroupfs: Path = Path("/sys/fs/cgroup"),
        instance: tuple[str, str] | None = None,
    ):
        self._procfs = procfs
        self._sysfs = sysfs
        self._cgroupfs = cgroupfs
        self._clock = clock
        self._tdp_override = tdp_watts
        self._power_override = power_watts
        self._model_override = model
        self._instance = instance  # (cloud, type) the config names; else the one DMI names
        self._sockets: dict[int, list[str]] = {}
        self._per_cpu = False
        self.tdp_w = 0.0
        self.model = ""
        self._last: Mapping[str, CpuTimes] | None = None
        self._last_at = 0.0
        self._joules: dict[int, float] = {}
        self._models: dict[int, CpuModel] = {}
        self._info: tuple[DeviceInfo, ...] = ()
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
        virt = detect(cpuinfo, self._sysfs)
        arm = arm_part(cpuinfo) if not model and not self._model_override else None
        if arm is not None:
            model = f"ARM {arm.name}"
        # a configured name is one string: never iterate it (that joined it letter by letter)
        self.model = " ".join((self._model_override or model).replace("\u00a0", " ").split())
        sockets = [0] if virt.vm else sorted(set(cpu_socket.values())) or [0]  # a VM's "physical id" means nothing
        # per-CPU lines only where sockets are told apart; else the aggregate line is enough
        self._per_cpu = all(f"cpu{p}" in stat for p in cpu_socket) and len(sockets) > 1
        self._sockets = {
            s: [f"cpu{p}" for p, sock in cpu_socket.items() if sock == s] if self._per_cpu else ["cpu"] for s in sockets
        }
        quota = own_quota(self._cgroupfs, self._procfs)
        table: Part | None = None
        if self._power_override is None:
            table = arm_power(arm, virt.vm) if arm is not None else lookup_part(self.model)
        instance = lookup_instance(*self._instance) if self._instance else None
        instance = instance or lookup_instance(virt.cloud, virt.instance_type)
        for s in sockets:
            cpus = sum(1 for sock in cpu_socket.values() if sock == s or virt.vm) or 1
            share = min(quota / len(cpu_socket), 1.0) if quota and cpu_socket else 1.0
            self._models[s] = choose(
                model=self.model,
                table=table,
                override_w=self._tdp_override,
                virt=virt,
                cpus=cpus,
                share=share,
                instance=instance,
                machine_w=self._power_override / len(sockets) if self._power_override is not None else None,
            )
        first = self._models[sockets[0]]
        self.tdp_w = first.full_w
        self._info = tuple(
            DeviceInfo(f"cpu-{s}", self.model, "", self.name, m.method, m.detail) for s, m in self._models.items()
        )
        vcpus = len(cpu_socket) * (min(quota / len(cpu_socket), 1.0) if quota and cpu_socket else 1.0)
        per_vcpu = implausible_per_vcpu(first.full_w, vcpus) if virt.vm else None
        hint = None
        if first.method == "per-thread-default":
            hint = (
                "set cpu.model to the host's CPU part (e.g. 'AMD EPYC 7763'), or cpu.power_watts for this VM's "
                "own figure"
                if virt.vm
                else "set cpu.model or cpu.tdp_watts (the socket's TDP) in the config"
            )
        (log.warning if first.method == "per-thread-default" else log.info)(
            "cpu_power_model",
            model=self.model,
            method=first.method,
            detail=first.detail,
            vm=virt.vm,
            cloud=virt.cloud,
            hint=hint,
        )
        if per_vcpu is not None:
            log.warning(
                "cpu_power_implausible",
                watts_per_vcpu=round(per_vcpu, 1),
                plausible_max=MAX_W_PER_VCPU,
                detail=first.detail,
                hint="cpu.tdp_watts is one socket's TDP: set cpu.model to the host's part so the VM is charged its "
                "share of it, or cpu.power_watts to this VM's own full-load figure",
            )
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
            for s, m in self._models.items():
                u = self.utilisation(self._last, stat, s)
                self._joules[s] += m.power(u, load_factor(u)) * dt
        self._last, self._last_at = stat, now
        readings = tuple(Reading(f"cpu-{s}", "cpu", j, now, measured=False) for s, j in self._joules.items())
        return SensorRead(readings, device_info=self._info)

    async def close(self) -> None:
        self._started = False


def create(settings: CpuSettings, ctx: Context) -> TdpSensor:
    p = ctx.paths
    return TdpSensor(
        p.procfs,
        ctx.clock,
        tdp_watts=settings.tdp_watts,
        model=settings.model,
        power_watts=settings.power_watts,
        sysfs=p.sysfs,
        cgroupfs=p.cgroupfs,
        instance=ctx.instance,
    )


BACKEND = Backend(frozenset({"cpu"}), CpuSettings, create)
