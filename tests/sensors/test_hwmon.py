from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from structlog.testing import capture_logs

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import Reading
from carbond.procfs import HostSample
from carbond.sensors.base import Context, Paths
from carbond.sensors.hwmon import BACKEND, HwmonSettings, role
from carbond.sensors.platform import PlatformSensor
from carbond.testing.clock import ManualClock
from carbond.testing.hwmon import HwmonTree
from tests.harness.wait import eventually_async

NO_HOST = HostSample(b"")
METER = "power_meter-hwmon0-power1"


async def started(sysfs: Path, clock: ManualClock, **kw: object) -> PlatformSensor:
    """The sensor with a poll period long enough that the background poller never runs: the test polls."""
    settings = HwmonSettings.model_validate({"interval_s": 3600, **kw})
    s = BACKEND.build(settings, Context(paths=Paths(sysfs=sysfs), clock=clock))
    assert isinstance(s, PlatformSensor)
    await s.start()
    return s


async def poll(s: PlatformSensor, clock: ManualClock, dt: float = 10.0) -> None:
    clock.advance(dt)
    await s._poll_once()


async def readings(s: PlatformSensor) -> dict[str, Reading]:
    return {r.device: r for r in (await s.read(NO_HOST)).readings}


async def joules(s: PlatformSensor) -> dict[str, float]:
    return {d: r.joules for d, r in (await readings(s)).items()}


@pytest.mark.asyncio
async def test_power_meter_average_over_its_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    tree = HwmonTree(tmp_path)
    meter = tree.power_meter(watts=180.0, interval_ms=1000)
    tree.pmbus_psu()  # the meter already measures the whole system: the PSUs are not added to it
    s = await started(tmp_path, clock)
    assert s.found.startswith("ACPI power meter hwmon0")
    first = (await readings(s))[METER]
    assert (first.kind, first.joules, first.baseline, first.in_node_total) == ("platform", 0.0, True, False)
    meter.channel("power1_average").set_watts(200.0)
    await poll(s, clock, 10.0)
    r = (await readings(s))[METER]
    assert set(await readings(s)) == {METER}
    assert (r.joules, r.at, r.baseline) == (2000.0, clock.now, False)  # the average times the time since the last
    info = (await s.read(NO_HOST)).device_info
    assert [i.method for i in info] == ["device average"]
    await s.close()


@pytest.mark.asyncio
async def test_two_psus_summed_and_their_outputs_ignored(tmp_path: Path) -> None:
    clock = ManualClock()
    tree = HwmonTree(tmp_path)
    tree.pmbus_psu(pin_w=250.0, pout_w=230.0)
    psu2 = tree.pmbus_psu(pin_w=300.0, pout_w=280.0, name="ipsps1", bus=4)
    tree.amdgpu()
    s = await started(tmp_path, clock)
    assert "PMBus power-supply inputs of hwmon0 (pmbus), hwmon1 (ipsps1)" in s.found
    psu2.channel("pin").set_watts(320.0)
    await poll(s, clock, 10.0)
    got = await joules(s)
    assert got == {"psu-hwmon0-pin": 2500.0, "psu-hwmon1-pin": 3100.0}  # trapezoid 300 -> 320 W over 10 s
    assert sum(got.values()) == 5600.0  # never 2500 + 2300 (pout) nor the GPU's 95 W
    await s.close()


@pytest.mark.asyncio
async def test_output_channel_never_counted_even_when_named(tmp_path: Path) -> None:
    clock = ManualClock()
    HwmonTree(tmp_path).pmbus_psu()
    s = await started(tmp_path, clock, devices=["pmbus"])
    assert set(await joules(s)) == {"psu-hwmon0-pin"}
    await s.close()
    with pytest.raises(SensorUnavailable, match="'pout1' matches no usable chip"):
        await started(tmp_path, clock, devices=["pout1"])
    assert [role(x) for x in ("pin", "Power In", "PIN", "pin2", "pout1", "Power Out", "PPT")] == [
        "input",
        "input",
        "input",
        "input",
        "output",
        "output",
        "",
    ]


@pytest.mark.asyncio
async def test_cpu_gpu_and_disk_chips_are_never_the_platform(tmp_path: Path) -> None:
    tree = HwmonTree(tmp_path)
    tree.amdgpu()
    tree.cpu_energy(name="amd_energy")
    tree.cpu_energy(name="zenpower")
    tree.nvme()
    vr = tree.add_chip("xdpe12284", "platform/i2c-5/5-0060")  # a CPU voltage regulator: its "pin" feeds one CPU
    vr.power(1, 120.0, label="pin")
    with pytest.raises(SensorUnavailable) as err:
        await started(tmp_path, ManualClock())
    assert "hwmon0 amdgpu (component)" in err.value.reason
    assert "name one in hwmon.devices" in err.value.reason
    for name in ("amdgpu", "k10temp", "zenpower", "nvme"):
        with pytest.raises(pydantic.ValidationError, match="never the whole machine"):
            HwmonSettings(devices=[name])
    s = await started(tmp_path, ManualClock(), devices=["xdpe12284"])  # named: the user says it is the platform
    assert set(await joules(s)) == {"xdpe12284-hwmon4-pin"}
    await s.close()


@pytest.mark.asyncio
async def test_energy_counter_preferred_and_its_reset_gives_no_spike(tmp_path: Path) -> None:
    clock = ManualClock()
    chip = HwmonTree(tmp_path).add_chip("ina238", "platform/i2c-1/1-0040")  # a shunt monitor on the board's input
    chip.power(1, 48.0)
    counter = chip.energy(1, 5000.0)
    s = await started(tmp_path, clock, devices=["ina238"])
    assert set(await joules(s)) == {"ina238-hwmon0-energy1"}  # its power channel is not a second device
    counter.advance_joules(480.0)
    await poll(s, clock, 10.0)
    assert (await joules(s))["ina238-hwmon0-energy1"] == 480.0
    counter.set_joules(3.0)  # the counter restarted (driver reloaded)
    with capture_logs() as logs:
        await poll(s, clock, 10.0)
    assert s.rejected["counter_reset"] == 1
    assert [e["reason"] for e in logs if e["event"] == "platform_reading_failed"] == ["counter_reset"]
    r = (await readings(s))["ina238-hwmon0-energy1"]
    assert (r.joules, r.baseline) == (480.0, True)  # a new baseline: nothing for that interval, never a spike
    counter.advance_joules(500.0)
    await poll(s, clock, 10.0)
    assert (await joules(s))["ina238-hwmon0-energy1"] == 980.0
    await s.close()


@pytest.mark.asyncio
async def test_unreadable_file_is_an_error_then_recovers(tmp_path: Path) -> None:
    clock = ManualClock()
    psu = HwmonTree(tmp_path).pmbus_psu(pin_w=250.0)
    s = await started(tmp_path, clock)
    pin = psu.channel("pin")
    pin.break_()  # EISDIR for root too (a mode-000 file would not stop a test running as root)
    with capture_logs() as logs:
        await poll(s, clock, 10.0)
    assert s.errors == 1
    assert "cannot read" in logs[0]["detail"]
    assert "power1_input" in logs[0]["detail"]
    assert (await joules(s))["psu-hwmon0-pin"] == 0.0
    clock.advance(9000.0)  # past 2.5 poll periods without a reading: down, the read says why
    with pytest.raises(SensorReadError, match="cannot read"):
        await s.read(NO_HOST)
    pin.restore()
    await poll(s, clock, 1.0)
    r = (await readings(s))["psu-hwmon0-pin"]
    assert (r.joules, r.baseline) == (0.0, True)  # the gap gives no energy
    await poll(s, clock, 2.0)
    assert (await joules(s))["psu-hwmon0-pin"] == 500.0
    await s.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0\n", "zero"),
        ("65535000000\n", "implausible"),  # 65535 W: an all-ones register
        ("-5000000\n", "negative"),
        ("garbage\n", "format"),
        ("", "format"),
    ],
)
async def test_bad_values_are_rejected_and_never_integrated(tmp_path: Path, text: str, reason: str) -> None:
    clock = ManualClock()
    meter = HwmonTree(tmp_path).power_meter(watts=150.0)
    s = await started(tmp_path, clock)
    meter.channel("power1_average").corrupt(text)
    await poll(s, clock, 10.0)
    assert s.rejected == {reason: 1}
    assert (await joules(s))[METER] == 0.0
    meter.channel("power1_average").restore()
    await poll(s, clock, 10.0)
    assert (await joules(s))[METER] == 150.0 * 20  # the good average over the time since the last good sample
    await s.close()


@pytest.mark.asyncio
async def test_bad_value_at_start_makes_the_sensor_unavailable(tmp_path: Path) -> None:
    HwmonTree(tmp_path).power_meter(watts=0.0)
    with pytest.raises(SensorUnavailable, match="no usable power reading"):
        await started(tmp_path, ManualClock())


@pytest.mark.asyncio
async def test_symlinked_class_is_walked_once_and_old_abi_read(tmp_path: Path) -> None:
    tree = HwmonTree(tmp_path)
    meter = tree.power_meter()
    tree.alias(meter, "hwmon7")
    s = await started(tmp_path, ManualClock())
    assert list(await joules(s)) == [METER]
    await s.close()
    old = tmp_path / "old"
    dev = HwmonTree(old).add_chip("power_meter", "LNXSYSTM:00/ACPI000D:00")
    dev.power(1, 99.0, average=True, interval_ms=500)
    for f in dev.path.iterdir():  # the old ABI: attributes in hwmonN/device, hwmonN itself empty
        if f.name != "device":
            f.rename(dev.path.parent.parent / f.name)
    s = await started(old, ManualClock())
    assert list(await joules(s)) == [METER]
    await s.close()


@pytest.mark.asyncio
async def test_missing_class_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SensorUnavailable, match="no hwmon class"):
        await started(tmp_path, ManualClock())


@pytest.mark.asyncio
async def test_read_stuck_in_the_kernel_times_out_without_piling_threads(tmp_path: Path) -> None:
    clock = ManualClock()
    psu = HwmonTree(tmp_path).pmbus_psu(pin_w=100.0)
    s = await started(tmp_path, clock, timeout_s=0.2)
    pin = psu.channel("pin")
    pin.hang()
    try:
        with capture_logs() as logs:
            await poll(s, clock, 1.0)
            await poll(s, clock, 1.0)  # the first read still blocks: this one waits for it, never a second thread
        assert s.errors == 2
        assert [e["reason"] for e in logs] == ["timeout"]  # logged once per change of reason
    finally:
        pin.release()  # a stuck worker thread would keep the test process from exiting

    async def reads_again() -> bool:
        await poll(s, clock, 1.0)
        return (await readings(s))["psu-hwmon0-pin"].joules > 0

    await eventually_async(reads_again, what="hwmon reads after the stuck read returns")
    await s.close()


@pytest.mark.asyncio
async def test_background_poller_integrates_on_its_own(tmp_path: Path) -> None:
    HwmonTree(tmp_path).power_meter(watts=100.0)
    s = BACKEND.build(HwmonSettings(interval_s=0.5), Context(paths=Paths(sysfs=tmp_path)))
    await s.start()
    assert isinstance(s, PlatformSensor)
    assert s.interval_s == 1.0

    async def integrated() -> float:
        r = (await s.read(NO_HOST)).readings[0]
        return r.joules

    first = await eventually_async(integrated, what="a poll after the first")
    assert first > 0
    await s.close()
