from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from carbond.cpu_models import lookup_tdp, normalise
from carbond.errors import SensorReadError
from carbond.model import Reading
from carbond.procfs import HostReader
from carbond.sensors.base import Sensor
from carbond.sensors.ram import RamSensor, ram_power_w
from carbond.sensors.tdp import TdpSensor, load_factor
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree

FIXTURES = Path(__file__).parent.parent / "fixtures"


def cpuinfo_cases() -> list[tuple[str, float | None]]:
    with (FIXTURES / "cpuinfo_model_names.csv").open() as fh:
        return [
            (r["model_name"], float(r["expected_tdp_watts"]) if r["expected_tdp_watts"] else None)
            for r in csv.DictReader(fh)
        ]


@pytest.mark.parametrize(("model", "expected"), cpuinfo_cases())
def test_real_cpuinfo_strings(model: str, expected: float | None) -> None:
    found = lookup_tdp(model)
    assert (found[0] if found else None) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("AMD EPYC 9654 96-Core Processor", 360.0),
        ("AMD Ryzen 7 5800X 8-Core Processor", 105.0),
        ("Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", 95.0),
        ("QEMU Virtual CPU version 2.5+", None),
        ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 150.0),  # not the 6248R's 205 W
    ],
)
def test_more_models(model: str, expected: float | None) -> None:
    found = lookup_tdp(model)
    assert (found[0] if found else None) == expected


@pytest.mark.parametrize(
    ("model", "expected", "row"),
    [
        # AMD APUs as Linux prints them: the integrated graphics are not part of the table's name
        ("AMD Ryzen 7 7840HS w/ Radeon 780M Graphics", 54.0, "AMD Ryzen 7 7840HS"),
        ("AMD Ryzen 9 7940HS w/ Radeon 780M Graphics", 54.0, "AMD Ryzen 9 7940HS"),
        ("AMD Ryzen 5 5600G with Radeon Graphics", 65.0, "AMD Ryzen 5 5600G"),
        # Apple silicon (macOS brand strings, or cpu.model): each tier its own row, never the plain M1's 10 W
        ("Apple M1", 10.0, "Apple M1"),
        ("Apple M1 Pro", 35.0, "Apple M1 Pro"),
        ("Apple M1 Max", 35.0, "Apple M1 Max"),
        ("Apple M1 Ultra", 70.0, "Apple M1 Ultra"),
        ("Apple M2", 22.0, "Apple M2"),
        ("Apple M2 Ultra", 105.0, "Apple M2 Ultra"),
        ("Apple M3 Max", 50.0, "Apple M3 Max"),
        ("Apple M4 Pro", 35.0, "Apple M4 Pro"),
        ("Apple M4 Max", 55.0, "Apple M4 Max"),
        ("Apple M5 Max", None, None),  # not in the table: unknown, not the M5's or another Max's figure
        # no-break and thin spaces, as some firmware and copy-pasted configs carry them
        ("Apple\u00a0M1\u00a0Pro", 35.0, "Apple M1 Pro"),
        ("AMD\u00a0EPYC\u00a07763\u00a064-Core\u00a0Processor", 280.0, "AMD EPYC 7763"),
        ("Intel(R)\u00a0Xeon(R)\u202fGold\u20096248R\u00a0CPU\u00a0@\u00a03.00GHz", 205.0, "Intel Xeon Gold 6248R"),
        ("AMD\u00a0Ryzen\u00a07\u00a07840HS\u00a0w/\u00a0Radeon\u00a0780M\u00a0Graphics", 54.0, "AMD Ryzen 7 7840HS"),
    ],
)
def test_masked_and_unusual_names(model: str, expected: float | None, row: str | None) -> None:
    found = lookup_tdp(model)
    assert found == ((expected, row) if expected is not None else None)


@pytest.mark.asyncio
async def test_no_break_spaces_in_cpuinfo_are_plain_spaces_in_the_model(tmp_path: Path) -> None:
    proc = ProcTree(
        tmp_path, model="Intel(R)\u00a0Xeon(R)\u00a0Gold\u00a06248R\u00a0CPU\u00a0@\u00a03.00GHz", sockets=1
    )
    s, _ = await tdp_power(proc, 0.5)
    assert s.model == "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz"
    assert s.tdp_w == 205.0


def test_normalise() -> None:
    assert normalise("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz") == "intel xeon e5-2680 v4"


def test_load_curve_points_and_monotonic() -> None:
    assert load_factor(0.0) == pytest.approx(0.12)
    assert load_factor(0.5) == pytest.approx(0.75)
    assert load_factor(1.0) == pytest.approx(1.02)
    assert load_factor(0.3) == pytest.approx(0.32 + (0.75 - 0.32) * 0.5)
    values = [load_factor(i / 100) for i in range(101)]
    assert values == sorted(values)


async def read(s: Sensor, proc: ProcTree) -> tuple[Reading, ...]:
    """One read, given this tick's sample of the fixture's /proc taken now, as the monitor takes one per tick."""
    reader = HostReader(proc.root)
    try:
        return (await s.read(reader.sample())).readings
    finally:
        reader.close()


async def tdp_power(proc: ProcTree, util: float | list[float], **kw: object) -> tuple[TdpSensor, dict[str, float]]:
    clock = ManualClock()
    kw.setdefault("sysfs", proc.root / "sys")  # the fixture's: no DMI, so no cloud of the machine running the tests
    s = TdpSensor(proc.root, clock, **kw)  # type: ignore[arg-type]
    await s.start()
    await read(s, proc)
    clock.advance(10)
    proc.advance(10, util)
    return s, {r.device: r.joules / 10 for r in await read(s, proc)}


@pytest.mark.asyncio
async def test_half_load_on_a_205w_part(tmp_path: Path) -> None:
    s, watts = await tdp_power(ProcTree(tmp_path), 0.5)
    assert s.tdp_w == 205.0
    assert watts == {"cpu-0": pytest.approx(0.75 * 205, rel=0.01)}


@pytest.mark.asyncio
async def test_two_sockets_each_at_their_own_load(tmp_path: Path) -> None:
    _, watts = await tdp_power(ProcTree(tmp_path, sockets=2), [1.0, 0.0])
    assert watts["cpu-0"] == pytest.approx(1.02 * 205, rel=0.01)
    assert watts["cpu-1"] == pytest.approx(0.12 * 205, rel=0.01)


@pytest.mark.asyncio
async def test_guest_time_is_not_counted_twice(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path)
    clock = ManualClock()
    s = TdpSensor(proc.root, clock, sysfs=proc.root / "sys")
    await s.start()
    clock.advance(10)
    proc.advance(10, 0.5, guest_share=1.0)  # all busy time is a guest's: still 50 %, not 100 %
    assert (await read(s, proc))[0].joules / 10 == pytest.approx(0.75 * 205, rel=0.01)


@pytest.mark.asyncio
async def test_override_wins_and_unknown_warns_once(tmp_path: Path) -> None:
    _, watts = await tdp_power(ProcTree(tmp_path), 1.0, tdp_watts=100.0)
    assert watts["cpu-0"] == pytest.approx(102.0, rel=0.01)
    with capture_logs() as logs:
        unknown = ProcTree(tmp_path / "u", model="Mystery CPU 9000")
        s, watts = await tdp_power(unknown, 1.0)
        await read(s, unknown)
    assert s.tdp_w == 8.0  # 4 W per thread x 2 threads, not a whole 65 W socket
    assert watts["cpu-0"] == pytest.approx(8.0 * 1.02, rel=0.01)
    warnings = [e for e in logs if e["event"] == "cpu_power_model" and e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["model"] == "Mystery CPU 9000"
    assert warnings[0]["method"] == "per-thread-default"
    assert "cpu.tdp_watts" in warnings[0]["hint"]


@pytest.mark.asyncio
async def test_unreadable_stat_is_a_read_error_not_a_spike(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path)
    clock = ManualClock()
    s = TdpSensor(proc.root, clock, sysfs=proc.root / "sys")
    await s.start()
    (tmp_path / "stat").write_text("garbage\n")
    with pytest.raises(SensorReadError):
        await read(s, proc)
    proc.write_stat()
    clock.advance(10)
    proc.advance(10, 0.5)
    assert (await read(s, proc))[0].joules / 10 == pytest.approx(0.75 * 205, rel=0.01)


@given(st.integers(min_value=1, max_value=2**44), st.integers(min_value=1, max_value=2**44))
def test_ram_model_is_monotonic(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert ram_power_w(lo) <= ram_power_w(hi)


def test_ram_256gb_draws_more_than_192gb() -> None:
    assert ram_power_w(256 * 2**30) > ram_power_w(192 * 2**30)
    assert ram_power_w(8 * 2**30) == pytest.approx(3.0)


@pytest.mark.asyncio
async def test_ram_sensor_integrates(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path, mem_kb=64 * 1024 * 1024)
    clock = ManualClock()
    s = RamSensor(tmp_path, clock)
    await s.start()
    clock.advance(100)
    r = (await read(s, proc))[0]
    assert r.device == "ram-0"
    assert r.kind == "ram"
    assert not r.measured
    assert r.joules == pytest.approx(24.0 * 100)


def dmi(root: Path, vendor: str, product: str) -> Path:
    d = root / "sys/class/dmi/id"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sys_vendor").write_text(vendor + "\n")
    (d / "product_name").write_text(product + "\n")
    return root / "sys"


@pytest.mark.asyncio
async def test_vm_with_a_known_part_is_charged_its_vcpu_share(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path, model="AMD EPYC 7763 64-Core Processor", flags="fpu hypervisor", sockets=1)
    s, watts = await tdp_power(proc, 1.0)
    assert s.tdp_w == pytest.approx(280.0 * 2 / 128)  # 2 vCPUs of a 64-core, 128-thread, 280 W part
    assert watts["cpu-0"] == pytest.approx(280.0 * 2 / 128 * 1.02, rel=0.01)
    (info,) = (await s.read(HostReader(proc.root).sample())).device_info
    assert info.method == "tdp-vcpu-share"
    assert "2/128 threads" in info.detail
    assert "hypervisor" in info.detail


@pytest.mark.parametrize(
    ("vendor", "product", "lo", "hi"),
    [
        ("Amazon EC2", "HVM domU", 0.74, 3.5),  # a Xen-era EC2 instance: DMI names no type
        ("Google", "Google Compute Engine", 0.71, 4.26),
        ("Microsoft Corporation", "Virtual Machine", 0.78, 3.76),
    ],
)
@pytest.mark.asyncio
async def test_masked_model_on_a_cloud_uses_ccf_per_vcpu_coefficients(
    tmp_path: Path, vendor: str, product: str, lo: float, hi: float
) -> None:
    proc = ProcTree(tmp_path, model="AMD EPYC", flags="fpu hypervisor")  # what a 2-vCPU VM's cpuinfo may say
    sysfs = dmi(tmp_path, vendor, product)
    _, idle = await tdp_power(proc, 0.0, sysfs=sysfs)
    s, busy = await tdp_power(ProcTree(tmp_path / "b", model="AMD EPYC", flags="hypervisor"), 1.0, sysfs=sysfs)
    assert idle["cpu-0"] == pytest.approx(2 * lo, rel=0.01)  # CCF: min watts per vCPU at idle ...
    assert busy["cpu-0"] == pytest.approx(2 * hi, rel=0.01)  # ... max at full load, never a 65 W socket
    (info,) = (await s.read(HostReader(tmp_path / "b").sample())).device_info
    assert info.method == "ccf-vcpu"
    assert "Cloud Carbon Footprint" in info.detail


@pytest.mark.asyncio
async def test_unknown_model_on_a_vm_of_no_known_cloud_uses_4_w_per_thread(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path, model="QEMU Virtual CPU version 2.5+", flags="hypervisor", cpus_per_socket=4)
    s, watts = await tdp_power(proc, 0.5)
    assert s.tdp_w == 16.0
    assert watts["cpu-0"] == pytest.approx(16.0 * 0.75, rel=0.01)


@pytest.mark.asyncio
async def test_vm_is_one_device_whatever_its_physical_ids_say(tmp_path: Path) -> None:
    proc = ProcTree(tmp_path, model="AMD EPYC 7763 64-Core Processor", flags="hypervisor", sockets=2)
    _, watts = await tdp_power(proc, 1.0)
    assert set(watts) == {"cpu-0"}
    assert watts["cpu-0"] == pytest.approx(280.0 * 4 / 128 * 1.02, rel=0.01)


def test_container_quota_only_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    from carbond.sensors.cpuhost import container_quota

    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg/cpu.max").write_text("150000 100000\n")
    (tmp_path / "proc/self/cgroup").write_text("0::/\n")
    assert container_quota(tmp_path / "cg", tmp_path / "proc") == 1.5
    (tmp_path / "proc/self/cgroup").write_text("0::/system.slice/carbond.service\n")  # a service: the machine's
    assert container_quota(tmp_path / "cg", tmp_path / "proc") is None
    (tmp_path / "proc/self/cgroup").write_text("0::/\n")
    (tmp_path / "cg/cpu.max").write_text("max 100000\n")
    assert container_quota(tmp_path / "cg", tmp_path / "proc") is None


def test_embodied_share_of_a_vm_is_its_vcpus_over_the_parts_threads(tmp_path: Path) -> None:
    from carbond.builder import build_embodied
    from carbond.config import Config
    from carbond.sensors.cpuhost import vm_share

    vm = ProcTree(tmp_path / "vm", model="AMD EPYC 7763 64-Core Processor", flags="hypervisor", cpus_per_socket=4)
    assert vm_share(vm.root, tmp_path / "no-sys") == (
        4 / 128,
        "4 vCPUs / 128 threads of AMD EPYC 7763 64-Core Processor (cpuinfo hypervisor flag)",
    )  # the reason names the count, the part and the evidence of a VM
    masked = ProcTree(tmp_path / "masked", model="AMD EPYC", flags="hypervisor")
    share, why = vm_share(masked.root, tmp_path / "no-sys")
    assert share is None
    assert "does not name its cores" in why
    bare = ProcTree(tmp_path / "bare", model="AMD EPYC 7763 64-Core Processor")
    assert vm_share(bare.root, tmp_path / "no-sys") == (None, "")

    def rate(root: Path, **embodied: object) -> float:
        cfg = Config(paths={"procfs": root, "sysfs": tmp_path / "no-sys"}, embodied={"server_kg": 1000.0, **embodied})
        e = build_embodied(cfg, "FR", None)
        assert e is not None
        e.advance(0.0, {})
        return dict(e.advance(3600.0, {}))["server"]

    whole = rate(bare.root)
    assert rate(vm.root) == pytest.approx(whole * 4 / 128)  # not the whole server for a 4-vCPU VM
    assert rate(vm.root, share=0.5) == pytest.approx(whole * 0.5)  # an explicit share wins


@pytest.mark.asyncio
async def test_ec2_instance_type_from_dmi_uses_ccfs_microarchitecture_coefficients(tmp_path: Path) -> None:
    """A masked model on an m5.large (CCF: Skylake): Skylake's 0.65-4.26 W per vCPU, not AWS's 0.74-3.5 average."""
    sysfs = dmi(tmp_path, "Amazon EC2", "m5.large")
    _, idle = await tdp_power(
        ProcTree(tmp_path / "a", model="Intel(R) Xeon(R) Platinum", flags="hypervisor"), 0.0, sysfs=sysfs
    )
    s, busy = await tdp_power(
        ProcTree(tmp_path / "b", model="Intel(R) Xeon(R) Platinum", flags="hypervisor"), 1.0, sysfs=sysfs
    )
    assert idle["cpu-0"] == pytest.approx(2 * 0.65, rel=0.01)
    assert busy["cpu-0"] == pytest.approx(2 * 4.26, rel=0.01)
    (info,) = (await s.read(HostReader(tmp_path / "b").sample())).device_info
    assert info.method == "ccf-vcpu"
    assert "m5.large Skylake" in info.detail
    assert "per microarchitecture" in info.detail


def test_ccf_coefficients_average_several_microarchitectures_as_ccf_does() -> None:
    from carbond.sensors.cpuhost import InstanceType

    both = InstanceType("azure", "X", 2, 64, ("Cascade Lake", "Skylake"))
    assert both.watts_per_vcpu() == (
        pytest.approx((0.64 + 0.65) / 2),
        pytest.approx((3.97 + 4.26) / 2),
        "Cascade Lake/Skylake",
    )
    old = InstanceType("aws", "Y", 2, 64, ("Sandy Bridge", "Ivy Bridge", "Haswell"))
    assert old.watts_per_vcpu()[:2] == (2.17, 8.25)  # type: ignore[index]  # medians: Sandy Bridge's min, Ivy Bridge's max
    assert InstanceType("aws", "Z", 2, 64, ()).watts_per_vcpu() is None


@pytest.mark.parametrize(
    ("model", "arch"),
    [
        ("Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz", "Skylake"),  # EC2 m5
        ("Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz", "Cascade Lake"),  # EC2 m5 later
        ("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "Skylake"),
        ("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "Broadwell"),  # EC2 m4
        ("Intel(R) Xeon(R) CPU E5-2680 v2 @ 2.80GHz", "Ivy Bridge"),
        ("Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", "Sandy Bridge"),
        ("AMD EPYC 7571", "AMD EPYC 1st Gen"),
        ("AMD EPYC 7R32", "AMD EPYC 2nd Gen"),
        ("AMD EPYC 7R13 Processor", "AMD EPYC 3rd Gen"),
        ("Intel Xeon Processor (Cascadelake)", "Cascade Lake"),  # QEMU's named model
        ("Intel Core Processor (Haswell, no TSX)", "Haswell"),
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", None),  # Ice Lake: no CCF figure
        ("AMD EPYC 9R14", None),
        ("AMD EPYC", None),
    ],
)
def test_microarchitecture_from_the_model_name(model: str, arch: str | None) -> None:
    from carbond.sensors.cpuhost import CCF_WATTS_BY_MICROARCH, microarchitecture

    assert microarchitecture(model) == arch
    assert arch is None or arch in CCF_WATTS_BY_MICROARCH


@pytest.mark.asyncio
async def test_vm_of_no_known_cloud_whose_model_names_a_microarchitecture_uses_its_coefficients(
    tmp_path: Path,
) -> None:
    """A Skylake Xeon on a private KVM whose thread count the table lacks (Azure's 8171M: Intel names no core count
    in the model name), so no TDP share: CCF's Skylake 0.65-4.26 W per vCPU rather than 4 W per thread."""
    model = "Intel(R) Xeon(R) Platinum 8171M CPU @ 2.60GHz"
    _, idle = await tdp_power(ProcTree(tmp_path / "a", model=model, flags="fpu hypervisor"), 0.0)
    s, busy = await tdp_power(ProcTree(tmp_path / "b", model=model, flags="fpu hypervisor"), 1.0)
    assert idle["cpu-0"] == pytest.approx(2 * 0.65, rel=0.01)
    assert busy["cpu-0"] == pytest.approx(2 * 4.26, rel=0.01)
    (info,) = (await s.read(HostReader(tmp_path / "b").sample())).device_info
    assert info.method == "ccf-vcpu"
    assert "Skylake (from the model name" in info.detail


@pytest.mark.asyncio
async def test_vm_whose_part_the_table_sizes_is_charged_its_share_of_the_tdp(tmp_path: Path) -> None:
    """The table knows the Gold 6148's TDP (150 W) and threads (40): a 2-vCPU VM is charged 2/40 of the socket's
    TDP curve (0.12 idle, 1.02 busy), not its microarchitecture's range."""
    model = "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"
    _, idle = await tdp_power(ProcTree(tmp_path / "a", model=model, flags="fpu hypervisor"), 0.0)
    s, busy = await tdp_power(ProcTree(tmp_path / "b", model=model, flags="fpu hypervisor"), 1.0)
    assert idle["cpu-0"] == pytest.approx(0.12 * 150 * 2 / 40, rel=0.01)
    assert busy["cpu-0"] == pytest.approx(1.02 * 150 * 2 / 40, rel=0.01)
    (info,) = (await s.read(HostReader(tmp_path / "b").sample())).device_info
    assert info.method == "tdp-vcpu-share"
    assert "Intel Xeon Gold 6148 TDP 150 W x 2/40" in info.detail


@pytest.mark.asyncio
async def test_configured_instance_type_reaches_the_cpu_model_through_the_builder(tmp_path: Path) -> None:
    """GCP's DMI names no machine type and its cpuinfo masks the model number: `embodied.instance_type` (with the
    zone's cloud) gives the CPU model the type's microarchitecture (n2: Cascade Lake 0.64-3.97 W per vCPU) instead of
    GCP's average (0.71-4.26)."""
    from carbond.builder import context
    from carbond.config import Config
    from carbond.sensors.tdp import CpuSettings, create

    proc = ProcTree(tmp_path, model="Intel(R) Xeon(R) CPU @ 2.80GHz", flags="fpu hypervisor")
    sysfs = dmi(tmp_path, "Google", "Google Compute Engine")
    cfg = Config(
        paths={"procfs": proc.root, "sysfs": sysfs},
        intensity={"zone": "gcp:europe-west1"},
        embodied={"instance_type": "n2-standard-8"},
    )
    ctx = context(cfg, ManualClock())
    assert ctx.instance == ("gcp", "n2-standard-8")
    s = create(CpuSettings(), ctx)
    await s.start()
    (info,) = (await s.read(HostReader(proc.root).sample())).device_info
    assert info.method == "ccf-vcpu"
    assert "n2-standard-8 Cascade Lake 0.64-3.97" in info.detail
    unset = create(CpuSettings(), context(Config(paths={"procfs": proc.root, "sysfs": sysfs}), ManualClock()))
    await unset.start()
    (info,) = (await unset.read(HostReader(proc.root).sample())).device_info
    assert "gcp 0.71-4.26 W per vCPU" in info.detail
