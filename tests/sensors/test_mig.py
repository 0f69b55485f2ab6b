"""MIG: the physical GPU measured, its energy apportioned over its MIG devices (by GPM utilisation, else slices),
exact in every tick through reconfiguration, their processes attributed to their cgroups, and the figures rendered
by the exporter as devices of kind ``gpu_mig`` that never double count."""

from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from carbond.accounting import Books, account
from carbond.attribution.attributor import Attributor
from carbond.attribution.split import UNATTRIBUTED
from carbond.embodied import Embodied, EmbodiedConfig
from carbond.exporter.server import MetricsCache
from carbond.intensity import FixedIntensity
from carbond.model import Intensity, SensorRead
from carbond.monitor import Monitor
from carbond.procfs import HostReader, HostSample
from carbond.sensors.mig import apportion
from carbond.sensors.nvml import NvmlSensor
from carbond.testing.cgroupfs import CgroupTree, write_pid_cgroup
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree

A100 = "NVIDIA A100-SXM4-80GB"
PARENT_UUID = "GPU-0000000a-aaaa-bbbb-cccc-dddddddddddd"
NO_HOST = HostSample(b"")
POD = "kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/" + "c" * 64


def fake_nvml(spec: dict[str, Any], clock: ManualClock) -> ModuleType:
    mod = importlib.import_module("carbond.testing.nvml_fake.pynvml")
    mod.nvmlShutdown()
    mod.configure(spec, clock)
    return mod


def inst(gi: int, slices: int, **kw: Any) -> dict[str, Any]:
    """A MIG device of an A100 80GB: ``slices`` compute slices in GPU instance ``gi`` (compute instance 0)."""
    gb = {1: 10, 2: 20, 3: 40, 4: 40, 7: 80}[slices]
    return {
        "uuid": f"MIG-{gi:08d}-1111-2222-3333-444444444444",
        "gi": gi,
        "ci": 0,
        "gi_slices": slices,
        "profile": f"{slices}g.{gb}gb",
        "memory_mb": gb * 1024,
        **kw,
    }


def a100(mig: list[Any], watts: float = 280.0, **kw: Any) -> dict[str, Any]:
    return {"name": A100, "uuid": PARENT_UUID, "power_w": watts, "mig": mig, **kw}


async def read(s: NvmlSensor) -> SensorRead:
    return await s.read(NO_HOST)


async def mean_power(s: NvmlSensor, clock: ManualClock, seconds: float) -> dict[str, float]:
    """Mean power per device over the next ``seconds``, from the cumulative joules and times the sensor reports."""
    first = {r.device: r for r in (await read(s)).readings}
    clock.advance(seconds)
    return {
        r.device: (r.joules - first[r.device].joules) / (r.at - first[r.device].at)
        for r in (await read(s)).readings
        if r.device in first
    }


def test_apportion_is_exact_and_gives_nothing_without_weights() -> None:
    parts = apportion(0.3, {"a": 1.0, "b": 2.0, "c": 0.0}, "rest")
    assert math.fsum(parts.values()) == 0.3
    assert "c" not in parts
    assert parts["b"] == pytest.approx(0.2)
    assert apportion(5.0, {"a": 0.0}, "rest") == {"rest": 5.0}


@pytest.mark.asyncio
async def test_slice_weights_on_ampere_and_the_labels() -> None:
    clock = ManualClock()
    mod = fake_nvml({"gpus": [a100([inst(1, 1), inst(2, 2), None, inst(3, 3)])]}, clock)
    s = NvmlSensor(clock, module=mod)
    await s.start()
    with capture_logs() as logs:
        await read(s)
        watts = await mean_power(s, clock, 10.0)
    assert watts["gpu-0"] == pytest.approx(280.0)  # the physical GPU, measured
    assert watts["gpu-0-mig-gi1-ci0"] == pytest.approx(280.0 / 7)
    assert watts["gpu-0-mig-gi2-ci0"] == pytest.approx(280.0 * 2 / 7)
    assert watts["gpu-0-mig-gi3-ci0"] == pytest.approx(280.0 * 3 / 7)
    assert watts["gpu-0-mig-unallocated"] == pytest.approx(280.0 / 7)  # the slice no MIG device holds
    by_slices = [e for e in logs if e["event"] == "mig_weights_by_slices"]
    assert len(by_slices) == 1  # one line, not one per tick
    assert "GPM not supported" in by_slices[0]["reason"]
    result = await read(s)
    kinds = {r.device: (r.kind, r.in_node_total, r.measured) for r in result.readings}
    assert kinds["gpu-0"] == ("gpu", True, True)
    assert kinds["gpu-0-mig-gi2-ci0"] == ("gpu_mig", False, False)  # apportioned, outside the node total
    info = {i.device: i for i in result.device_info}
    gi2 = info["gpu-0-mig-gi2-ci0"]
    assert gi2.uuid == "MIG-00000002-1111-2222-3333-444444444444"
    assert gi2.model == f"{A100} MIG 2g.20gb"
    assert gi2.method == "apportioned by slices"
    assert gi2.detail == "parent=gpu-0 gi=2 ci=0 profile=2g.20gb slices=2/7"
    assert (info["gpu-0"].uuid, info["gpu-0"].method) == (PARENT_UUID, "energy counter")
    assert info["gpu-0-mig-unallocated"].detail == "parent=gpu-0 slices=1/7"
    await s.close()


@pytest.mark.asyncio
async def test_utilisation_weights_through_gpm_else_slices_when_all_idle() -> None:
    clock = ManualClock()
    spec = a100([inst(1, 1, sm_util=80.0), inst(2, 2, sm_util=10.0), inst(3, 4, sm_util=0.0)], gpm=True)
    mod = fake_nvml({"gpus": [spec]}, clock)
    s = NvmlSensor(clock, module=mod)
    await s.start()
    await read(s)
    watts = await mean_power(s, clock, 5.0)
    # weights: slices x the instance's SM utilisation = 0.8, 0.2, 0; unallocated slices weigh nothing
    assert watts["gpu-0-mig-gi1-ci0"] == pytest.approx(280.0 * 0.8)
    assert watts["gpu-0-mig-gi2-ci0"] == pytest.approx(280.0 * 0.2)
    assert watts["gpu-0-mig-gi3-ci0"] == pytest.approx(0.0)
    assert watts["gpu-0-mig-unallocated"] == pytest.approx(0.0)
    clock.advance(1.0)
    info = {i.device: i.method for i in (await read(s)).device_info}
    assert info["gpu-0-mig-gi1-ci0"] == "apportioned by utilisation"
    for m in spec["mig"]:
        m["sm_util"] = 0.0  # every instance idle: by slices
    watts = await mean_power(s, clock, 5.0)
    assert watts["gpu-0-mig-gi3-ci0"] == pytest.approx(280.0 * 4 / 7)
    assert watts["gpu-0-mig-unallocated"] == pytest.approx(0.0)  # 1 + 2 + 4 slices: all held
    await s.close()


@pytest.mark.asyncio
async def test_split_sums_to_the_parent_every_tick_through_reconfiguration() -> None:
    """Instances created and destroyed between ticks (and one re-created under the same ids): per tick, the MIG
    devices' energy deltas (as accounting takes them) sum to the parent's, and no counter ever goes back."""
    clock = ManualClock()
    mig = [
        inst(1, 1, sm_util=50.0),
        inst(2, 2, sm_util=20.0, exists_until_s=3.5),
        inst(3, 3, exists_from_s=2.5, sm_util=90.0),
        inst(5, 1, exists_from_s=1.5, exists_until_s=4.5, sm_util=5.0),
        inst(5, 1, exists_from_s=6.5, uuid="MIG-00000005-9999-2222-3333-444444444444"),  # same ids, new instance
    ]
    for gpm in (False, True):
        mod = fake_nvml({"gpus": [a100(mig, gpm=gpm)]}, clock)
        s = NvmlSensor(clock, module=mod)
        await s.start()
        books = Books()
        seen: list[set[str]] = []
        for _ in range(9):
            result = await read(s)
            before = books.devices
            books, tick = account(books, [("nvml", result.readings)], 1.0, None)
            after = books.devices
            delta = {
                key[1]: b.energy_j_total - (before[key].energy_j_total if key in before else 0.0)
                for key, b in after.items()
            }
            assert all(d >= 0 for d in delta.values())  # no counter goes back
            mig_sum = math.fsum(d for name, d in delta.items() if "-mig-" in name)
            assert mig_sum == pytest.approx(delta["gpu-0"], rel=1e-12, abs=1e-9)
            assert tick.node_j == pytest.approx(delta["gpu-0"], rel=1e-12, abs=1e-9)  # MIG devices: not node-counted
            assert set(tick.by_gpu) <= {"gpu-0"}  # MIG devices are not split again by attribution
            seen.append({r.device.split("-")[3] for r in result.readings if "-mig-gi" in r.device})
            clock.advance(1.0)
        present = {name: [name in devices for devices in seen] for name in ("gi2", "gi3", "gi5")}
        assert present["gi3"][2:4] == [False, True]  # created between ticks 2 and 3
        assert present["gi2"][3:5] == [True, False]  # destroyed between ticks 3 and 4
        assert present["gi5"][4:8] == [True, False, False, True]  # destroyed, then created again
        total = sum(b.energy_j_total for k, b in books.devices.items() if "-mig-" in k[1])
        assert total == pytest.approx(books.devices[("nvml", "gpu-0")].energy_j_total, rel=1e-12)
        await s.close()


@pytest.mark.asyncio
async def test_nvml_errors_on_mig_calls_degrade_to_slices_with_one_log_line() -> None:
    clock = ManualClock()
    spec = a100([inst(1, 1, sm_util=90.0), inst(2, 2, sm_util=0.0)], gpm=True)
    spec["errors"] = {"nvmlGpmMigSampleGet": "no_permission"}
    s = NvmlSensor(clock, module=fake_nvml({"gpus": [spec]}, clock))
    await s.start()
    with capture_logs() as logs:
        await read(s)
        for _ in range(3):
            watts = await mean_power(s, clock, 2.0)
        assert watts["gpu-0-mig-gi1-ci0"] == pytest.approx(280.0 / 7)  # by slices
        spec["errors"] = {}  # permission back: utilisation again, after a sample to compare with
        await mean_power(s, clock, 2.0)
        watts = await mean_power(s, clock, 2.0)
        assert watts["gpu-0-mig-gi1-ci0"] == pytest.approx(280.0)
        spec["errors"] = {"nvmlDeviceGetMigDeviceHandleByIndex": "unknown"}  # cannot list: the known ones are kept
        for _ in range(3):
            watts = await mean_power(s, clock, 2.0)
        assert watts["gpu-0-mig-gi1-ci0"] == pytest.approx(280.0)
    events = [e["event"] for e in logs]
    assert events.count("mig_weights_by_slices") == 1
    assert [e["reason"] for e in logs if e["event"] == "mig_weights_by_slices"] == [
        "NVMLError_NoPermission: Insufficient Permissions"
    ]
    assert events.count("mig_weights_by_utilisation") == 1
    assert events.count("mig_devices_unreadable") == 1
    await s.close()


@pytest.mark.asyncio
async def test_gpus_without_mig_are_unchanged() -> None:
    clock = ManualClock()
    old = {"name": "Tesla V100-SXM2-16GB", "uuid": "GPU-1", "power_w": 200.0, "processes": {"11": 30, "12": 10}}
    off = {**a100([]), "uuid": "GPU-2", "mig_mode": False, "processes": {"21": 50}}
    mod = fake_nvml({"gpus": [old, off]}, clock)
    s = NvmlSensor(clock, module=mod)
    await s.start()
    await read(s)
    clock.advance(1.0)
    result = await read(s)
    assert [(r.device, r.kind, r.in_node_total) for r in result.readings] == [
        ("gpu-0", "gpu", True),
        ("gpu-1", "gpu", True),
    ]
    assert [i.device for i in result.device_info] == ["gpu-0", "gpu-1"]
    assert result.process_shares == {"gpu-0": {11: 0.75, 12: 0.25}, "gpu-1": {21: 1.0}}
    await s.close()


def test_the_fake_answers_mig_calls_as_nvml_does() -> None:
    clock = ManualClock()
    nv = fake_nvml({"gpus": [a100([inst(1, 1, processes={"7": 0}), None])]}, clock)
    nv.nvmlInit()
    parent = nv.nvmlDeviceGetHandleByIndex(0)
    assert nv.nvmlDeviceGetMigMode(parent) == [nv.NVML_DEVICE_MIG_ENABLE, nv.NVML_DEVICE_MIG_ENABLE]
    assert nv.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    with pytest.raises(nv.NVMLError_NotFound):
        nv.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)  # an empty slot
    assert (nv.nvmlDeviceIsMigDeviceHandle(mig), nv.nvmlDeviceIsMigDeviceHandle(parent)) == (1, 0)
    assert nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)) == PARENT_UUID
    assert (nv.nvmlDeviceGetGpuInstanceId(mig), nv.nvmlDeviceGetComputeInstanceId(mig)) == (1, 0)
    with pytest.raises(nv.NVMLError_NotSupported):
        nv.nvmlDeviceGetGpuInstanceId(parent)
    for call in (nv.nvmlDeviceGetTotalEnergyConsumption, nv.nvmlDeviceGetPowerUsage):
        with pytest.raises(nv.NVMLError_NotSupported):
            call(mig)  # energy and power: the physical GPU's only
    with pytest.raises(nv.NVMLError_NotSupported):
        nv.nvmlDeviceGetUtilizationRates(parent)  # not on a MIG-enabled GPU
    with pytest.raises(nv.NVMLError_NotSupported):
        nv.nvmlDeviceGetProcessUtilization(mig, 0)
    (proc,) = nv.nvmlDeviceGetComputeRunningProcesses(parent)
    assert (proc.pid, proc.gpuInstanceId, proc.computeInstanceId) == (7, 1, 0)
    assert nv.nvmlDeviceGetHandleByUUID(inst(1, 1)["uuid"]).mig is not None
    nv.nvmlShutdown()


@pytest.mark.asyncio
async def test_mig_processes_reach_their_cgroups_and_the_exporter(tmp_path: Path) -> None:
    """Through the monitor, attribution and /metrics: a pod's process on one MIG device and a service's two on
    another get their devices' shares; the MIG devices render as carbond_device_* of kind gpu_mig; the node and the
    embodied emissions count the physical GPU once."""
    clock = ManualClock()
    mig = [inst(1, 1, processes={"4242": 0}), inst(2, 2, processes={"777": 0, "778": 0}), inst(3, 3)]
    s = NvmlSensor(clock, module=fake_nvml({"gpus": [a100(mig, watts=350.0)]}, clock))
    proc = ProcTree(tmp_path / "proc", sockets=1, cpus_per_socket=2)
    tree = CgroupTree(tmp_path / "cg", "v2")
    tree.add(POD, cpus=0.1)
    tree.add("system.slice/train.service", cpus=0.1)
    write_pid_cgroup(tmp_path / "proc", 4242, POD)
    for pid in (777, 778):
        write_pid_cgroup(tmp_path / "proc", pid, "system.slice/train.service")
    mon = Monitor(
        [s],
        host="h",
        interval_s=10,
        pue=1.0,
        intensity=FixedIntensity(Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)),
        sensor_timeout_s=5,
        clock=clock,
        wall_clock=time.time,
        attributor=Attributor(tmp_path / "cg", tmp_path / "proc", clock=clock),
        host_reader=HostReader(tmp_path / "proc"),
        embodied=Embodied(EmbodiedConfig(), 1000.0),
    )
    await s.start()
    await mon.tick()
    for _ in range(2):
        clock.advance(10)
        proc.advance(10, 0.1)
        tree.advance(10)
        snap = await mon.tick()
    gpu = {cg.cgroup: w for cg in snap.cgroups for k, w, _ in cg.kinds if k == "gpu" and w is not None}
    assert gpu[POD] == pytest.approx(350.0 / 7)
    assert gpu["system.slice/train.service"] == pytest.approx(350.0 * 2 / 7)
    assert gpu[UNATTRIBUTED] == pytest.approx(350.0 * 4 / 7)  # gi3 (no process) and the unallocated slice
    assert snap.node.power_w == pytest.approx(350.0)  # the parent only
    embodied_devices = [d for d, _ in snap.node.embodied_g_total]
    assert [d for d in embodied_devices if "gpu" in d] == ["gpu-0"]
    body = MetricsCache(lambda: snap).body(False, gzipped=False)
    assert body is not None
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    power = {s.labels["device"]: s for s in fams["carbond_device_power_watts"].samples}
    assert power["gpu-0-mig-gi2-ci0"].labels["kind"] == "gpu_mig"
    assert power["gpu-0-mig-gi2-ci0"].value == pytest.approx(100.0)
    by_kind: dict[str, float] = {}
    for sample in fams["carbond_device_power_watts"].samples:
        by_kind[sample.labels["kind"]] = by_kind.get(sample.labels["kind"], 0.0) + sample.value
    assert by_kind == {"gpu": pytest.approx(350.0), "gpu_mig": pytest.approx(350.0)}  # a kind of their own
    info = {s.labels["device"]: s.labels for s in fams["carbond_device_info"].samples}
    assert info["gpu-0-mig-gi1-ci0"]["uuid"] == "MIG-00000001-1111-2222-3333-444444444444"
    assert "profile=1g.10gb" in info["gpu-0-mig-gi1-ci0"]["detail"]
    embodied = {s.labels["device"] for s in fams["carbond_embodied_emissions_grams"].samples}
    assert not [d for d in embodied if "-mig-" in d]
