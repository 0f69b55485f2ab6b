"""Sensors that cannot start or stop reading: no RAPL zone, NVML and amdsmi failing at init, finding no GPU or
failing a read, a backend whose start raises something unexpected. Each ends as a reason (the sensor is
unavailable and the next backend is tried) or as a failed read that is retried; none takes the daemon down."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from structlog.testing import capture_logs

from carbond.builder import SensorSet, start_sensors
from carbond.config import Config, PathsConfig
from carbond.errors import SensorReadError, SensorUnavailable
from carbond.procfs import HostSample
from carbond.sensors.amdsmi import AmdSmiSensor
from carbond.sensors.nvml import NvmlSensor
from carbond.sensors.rapl import RaplSensor
from carbond.testing.clock import ManualClock
from carbond.testing.powercap import PowercapTree, typical_intel

NO_HOST = HostSample(b"")


def fake_nvml(spec: dict[str, Any]) -> ModuleType:
    mod = importlib.import_module("carbond.testing.nvml_fake.pynvml")
    mod.nvmlShutdown()
    mod.configure(spec)
    return mod


def fake_amdsmi(spec: dict[str, Any]) -> ModuleType:
    mod = importlib.import_module("carbond.testing.amdsmi_fake.amdsmi")
    mod.amdsmi_shut_down()
    mod.configure(spec)
    return mod


def nv_gpu(i: int) -> dict[str, Any]:
    return {"name": "NVIDIA A100", "uuid": f"GPU-{i:08d}-aaaa-bbbb-cccc-dddddddddddd", "power_w": 250.0}


def amd_gpu(i: int, **kw: Any) -> dict[str, Any]:
    return {"name": "AMD Instinct MI250X", "uuid": f"{i:08x}-0000-1000-8000-000000000000", "power_w": 300.0, **kw}


async def started(cfg: Config) -> tuple[SensorSet, list[str]]:
    """The sensor set ``cfg`` gives, and the names of the sensors it started (closed again on the way out)."""
    async with contextlib.AsyncExitStack() as stack:
        result = await start_sensors(cfg, stack, ManualClock())
        names = [s.name for s in result.started]
    return result, names


# ---- RAPL ---------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_rapl_zone_falls_back_to_the_next_backend_with_the_reason(tmp_path: Path) -> None:
    PowercapTree(tmp_path / "sys")  # class/powercap exists, with no zone in it (a VM, a container)
    cfg = Config(sensors=["rapl", "fake"], paths=PathsConfig(sysfs=tmp_path / "sys"))
    result, names = await started(cfg)
    assert names == ["fake"]
    assert result.unavailable == {"rapl": f"no powercap RAPL zones under {tmp_path / 'sys'}"}


@pytest.mark.asyncio
async def test_rapl_zones_of_no_known_kind_are_no_zone(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path / "sys")
    tree.add_zone("gpu")  # not a package, core, uncore, dram or psys: not ours to add up
    tree.add_zone("some-future-zone")
    with pytest.raises(SensorUnavailable, match="no package, dram or psys zone under"):
        await RaplSensor(tmp_path / "sys", ManualClock()).start()


@pytest.mark.asyncio
async def test_a_rapl_zone_without_a_readable_name_is_skipped(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path / "sys")
    (tree.add_zone("package-0").path / "name").unlink()
    with pytest.raises(SensorUnavailable, match="no powercap RAPL zones"):
        await RaplSensor(tmp_path / "sys", ManualClock()).start()


@pytest.mark.asyncio
async def test_core_and_uncore_without_their_package_are_no_zone(tmp_path: Path) -> None:
    """Subzones are inside a package and never added up: alone they measure nothing of the node, so the sensor
    must not start and claim the cpu class (which would keep the models from measuring it)."""
    tree = typical_intel(tmp_path / "sys", dram=False)
    (tree.zones[0].path / "name").unlink()  # package-0 cannot be named; its core and uncore can
    with pytest.raises(SensorUnavailable, match="no package, dram or psys zone under"):
        await RaplSensor(tmp_path / "sys", ManualClock()).start()


@pytest.mark.asyncio
async def test_a_zone_unreadable_at_start_is_still_measured_once_it_reads(tmp_path: Path) -> None:
    clock = ManualClock()
    tree = typical_intel(tmp_path / "sys")
    pkg = tree.zones[0]
    pkg.corrupt("")  # a transient failure during start
    sensor = RaplSensor(tmp_path / "sys", clock)
    with capture_logs() as logs:
        await sensor.start()
    try:
        assert "package-0" not in {r.device for r in (await sensor.read(NO_HOST)).readings}
        pkg.restore()
        pkg.advance(10.0)
        clock.advance(1.0)
        first = {r.device: r.joules for r in (await sensor.read(NO_HOST)).readings}
        pkg.advance(10.0)
        clock.advance(1.0)
        second = {r.device: r.joules for r in (await sensor.read(NO_HOST)).readings}
    finally:
        await sensor.close()
    assert second["package-0"] - first["package-0"] == pytest.approx(10.0)
    assert [e["problem"] for e in logs if e["event"] == "rapl_read_rejected"] == ["read"]


# ---- NVML ---------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("spec", "devices", "reason"),
    [
        ({"gpus": []}, [], "NVML found no GPU"),
        ({"gpus": [nv_gpu(0)]}, [5], "NVML found no GPU matching ['5']"),
        ({"gpus": [nv_gpu(0)]}, ["GPU-ffffffff-no-such-gpu"], "cannot enumerate GPUs: Not Found"),
    ],
    ids=["no-gpu", "none-selected", "unknown-uuid"],
)
async def test_nvml_without_a_gpu_is_unavailable_and_shuts_nvml_down(
    spec: dict[str, Any], devices: list[str | int], reason: str
) -> None:
    nv = fake_nvml(spec)
    sensor = NvmlSensor(ManualClock(), devices=devices, module=nv)
    with pytest.raises(SensorUnavailable) as info:
        await sensor.start()
    assert info.value.reason == reason
    assert sensor.covers == frozenset()
    with pytest.raises(nv.NVMLError_Uninitialized):  # nvmlShutdown was called: NVML is not left initialised
        nv.nvmlDeviceGetCount()


@pytest.mark.asyncio
async def test_nvml_init_failure_through_the_builder_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({"gpus": [nv_gpu(0)], "missing": "driver"}))
    result, names = await started(Config(sensors=["nvml", "fake"]))
    assert names == ["fake"]
    assert result.unavailable == {"nvml": "nvmlInit failed: Driver Not Loaded (NVMLError_DriverNotLoaded)"}


@pytest.mark.asyncio
async def test_gpu_libraries_that_cannot_be_imported_are_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    result, names = await started(Config(sensors=["nvml", "amdsmi", "fake"]))
    assert names == ["fake"]
    assert result.unavailable["nvml"].startswith("nvidia-ml-py is not installed")
    assert result.unavailable["amdsmi"].startswith("the amdsmi module is not importable")


# ---- amdsmi -------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("gpus", [[], [amd_gpu(0, zero_die=True)]], ids=["no-gpu", "only-a-zero-die"])
async def test_amdsmi_without_a_gpu_reporting_power_is_unavailable(gpus: list[dict[str, Any]]) -> None:
    smi = fake_amdsmi({"gpus": gpus})
    sensor = AmdSmiSensor(ManualClock(), module=smi)
    with pytest.raises(SensorUnavailable, match="amdsmi found no GPU reporting power"):
        await sensor.start()
    with pytest.raises(smi.AmdSmiLibraryException):  # amdsmi_shut_down was called
        smi.amdsmi_get_processor_handles()


@pytest.mark.asyncio
async def test_amdsmi_init_failure_through_the_builder_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi({"gpus": [amd_gpu(0)], "missing": "driver"}))
    result, names = await started(Config(sensors=["amdsmi", "fake"]))
    assert names == ["fake"]
    assert result.unavailable["amdsmi"].startswith("amdsmi failed: ")
    assert "STATUS_DRIVER_NOT_LOADED" in result.unavailable["amdsmi"]


@pytest.mark.asyncio
async def test_amdsmi_read_errors_are_down_devices_then_recover() -> None:
    spec = {"gpus": [amd_gpu(0), amd_gpu(1)]}
    sensor = AmdSmiSensor(ManualClock(), module=fake_amdsmi(spec))
    await sensor.start()
    try:
        assert {r.device for r in (await sensor.read(NO_HOST)).readings} == {"gpu-0", "gpu-1"}
        spec["gpus"][1]["lost_for_s"] = 1e9  # gpu-1 fails every query from now on
        with capture_logs() as logs:
            one = await sensor.read(NO_HOST)
            again = await sensor.read(NO_HOST)
        assert [r.device for r in one.readings] == ["gpu-0"]  # the other goes on
        assert [(d.device, d.reason) for d in one.down] == [
            ("gpu-1", "AmdSmiLibraryException: Error code:\n\t6 | STATUS_DRM_ERROR")
        ]
        assert again.partial_errors == one.partial_errors + 1 >= 1  # each failed read counts
        assert [e["device"] for e in logs if e["event"] == "amdsmi_read_failed"] == ["gpu-1", "gpu-1"]
        spec["gpus"][0]["lost_for_s"] = 1e9  # now none can be read: a failed read, not a crash
        with pytest.raises(SensorReadError, match="no AMD GPU could be read"):
            await sensor.read(NO_HOST)
        for g in spec["gpus"]:
            del g["lost_for_s"]
        back = await sensor.read(NO_HOST)
        assert {r.device for r in back.readings} == {"gpu-0", "gpu-1"}
        assert back.down == ()
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_an_amdsmi_gpu_still_failing_at_its_retry_backs_off_further() -> None:
    clock = ManualClock()
    spec = {"gpus": [amd_gpu(0, lost_for_s=1e9)]}  # off the bus from the start
    sensor = AmdSmiSensor(clock, retry_secs=10.0, module=fake_amdsmi(spec))
    with capture_logs() as logs:
        await sensor.start()  # started: the GPU is down and retried, not the sensor unavailable
        with pytest.raises(SensorReadError):
            await sensor.read(NO_HOST)
        clock.advance(10.0)
        with pytest.raises(SensorReadError):
            await sensor.read(NO_HOST)  # its retry fails: down again, for twice as long
        clock.advance(10.0)
        del spec["gpus"][0]["lost_for_s"]
        with pytest.raises(SensorReadError):
            await sensor.read(NO_HOST)  # back on the bus, but not retried before its (doubled) time
        clock.advance(10.0)
        result = await sensor.read(NO_HOST)
    await sensor.close()
    assert [r.device for r in result.readings] == ["gpu-0"]
    assert [e["retry_in_s"] for e in logs if e["event"] == "gpu_down"] == [10.0, 20.0]
    assert [e["event"] for e in logs if e["event"] == "gpu_recovered"] == ["gpu_recovered"]


# ---- a start that raises something unexpected ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_backend_whose_start_raises_unexpectedly_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vendor library answering in a shape the backend does not expect (here a GPU without the field the fake
    library reads its name from: a KeyError inside amdsmi) must cost that backend, never the daemon."""
    broken = {"uuid": "0", "power_w": 300.0}  # no "name"
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi({"gpus": [broken]}))
    result, names = await started(Config(sensors=["amdsmi", "fake"]))
    assert names == ["fake"]
    assert result.unavailable == {"amdsmi": "failed to start: KeyError: 'name'"}
    assert result.explain() == ["amdsmi: failed to start: KeyError: 'name'"]
