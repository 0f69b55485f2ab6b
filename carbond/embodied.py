"""Embodied emissions: the manufacturing footprint of the hardware, amortised over its life (SCI's M term).

The Software Carbon Intensity spec (ISO/IEC 21031:2024) charges a workload ``M = TE x (TiR / EL) x (RR / ToR)``:
the total embodied emissions TE, times the time reserved over the expected life, times the share of the resources
reserved. carbond reserves the whole machine for the time it measures, so each device accrues
``kg x 1000 x share / (lifetime_years x 365.25 x 86,400)`` grams per second while carbond runs, counted on the
monotonic clock and persisted with the other counters (the time carbond was down is not charged).

Devices and their figures (defaults from Cloud Carbon Footprint and Boavizta, see carbond/data/SOURCES.md):

- ``server``: ``embodied.server_kg``, else the cloud instance type's host (``embodied.instance_type``, else the type
  an EC2 instance's DMI names) from CCF's embodied tables (its GPU part removed, since detected GPUs are counted on
  their own), else CCF's estimate for this machine: 1,000 kg for a rack
  server, +100 kg per CPU socket beyond the first, +1.39 kg per GB of DRAM beyond 16 GB (storage is not counted:
  carbond cannot tell disks' kinds and sizes reliably); a VM whose host can be sized neither by its instance type
  nor by its CPU part's threads is charged its vCPUs' share of a median CCF cloud host (``typical_host``); the
  share (:func:`plan`, the one rule of the daemon and of ``measure``/``track``) is the VM's share of its host, times
  a container's ``cpu.max`` quota over the CPUs it sees;
- each GPU device: the first ``embodied.gpus`` key found in its model name (H100 575 kg, A100 319 kg), else
  ``embodied.default_gpu_kg`` (CCF's 150 kg, low against GPU-specific studies).

Uncertainty is large (a factor of two either way is common between studies); the figures are for comparing and
budgeting, not for certified reporting. The method and its caveats are in the README.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from carbond.logs import get_logger
from carbond.sensors.cpuhost import (
    detect,
    normalise_instance_type,
    own_quota,
    typical_host_vcpus,
    visible_vcpus,
    vm_share,
)

log = get_logger("carbond.embodied")

SECONDS_PER_YEAR = 365.25 * 86_400
BASE_SERVER_KG = 1000.0  # CCF: a rack server with one CPU and 16 GB
EXTRA_SOCKET_KG = 100.0
DRAM_KG_PER_GB = 1.39  # CCF: per GB above the base 16 GB
BASE_DRAM_GB = 16.0
Cloud = Literal["aws", "gcp", "azure"]


class EmbodiedConfig(BaseModel):
    """The ``embodied`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    server_kg: Annotated[float, Field(ge=0, le=100_000)] | None = None  # default: instance type, else estimated
    lifetime_years: Annotated[float, Field(gt=0, le=30)] = 4.0  # CCF's default server life
    share: Annotated[float, Field(gt=0, le=1)] = 1.0  # of the host: a cloud VM's vCPUs / the host's vCPUs
    instance_type: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # e.g. m5.large, n2-standard-8
    cloud: Cloud | None = None  # the instance type's cloud; default: from intensity.zone ("aws:eu-west-3")
    gpus: dict[Annotated[str, Field(min_length=1)], Annotated[float, Field(ge=0, le=100_000)]] = {
        "H100": 575.0,  # Boavizta 2.5.0, H100 SXM 80GB
        "A100": 319.0,  # Boavizta 2.5.0, A100 SXM4 40GB
    }
    default_gpu_kg: Annotated[float, Field(ge=0, le=100_000)] = 150.0  # CCF per-GPU figure


_norm = normalise_instance_type


def instance_table() -> dict[tuple[str, str], tuple[float, float]]:
    """(cloud, normalised type) -> (host total kg, of which GPUs kg), from the shipped CCF table."""
    text = resources.files("carbond.data").joinpath("embodied_instances.csv").read_text(encoding="utf-8")
    return {
        (row["cloud"], _norm(row["type"])): (float(row["total_kg"]), float(row["gpu_kg"]))
        for row in csv.DictReader(text.splitlines())
    }


def machine_estimate(sysfs: Path, procfs: Path) -> tuple[float, str]:
    """CCF's server estimate from this machine's CPU sockets and memory, and how it was reached."""
    packages = set()
    for p in (sysfs / "devices/system/cpu").glob("cpu[0-9]*/topology/physical_package_id"):
        try:
            packages.add(p.read_text().strip())
        except OSError:
            continue
    sockets = max(1, len(packages))
    mem_gb = 0.0
    try:
        for line in (procfs / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / (1024 * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    kg = BASE_SERVER_KG + EXTRA_SOCKET_KG * (sockets - 1) + DRAM_KG_PER_GB * max(0.0, mem_gb - BASE_DRAM_GB)
    return kg, f"estimated: {sockets} socket(s), {mem_gb:.0f} GB DRAM"


def cloud_of(zone: str) -> Cloud | None:
    prefix = zone.partition(":")[0].strip().lower() if ":" in zone else ""
    return prefix if prefix in ("aws", "gcp", "azure") else None  # type: ignore[return-value]


def dmi_instance(sysfs: Path, procfs: Path) -> tuple[Cloud | None, str | None]:
    """(cloud, instance type) as this machine's DMI names them (EC2 only), else (cloud or None, None)."""
    try:
        cpuinfo = (procfs / "cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    virt = detect(cpuinfo, sysfs)
    cloud = virt.cloud if virt.cloud in ("aws", "gcp", "azure") else None
    return cloud, virt.instance_type or None  # type: ignore[return-value]


def server_kg(cfg: EmbodiedConfig, zone: str, sysfs: Path, procfs: Path) -> tuple[float, str]:
    """The server's embodied kg and where the figure comes from (for the start-up log line): ``server_kg``, else
    the instance type's host (``instance_type``, else the type DMI names on EC2), else this machine's estimate."""
    if cfg.server_kg is not None:
        return cfg.server_kg, "config"
    dmi_cloud, dmi_type = dmi_instance(sysfs, procfs)
    instance_type, cloud = cfg.instance_type, cfg.cloud or cloud_of(zone) or dmi_cloud
    how = "embodied.instance_type"
    if instance_type is None:
        instance_type, cloud, how = dmi_type, cfg.cloud or dmi_cloud, "DMI product name"
    if instance_type is not None:
        found = instance_table().get((cloud, _norm(instance_type))) if cloud else None
        if found is not None:
            total, gpus = found
            return total - gpus, f"ccf {cloud} {instance_type} (host, GPUs counted apart; {how})"
        log.warning(
            "embodied_instance_type_unknown",
            instance_type=instance_type,
            cloud=cloud,
            source=how,
            fallback="estimate from this machine",
            key="embodied.server_kg",
        )
    return machine_estimate(sysfs, procfs)


def resolved_cloud(cfg: EmbodiedConfig, zone: str, sysfs: Path, procfs: Path) -> Cloud | None:
    """The cloud an instance type belongs to: ``embodied.cloud``, else the zone's, else the one DMI names."""
    return cfg.cloud or cloud_of(zone) or dmi_instance(sysfs, procfs)[0]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the machine is charged: ``kg`` of hardware (``how``) at ``share`` of it (``share_how``); ``warning``
    set when the share is a guess (a VM whose host cannot be sized)."""

    kg: float
    how: str
    share: float
    share_how: str
    warning: str = ""


def plan(cfg: EmbodiedConfig, zone: str, sysfs: Path, procfs: Path, cgroupfs: Path) -> Plan:
    """The daemon's and the jobs' one rule for the server's kg and this machine's share of it.

    ``embodied.share`` set: that share. Else the VM's share of its host (:func:`carbond.sensors.cpuhost.vm_share`,
    with the instance type's cloud from the config, the zone or DMI); a VM whose host cannot be sized is charged
    its vCPUs' share of a median cloud host (:func:`typical_host`), never a whole estimated server; then, inside a
    container limited by a CPU quota (``cpu.max``), that quota's share of the CPUs it sees, as the CPU model does.
    """
    kg, how = server_kg(cfg, zone, sysfs, procfs)
    if "share" in cfg.model_fields_set:
        return Plan(kg, how, cfg.share, "embodied.share")
    cloud = resolved_cloud(cfg, zone, sysfs, procfs)
    share, share_how = vm_share(procfs, sysfs, cfg.instance_type, cloud)
    warning = ""
    if share is None and share_how:  # a VM whose host cannot be sized: a median cloud host
        host_kg, host_vcpus, host_how = typical_host(cloud)
        if how.startswith("estimated"):
            kg, how = host_kg, host_how
        share = max(min(visible_vcpus(procfs) / host_vcpus, 1.0), 1e-6)
        warning, share_how = share_how, f"{share:.4f} of {host_how}"
    elif share is None:
        share, share_how = 1.0, "the whole machine (bare metal)"
    quota = own_quota(cgroupfs, procfs)
    cpus = visible_vcpus(procfs)
    if quota is not None and cpus > 0 and quota < cpus:
        share *= quota / cpus
        share_how += f", x {quota:g}/{cpus} CPUs by the container's cpu.max quota"
    return Plan(kg, how, share, share_how, warning)


def log_plan(found: Plan, cfg: EmbodiedConfig) -> None:
    """The daemon's start-up lines for :func:`plan`."""
    if found.warning:
        log.warning("embodied_share_unknown", reason=found.warning, charged=found.share_how, key="embodied.share")
    elif "share" not in cfg.model_fields_set:
        log.info("embodied_share", share=round(found.share, 4), source=found.share_how)
    log.info(
        "embodied_server",
        kg=round(found.kg, 1),
        source=found.how,
        lifetime_years=cfg.lifetime_years,
        share=round(found.share, 6),
    )


def typical_host(cloud: str | None) -> tuple[float, int, str]:
    """A cloud host of median size for a VM whose own host cannot be sized: the median embodied kg of the shipped
    CCF hosts without GPUs and their median vCPUs (of ``cloud``, else of every cloud), and how it was reached."""
    vcpus, types = typical_host_vcpus(cloud)
    table = instance_table()
    kgs = [t - g for (c, _), (t, g) in table.items() if g == 0 and c == cloud] or [
        t for t, g in table.values() if g == 0
    ]
    kg = statistics.median(kgs)
    return kg, vcpus, f"median CCF {cloud or 'cloud'} host: {kg:.0f} kg, {vcpus} vCPUs (over {types} instance types)"


def gpu_kg(cfg: EmbodiedConfig, model: str) -> float:
    m = model.lower()
    for key in sorted(cfg.gpus, key=len, reverse=True):  # the most specific key first ("A100 80GB" before "A100")
        if key.lower() in m:
            return cfg.gpus[key]
    return cfg.default_gpu_kg


@dataclass(slots=True)
class _Item:
    kg: float
    total_g: float


class Embodied:
    """Accrues each device's amortised embodied emissions tick by tick."""

    def __init__(self, cfg: EmbodiedConfig, server: float, restored: dict[str, float] | None = None) -> None:
        self._cfg = cfg
        self._rate = 1000.0 * cfg.share / (cfg.lifetime_years * SECONDS_PER_YEAR)  # g/s per kg
        self._restored = dict(restored or {})
        self._items: dict[str, _Item] = {"server": _Item(server, self._restored.pop("server", 0.0))}
        self._last: float | None = None

    def advance(self, now: float, gpus: dict[str, str]) -> tuple[tuple[str, float], ...]:
        """Charge the time since the last call (monotonic ``now``); ``gpus`` maps GPU devices to model names."""
        if self._last is None or now > self._last:
            if self._last is not None:
                dt = now - self._last
                for item in self._items.values():
                    item.total_g += item.kg * self._rate * dt
            self._last = now
        for device, model in gpus.items():  # a GPU met now is charged from now on
            if device not in self._items:
                self._items[device] = _Item(gpu_kg(self._cfg, model), self._restored.pop(device, 0.0))
        return self.totals()

    def totals(self) -> tuple[tuple[str, float], ...]:
        return tuple((device, item.total_g) for device, item in self._items.items())

    def saved(self) -> dict[str, float]:
        """What to persist: every device met, and those restored but not met (yet) in this run."""
        return {**self._restored, **{d: i.total_g for d, i in self._items.items()}}
