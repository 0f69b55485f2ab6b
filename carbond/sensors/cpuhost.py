"""What the CPU power model needs to know of the machine it runs on: is it a virtual machine, on which cloud, how many
CPUs it may use, and how the CPU's power is therefore modelled.

A VM is told by the ``hypervisor`` flag of ``/proc/cpuinfo`` (set by every x86 hypervisor) or by the DMI
identification under ``<sysfs>/class/dmi/id`` (``sys_vendor`` "Amazon EC2", ``product_name`` "Google Compute
Engine", ``sys_vendor`` "Microsoft Corporation" with ``product_name`` "Virtual Machine"); the cloud from DMI.

How the CPU's power is modelled (:func:`choose`), most specific first:

0. ``cpu.power_watts`` set: this machine's own CPU power at full load (a whole VM, or every socket of a host),
   charged as is.
1. ``cpu.tdp_watts`` set: the named part's TDP per socket; on a VM charged at the VM's share: x its vCPUs / the
   part's threads (from the table, or the model's core count), else / the instance type's host vCPUs; with neither
   known, whole, and :func:`implausible_per_vcpu` makes the sensor warn.
2. A bare-metal host whose model is in the table (:func:`carbond.cpu_models.lookup_part`: exact, F suffix,
   family; or its ARM core, :func:`carbond.cpu_models.arm_power`): its TDP per socket.
3. A VM whose part is in the table with its threads (the table's, the model's "64-Core", an ARM core's): the part's
   TDP x this VM's vCPUs / the part's threads.
4. A VM on a known cloud: Cloud Carbon Footprint's watts per vCPU, from idle (min) to busy (max), x the vCPUs:
   those of the instance type's CPU microarchitecture where the type is known (``product_name`` in DMI on AWS) and
   CCF names one (its per-microarchitecture table, e.g. Skylake 0.65-4.26, AMD EPYC 2nd Gen 0.47-1.69; the
   average over the ones it lists, their median when Sandy or Ivy Bridge is among them, as CCF does), else the
   cloud's average (CCF methodology, "Energy Estimate (Watt-Hours)": AWS 0.74-3.5, GCP 0.71-4.26, Azure
   0.78-3.76 W per vCPU).
5. Otherwise 4 W per thread (CodeCarbon's default for a CPU it cannot identify) x the logical CPUs, along the load
   curve: never a whole 65 W socket for a 2-vCPU VM.

Inside a container limited by a CPU quota (cgroup ``cpu.max``), the model is charged the quota's share of the
CPUs it sees, and so is the machine's embodied share (:func:`own_quota`: not when a host's ``/proc`` is read beside
this container's cgroup).

A VM's share of its host (for embodied emissions, :func:`vm_share`): where the instance type is known
(``embodied.instance_type``, else DMI on AWS) and in ``instance_vcpus.csv``, its vCPUs over those of the largest
size of its family or series, which Cloud Carbon Footprint takes for the whole host (m5.large: 2/96); else its
vCPUs over the threads of the part its cpuinfo names.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from carbond.cpu_models import Part

#: Cloud Carbon Footprint, methodology: average minimum and maximum watts per vCPU by cloud (SPECpower-derived).
CCF_WATTS_PER_VCPU: dict[str, tuple[float, float]] = {
    "aws": (0.74, 3.5),
    "gcp": (0.71, 4.26),
    "azure": (0.78, 3.76),
}
#: Cloud Carbon Footprint's minimum and maximum watts per vCPU by CPU microarchitecture (SPECpower-derived), as in
#: the npm packages @cloud-carbon-footprint/aws 0.15.0 and /azure 1.8.0 (Apache-2.0; the two agree, Azure adds
#: AMD EPYC 3rd Gen; GPUs and FPGAs left out).
CCF_WATTS_BY_MICROARCH: dict[str, tuple[float, float]] = {
    "Cascade Lake": (0.64, 3.97),
    "Skylake": (0.65, 4.26),
    "Broadwell": (0.71, 3.69),
    "Haswell": (1.0, 4.74),
    "Coffee Lake": (1.14, 5.42),
    "Sandy Bridge": (2.17, 8.58),
    "Ivy Bridge": (3.04, 8.25),
    "AMD EPYC 1st Gen": (0.82, 2.55),
    "AMD EPYC 2nd Gen": (0.47, 1.69),
    "AMD EPYC 3rd Gen": (0.45, 2.02),
    "AWS Graviton2": (0.47, 1.69),
}
#: Microarchitecture from a cpuinfo model name, for a VM whose part is not in the TDP table or names no core count
#: (Intel never does): Xeon Scalable's second digit is its generation (8175M: 1st, Skylake; 8259CL: 2nd, Cascade
#: Lake), Xeon E5/E7 v2/v3/v4 are Ivy Bridge/Haswell/Broadwell (no suffix: Sandy Bridge), an EPYC 7xxx's last digit
#: is its generation (7571: 1st; 7R32: 2nd; 7R13: 3rd); QEMU's named models say it in brackets. Vendors' naming
#: schemes (Intel ARK, AMD's product pages); later generations (Ice Lake, EPYC 9004 ...) have no CCF figures.
_MICROARCH_PATTERNS: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = (
    (
        re.compile(r"\b(?:platinum|gold|silver|bronze)\s+\d(\d)\d\d", re.IGNORECASE),
        {"1": "Skylake", "2": "Cascade Lake"},
    ),
    (
        re.compile(r"\bE[57]-\d{4}\w?(?:\s+v(\d))?\b", re.IGNORECASE),
        {"": "Sandy Bridge", "2": "Ivy Bridge", "3": "Haswell", "4": "Broadwell"},
    ),
    (  # QEMU's named CPU models: "Intel Xeon Processor (Cascadelake)", "Intel Core Processor (Haswell, no TSX)"
        re.compile(r"\((skylake|cascade ?lake|broadwell|haswell|ivy ?bridge|sandy ?bridge)\b", re.IGNORECASE),
        {
            "skylake": "Skylake",
            "cascadelake": "Cascade Lake",
            "broadwell": "Broadwell",
            "haswell": "Haswell",
            "ivybridge": "Ivy Bridge",
            "sandybridge": "Sandy Bridge",
        },
    ),
    (
        re.compile(r"\bEPYC\s+7\w\w(\d)\b", re.IGNORECASE),
        {"1": "AMD EPYC 1st Gen", "2": "AMD EPYC 2nd Gen", "3": "AMD EPYC 3rd Gen"},
    ),
)


def microarchitecture(model: str) -> str | None:
    """The CCF microarchitecture a cpuinfo model name names (``CCF_WATTS_BY_MICROARCH`` keys), else None."""
    for pattern, names in _MICROARCH_PATTERNS:
        if (m := pattern.search(model)) is not None:
            return names.get((m.group(1) or "").lower().replace(" ", ""))
    return None


MAX_W_PER_VCPU = max(hi for _, hi in CCF_WATTS_BY_MICROARCH.values())
#: CodeCarbon's power per thread for a CPU it cannot identify.
WATTS_PER_THREAD = 4.0
_CORES = re.compile(r"\b(\d+)-core\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Virtualisation:
    vm: bool
    cloud: str  # "aws", "gcp", "azure", or "" when unknown or not a cloud
    evidence: str  # what told it, for the log and the model's description
    instance_type: str = ""  # as DMI names it (AWS), else ""


@dataclass(frozen=True, slots=True)
class InstanceType:
    """A cloud instance type as Cloud Carbon Footprint sizes it (``instance_vcpus.csv``)."""

    cloud: str
    name: str
    vcpus: int
    host_vcpus: int  # of the largest size of its family or series: CCF's whole host
    microarchitectures: tuple[str, ...]

    @property
    def share(self) -> float:
        return min(self.vcpus / self.host_vcpus, 1.0) if self.host_vcpus > 0 else 1.0

    def watts_per_vcpu(self) -> tuple[float, float, str] | None:
        """CCF's (min, max) watts per vCPU of this type's microarchitectures and their names; None if none known."""
        known = [a for a in self.microarchitectures if a in CCF_WATTS_BY_MICROARCH]
        if not known:
            return None
        agg = statistics.median if {"Sandy Bridge", "Ivy Bridge"} & set(known) else statistics.fmean
        lo = agg([CCF_WATTS_BY_MICROARCH[a][0] for a in known])
        hi = agg([CCF_WATTS_BY_MICROARCH[a][1] for a in known])
        return lo, hi, "/".join(known)


def normalise_instance_type(name: str) -> str:
    """Case, spaces and underscores do not matter; Azure's ``Standard_`` prefix (as IMDS reports it) neither."""
    t = name.strip().lower().removeprefix("standard_")
    return re.sub(r"[\s_]+", "", t)


@cache
def _instances() -> dict[tuple[str, str], InstanceType]:
    text = resources.files("carbond.data").joinpath("instance_vcpus.csv").read_text(encoding="utf-8")
    table = {}
    for row in csv.DictReader(io.StringIO(text)):
        archs = tuple(a for a in row["microarchitectures"].split("|") if a)
        it = InstanceType(row["cloud"], row["type"], int(row["vcpus"]), int(row["host_vcpus"]), archs)
        table[(it.cloud, normalise_instance_type(it.name))] = it
    return table


def typical_host_vcpus(cloud: str | None) -> tuple[int, int]:
    """The median host size (vCPUs of the largest size of a family) over the shipped instance types of ``cloud``
    (of every cloud when ``cloud`` has none), and how many types that median is taken over."""
    sizes = [it.host_vcpus for (c, _), it in _instances().items() if c == cloud] or [
        it.host_vcpus for it in _instances().values()
    ]
    return int(statistics.median(sizes)), len(sizes)


def visible_vcpus(procfs: Path) -> int:
    """The logical CPUs this machine's cpuinfo lists (a VM's vCPUs)."""
    return len(parse_cpuinfo(_read(procfs / "cpuinfo"))[1])


def lookup_instance(cloud: str | None, name: str | None) -> InstanceType | None:
    """The instance type ``name`` of ``cloud`` (aws, azure, gcp) in the shipped table; None if unknown."""
    if not cloud or not name:
        return None
    return _instances().get((cloud, normalise_instance_type(name)))


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


def part_threads(model: str) -> int | None:
    """Threads of a part whose model name gives its cores ("AMD EPYC 7763 64-Core Processor": 128), two per core."""
    cores = _CORES.search(model)
    return 2 * int(cores.group(1)) if cores else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def detect(cpuinfo: str, sysfs: Path) -> Virtualisation:
    dmi = sysfs / "class/dmi/id"
    vendor, product = _read(dmi / "sys_vendor"), _read(dmi / "product_name")
    cloud = ""
    if vendor == "Amazon EC2" or product.startswith("Amazon EC2"):
        cloud = "aws"
    elif product == "Google Compute Engine" or vendor == "Google":
        cloud = "gcp"
    elif vendor == "Microsoft Corporation" and product == "Virtual Machine":
        cloud = "azure"
    flags = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
    hypervisor = "hypervisor" in flags.partition(":")[2].split()
    if cloud:
        # an EC2 instance's DMI product name is its type ("m5.large"); Azure and GCP do not name theirs there
        instance = product if cloud == "aws" and re.fullmatch(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", product) else ""
        return Virtualisation(True, cloud, f"DMI {vendor!r} {product!r}", instance)
    if hypervisor:
        return Virtualisation(True, "", "cpuinfo hypervisor flag")
    return Virtualisation(False, "", "no hypervisor flag")


def container_quota(cgroupfs: Path, procfs: Path) -> float | None:
    """CPUs a container may use by its cgroup v2 ``cpu.max``; None when not in a container (its own cgroup is not
    the root of a cgroup namespace: e.g. a systemd service, whose quota says nothing of the machine), without a
    quota, or unreadable."""
    lines = _read(procfs / "self/cgroup").splitlines()
    if lines != ["0::/"]:
        return None
    fields = _read(cgroupfs / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if period > 0 and quota > 0 else None


def own_quota(cgroupfs: Path, procfs: Path) -> float | None:
    """:func:`container_quota` where ``/proc`` and the cgroup tree are one machine's view: both the defaults, or
    both configured (a fixture tree, or a host's mounted at ``/host``, whose root cgroup has no ``cpu.max``); never
    a host's ``/proc`` read beside this container's own cgroup."""
    if (procfs == Path("/proc")) != (cgroupfs == Path("/sys/fs/cgroup")):
        return None
    return container_quota(cgroupfs, procfs)


def vm_share(
    procfs: Path, sysfs: Path, instance_type: str | None = None, cloud: str | None = None
) -> tuple[float | None, str]:
    """This VM's share of its host, for embodied emissions: for a known instance type (``instance_type`` of
    ``cloud``, else the one DMI names) its vCPUs over its host's per Cloud Carbon Footprint; else its vCPUs over the
    threads of the part its cpuinfo names (two per core, where the model names its cores). (None, "") on bare metal
    without a configured instance type; (None, reason) on a VM whose host cannot be sized."""
    cpuinfo = _read(procfs / "cpuinfo")
    virt = detect(cpuinfo, sysfs)
    configured = lookup_instance(cloud or virt.cloud, instance_type)
    found = configured or (lookup_instance(virt.cloud, virt.instance_type) if instance_type is None else None)
    if found is not None:
        how = "embodied.instance_type" if configured else virt.evidence
        return found.share, (
            f"{found.cloud} {found.name}: {found.vcpus} of {found.host_vcpus} vCPUs, the largest size of its "
            f"family (Cloud Carbon Footprint; {how})"
        )
    if not virt.vm:
        return None, ""
    model, cpu_socket = parse_cpuinfo(cpuinfo)
    threads, vcpus = part_threads(model), len(cpu_socket)
    if threads is None or not vcpus:
        return None, f"a VM ({virt.evidence}) whose CPU model does not name its cores: {model or 'unnamed'}"
    return min(vcpus / threads, 1.0), f"{vcpus} vCPUs / {threads} threads of {model} ({virt.evidence})"


@dataclass(frozen=True, slots=True)
class CpuModel:
    """How a device's power is modelled: ``full_w`` at 100 % along the load curve, or ``linear`` from ``idle_w``
    to ``full_w`` (CCF's per-vCPU coefficients), described by ``method`` and ``detail`` (exported and logged)."""

    full_w: float
    method: str
    detail: str
    idle_w: float | None = None  # set: linear between idle_w and full_w (CCF); None: the load curve

    def power(self, u: float, load_factor: float) -> float:
        if self.idle_w is not None:
            return self.idle_w + (self.full_w - self.idle_w) * min(max(u, 0.0), 1.0)
        return self.full_w * load_factor


def choose(
    *,
    model: str,
    table: Part | None,
    override_w: float | None,
    virt: Virtualisation,
    cpus: int,
    share: float = 1.0,
    instance: InstanceType | None = None,
    machine_w: float | None = None,
) -> CpuModel:
    """The model of one socket (bare metal) or of the whole VM; ``cpus`` logical CPUs of it, ``share`` the part of
    them this process may use (a container quota), ``instance`` the VM's instance type where known, ``table`` the
    part the model name (or ARM core) names, ``override_w`` ``cpu.tdp_watts`` (the part's socket TDP) and
    ``machine_w`` ``cpu.power_watts`` (this machine's own figure, charged as is)."""
    quota = f", x {share:.3g} of the CPUs by the container's quota" if share < 1.0 else ""
    if machine_w is not None:
        return CpuModel(machine_w * share, "power-watts", f"cpu.power_watts {machine_w:g} W for this machine{quota}")
    threads = (table.threads if table else None) or part_threads(model)
    if override_w is not None:
        if not virt.vm:
            return CpuModel(override_w * share, "tdp", f"cpu.tdp_watts {override_w:g} W per socket{quota}")
        host = threads or (instance.host_vcpus if instance else None)
        if host:
            of = "threads of the part" if threads else f"vCPUs of the {instance.name if instance else ''} host"
            return CpuModel(
                override_w * min(cpus / host, 1.0) * share,
                "tdp-vcpu-share",
                f"cpu.tdp_watts {override_w:g} W x {cpus}/{host} {of} ({virt.evidence}){quota}",
            )
        return CpuModel(
            override_w * share,
            "tdp",
            f"cpu.tdp_watts {override_w:g} W for the whole VM: the part's threads are unknown ({virt.evidence}){quota}",
        )
    if table is not None and not virt.vm:
        return CpuModel(table.tdp * share, "tdp", f"{table.name} TDP {table.tdp:g} W per socket{_how(table)}{quota}")
    if table is not None and threads is not None:
        vm_share = min(cpus / threads, 1.0)
        return CpuModel(
            table.tdp * vm_share * share,
            "tdp-vcpu-share",
            f"{table.name} TDP {table.tdp:g} W x {cpus}/{threads} threads{_how(table)} ({virt.evidence}){quota}",
        )
    if instance is not None and virt.vm and (per_arch := instance.watts_per_vcpu()) is not None:
        lo, hi, archs = per_arch
        n = cpus * share
        return CpuModel(
            hi * n,
            "ccf-vcpu",
            f"{instance.cloud} {instance.name} {archs} {lo:.3g}-{hi:.3g} W per vCPU x {n:g} vCPUs "
            f"(Cloud Carbon Footprint, per microarchitecture; {virt.evidence})",
            idle_w=lo * n,
        )
    if virt.vm and (arch := microarchitecture(model)) in CCF_WATTS_BY_MICROARCH:
        lo, hi = CCF_WATTS_BY_MICROARCH[arch]
        n = cpus * share
        return CpuModel(
            hi * n,
            "ccf-vcpu",
            f"{arch} (from the model name {model}) {lo:g}-{hi:g} W per vCPU x {n:g} vCPUs "
            f"(Cloud Carbon Footprint, per microarchitecture; {virt.evidence})",
            idle_w=lo * n,
        )
    if virt.cloud in CCF_WATTS_PER_VCPU:
        lo, hi = CCF_WATTS_PER_VCPU[virt.cloud]
        n = cpus * share
        return CpuModel(
            hi * n,
            "ccf-vcpu",
            f"{virt.cloud} {lo:g}-{hi:g} W per vCPU x {n:g} vCPUs (Cloud Carbon Footprint; {virt.evidence})",
            idle_w=lo * n,
        )
    why = "model not in the table" if table is None else "model threads unknown on a VM"
    return CpuModel(
        WATTS_PER_THREAD * cpus * share,
        "per-thread-default",
        f"{WATTS_PER_THREAD:g} W x {cpus} threads ({why}: {model or 'unnamed'}){quota}",
    )


def _how(part: Part) -> str:
    return {"suffix": " (same part without the F suffix)", "family": " (its family's median)"}.get(part.how, "")


def implausible_per_vcpu(full_w: float, vcpus: float) -> float | None:
    """Watts per vCPU at full load when above the highest per-vCPU maximum Cloud Carbon Footprint lists for any
    microarchitecture (Sandy Bridge, 8.58 W): a figure no VM draws, typically a socket's TDP charged whole."""
    per = full_w / vcpus if vcpus > 0 else full_w
    return per if per > MAX_W_PER_VCPU else None
