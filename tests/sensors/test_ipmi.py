"""The ipmi platform sensor against OpenIPMI's ipmi_sim (lanplus, SDR) and a DCMI fake (ipmi_sim has no DCMI)."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import pytest
from structlog.testing import capture_logs

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import Reading
from carbond.procfs import HostSample
from carbond.sensors.base import Context
from carbond.sensors.ipmi import BACKEND, IpmiSettings, IpmiSource
from carbond.sensors.ipmi_dcmi import DcmiUnsupported, SdrSensor, decode_power_reading, select_sensors
from carbond.sensors.platform import PlatformSensor, Rejected, Sample
from carbond.testing.clock import ManualClock
from carbond.testing.dcmi_fake import FakeBmc, power_reading_response
from carbond.testing.ipmi_sim import IpmiSim, SimSensor
from tests.harness.tools import require_tool
from tests.harness.wait import eventually_async

NO_HOST = HostSample(b"")
POWER = SimSensor(0x10, "Pwr Consumption", raw=120)  # M = 2: 240 W
INLET = SimSensor(0x11, "Inlet Temp", raw=22, sensor_type=0x01, unit=1, m=1)  # degrees C


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[IpmiSim]:
    binary = require_tool("ipmi_sim", "openipmi")
    require_tool("ipmitool", "ipmitool")
    with IpmiSim(tmp_path / "bmc", [POWER, INLET], binary=binary) as bmc:
        yield bmc


def lan(sim: IpmiSim, **kw: object) -> IpmiSettings:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": sim.port,
        "username": sim.username,
        "password_file": sim.password_file,
        "interval_s": 1.0,
    }
    return IpmiSettings.model_validate(base | kw)


async def readings(s: PlatformSensor) -> dict[str, Reading]:
    return {r.device: r for r in (await s.read(NO_HOST)).readings}


async def rate_between_reads(s: PlatformSensor) -> float | None:
    """Mean watts between two successive new readings (over the interval they report), None until two exist."""
    first = (await readings(s))["bmc"]
    second: Reading = await eventually_async(lambda: _newer(s, first.at), what="a newer reading")
    if second.baseline:
        return None
    return (second.joules - first.joules) / (second.at - first.at)


async def _newer(s: PlatformSensor, at: float) -> Reading | None:
    r = (await readings(s))["bmc"]
    return r if r.at > at else None


# -- ipmi_sim: the SDR path over lanplus


@pytest.mark.asyncio
async def test_sdr_power_follows_the_bmc_and_matches_ipmitool(sim: IpmiSim) -> None:
    s = BACKEND.build(lan(sim), Context())
    assert isinstance(s, PlatformSensor)
    await s.start()
    try:
        assert "SDR sensor 'Pwr Consumption'" in s.found
        assert "the only sensor in watts" in s.found
        assert "DCMI power reading unusable" in s.found  # ipmi_sim has no DCMI: the SDR path is the fallback
        first = (await readings(s))["bmc"]
        assert first.kind == "platform"
        assert first.baseline
        assert sim.ipmitool_reading("Pwr Consumption") == 240.0
        assert await eventually_async(lambda: _rate_is(s, 240.0), what="240 W") == pytest.approx(240.0)

        sim.set_raw(POWER.number, 150)  # 300 W
        assert sim.ipmitool_reading("Pwr Consumption") == 300.0
        assert await eventually_async(lambda: _rate_is(s, 300.0), what="300 W") == pytest.approx(300.0)
        assert s.errors == 0
        assert not s.rejected
    finally:
        await s.close()


async def _rate_is(s: PlatformSensor, watts: float) -> float | None:
    rate = await rate_between_reads(s)
    return rate if rate is not None and abs(rate - watts) < 1e-6 else None


@pytest.mark.asyncio
async def test_zero_watts_from_the_bmc_is_rejected_and_adds_no_energy(sim: IpmiSim) -> None:
    s = BACKEND.build(lan(sim), Context())
    assert isinstance(s, PlatformSensor)
    await s.start()
    try:
        sim.set_raw(POWER.number, 0)
        await eventually_async(lambda: _read_error(s, "zero: 0 W"), what="the device down, saying why")
        assert s.rejected["zero"] >= 1
        sim.set_raw(POWER.number, 100)  # 200 W
        back = await eventually_async(lambda: _newer(s, 0.0), what="a reading again", ignore=(SensorReadError,))
        assert back.baseline  # the time at 0 W gives no energy: the monitor takes this reading as a new start
        await eventually_async(lambda: _rate_is(s, 200.0), what="recovered at 200 W")
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_wrong_password_is_a_clear_error_without_any_password(sim: IpmiSim, tmp_path: Path) -> None:
    wrong = "Wr0ngSecret77"
    (bad := tmp_path / "wrong").write_text(wrong + "\n")
    s = BACKEND.build(lan(sim, password_file=bad), Context())
    with capture_logs() as logs, pytest.raises(SensorUnavailable) as err:
        await s.start()
    assert "Incorrect password" in err.value.reason
    assert f"127.0.0.1:{sim.port}" in err.value.reason
    for text in (str(err.value), repr(logs)):
        assert wrong not in text
        assert sim.password not in text


@pytest.mark.asyncio
async def test_a_bmc_that_stops_answering_times_out_then_recovers(sim: IpmiSim) -> None:
    s = BACKEND.build(lan(sim, timeout_s=2.0), Context())
    assert isinstance(s, PlatformSensor)
    with capture_logs() as logs:
        await s.start()
        try:
            sim.pause()
            timeout = await eventually_async(lambda: _logged(logs, "timeout"), what="a timeout logged")
            assert timeout["detail"] == "no answer within 2.0 s"
            assert s.errors >= 1
            await eventually_async(lambda: _read_error(s, "last reading"), what="the device down")
            sim.resume()
            recovered = await eventually_async(lambda: _rate_is(s, 240.0), what="recovered", ignore=(SensorReadError,))
            assert recovered == pytest.approx(240.0)
        finally:
            sim.resume()
            await s.close()
    assert any(e["event"] == "platform_reading_recovered" for e in logs)
    assert sim.password not in repr(logs)


def _logged(logs: Sequence[Mapping[str, Any]], reason: str) -> Mapping[str, Any] | None:
    return next((e for e in logs if e["event"] == "platform_reading_failed" and e["reason"] == reason), None)


async def _read_error(s: PlatformSensor, needle: str) -> SensorReadError | None:
    """The read error once it mentions ``needle``."""
    try:
        await s.read(NO_HOST)
    except SensorReadError as exc:
        return exc if needle in str(exc) else None
    return None


@pytest.mark.asyncio
async def test_open_gives_up_on_a_bmc_that_never_answers(tmp_path: Path) -> None:
    (pw := tmp_path / "pw").write_text("x\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives, never answers
        settings = IpmiSettings(host="127.0.0.1", port=silent.getsockname()[1], password_file=pw)
        with pytest.raises(SensorUnavailable) as err:
            await BACKEND.build(settings, Context()).start()
    assert "login failed: no answer" in err.value.reason


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("names", "problem"),
    [(["Inlet Temp"], "reads in '°C', not watts"), (["PSU9 Power"], "no SDR sensor named 'PSU9 Power'")],
)
async def test_a_configured_sensor_that_is_not_power_is_refused(sim: IpmiSim, names: list[str], problem: str) -> None:
    with pytest.raises(SensorUnavailable) as err:
        await BACKEND.build(lan(sim, sensors=names), Context()).start()
    assert problem in err.value.reason


# -- the DCMI path (fake BMC: byte layout of DCMI 1.5 Get Power Reading)


def test_decoding_follows_the_dcmi_layout_byte_for_byte() -> None:
    # DC | 2C 01 (300) | 64 00 (100) | 90 01 (400) | 18 01 (280) | ts 00 F1 53 65 | 1000 ms E8 03 00 00 | 40
    data = bytes.fromhex("dc 2c01 6400 9001 1801 00f15365 e8030000 40")
    r = decode_power_reading(0, data)
    assert (r.current_w, r.minimum_w, r.maximum_w, r.average_w) == (300, 100, 400, 280)
    assert (r.timestamp, r.period_ms, r.active) == (0x6553F100, 1000, True)
    assert power_reading_response(300, 100, 400, 280, 0x6553F100, 1000, True) == data
    assert not decode_power_reading(0, data[:-1] + b"\x00").active
    with pytest.raises(DcmiUnsupported, match="0xC1"):
        decode_power_reading(0xC1, b"")
    with pytest.raises(DcmiUnsupported):
        decode_power_reading(0, b"\xdc\x01\x00")


def fake_source(bmc: FakeBmc, **kw: object) -> IpmiSource:
    settings = IpmiSettings.model_validate({"interval_s": 10.0} | kw)
    return IpmiSource(settings, connect=bmc.connect)


@pytest.mark.asyncio
async def test_dcmi_is_preferred_and_its_short_average_used() -> None:
    bmc = FakeBmc(current=250, average=240, period_ms=1000, sensors=[POWER])
    src = fake_source(bmc)
    assert "DCMI power reading, 240 W (average over 1 s)" in await src.open()
    assert await src.sample() == {"bmc": Sample(watts=240.0, period_s=1.0)}
    bmc.period_ms = 86_400_000  # statistics since the last reset: the current reading instead
    assert await src.sample() == {"bmc": Sample(watts=250.0)}
    assert (0x04, 0x2D) not in bmc.calls  # no SDR read on the DCMI path
    await src.close()
    assert bmc.ipmi_session.logged_out


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"average": 0, "current": 0}, "zero"),
        ({"average": 0xFFFF, "current": 0xFFFF}, "implausible"),
        ({"active": False}, "inactive"),
    ],
)
async def test_bad_dcmi_readings_are_rejected(change: dict[str, object], reason: str) -> None:
    bmc = FakeBmc()
    src = fake_source(bmc)
    await src.open()
    for key, value in change.items():
        setattr(bmc, key, value)
    with pytest.raises(Rejected) as err:
        await src.sample()
    assert err.value.reason == reason


@pytest.mark.asyncio
async def test_a_malformed_dcmi_answer_is_a_read_error() -> None:
    bmc = FakeBmc()
    src = fake_source(bmc)
    await src.open()
    bmc.dcmi_data = b"\xdc\x2c\x01"
    with pytest.raises(SensorReadError, match="not a DCMI power reading"):
        await src.sample()


@pytest.mark.asyncio
async def test_inactive_dcmi_falls_back_to_sdr_and_says_why() -> None:
    bmc = FakeBmc(active=False, sensors=[POWER, INLET])
    src = fake_source(bmc)
    found = await src.open()
    assert "SDR sensor 'Pwr Consumption'" in found
    assert "measurement inactive" in found
    assert await src.sample() == {"bmc": Sample(watts=240.0)}


@pytest.mark.asyncio
async def test_method_dcmi_without_dcmi_is_unavailable() -> None:
    src = fake_source(FakeBmc(dcmi_code=0xC1, sensors=[POWER]), method="dcmi")
    with pytest.raises(SensorUnavailable, match="completion code 0xC1"):
        await src.open()


@pytest.mark.asyncio
async def test_an_unavailable_sdr_reading_is_rejected() -> None:
    bmc = FakeBmc(dcmi_code=0xC1, sensors=[SimSensor(0x10, "Pwr Consumption", raw=120, readable=False)])
    src = fake_source(bmc)
    await src.open()
    with pytest.raises(Rejected) as err:
        await src.sample()
    assert err.value.reason == "unavailable"


@pytest.mark.asyncio
async def test_energy_from_dcmi_never_spikes_over_a_bad_reading() -> None:
    clock = ManualClock()
    bmc = FakeBmc(average=200, period_ms=1000)
    settings = IpmiSettings(interval_s=3600)  # the test polls: the background poller never runs
    s = PlatformSensor(IpmiSource(settings, connect=bmc.connect), settings, clock)
    await s.start()
    try:
        clock.advance(10)
        await s._poll_once()
        assert (await readings(s))["bmc"].joules == pytest.approx(2000.0)  # 200 W x 10 s
        bmc.average = bmc.current = 0xFFFF
        clock.advance(10)
        await s._poll_once()
        assert s.rejected["implausible"] == 1
        bmc.average = 300
        clock.advance(10)
        await s._poll_once()
        # 300 W over the 20 s since the last accepted sample: never 65535 W
        assert (await readings(s))["bmc"].joules == pytest.approx(2000.0 + 300 * 20)
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_a_dropped_session_logs_in_again_with_the_password_file_reread(tmp_path: Path) -> None:
    (pw := tmp_path / "pw").write_text("first-Secret\n")
    bmc = FakeBmc(password="first-Secret")
    src = IpmiSource(IpmiSettings(host="bmc.test", password_file=pw), connect=bmc.connect)
    await src.open()
    bmc.failure = "Session no longer connected"
    with pytest.raises(SensorReadError, match="Session no longer connected"):
        await src.sample()
    bmc.failure = None
    bmc.password = "second-Secret"
    pw.write_text("second-Secret\n")  # rotated: the next login reads the file again
    assert await src.sample() == {"bmc": Sample(watts=240.0, period_s=1.0)}
    assert bmc.logins == 2
    bmc.failure, bmc.password = "Session no longer connected", "third-Secret"
    with pytest.raises(SensorReadError):
        await src.sample()
    bmc.failure = None
    with pytest.raises(SensorReadError, match="Incorrect password") as err:
        await src.sample()
    assert "Secret" not in str(err.value)


# -- settings and selection


def test_settings_need_a_password_file_for_a_remote_bmc() -> None:
    with pytest.raises(pydantic.ValidationError, match="password_file"):
        IpmiSettings(host="10.0.0.5")
    with pytest.raises(pydantic.ValidationError, match=r"set ipmi\.host"):
        IpmiSettings(username="admin")
    with pytest.raises(pydantic.ValidationError):
        IpmiSettings.model_validate({"password": "x"})  # a password in the config is an error


def sdr(name: str, unit: str = "W", kind: str = "Power") -> SdrSensor:
    return SdrSensor(f"32.{len(name)}.0", name, kind, unit, unit == "W")


def test_selection_rule() -> None:
    total, cpu = sdr("Sys Power"), sdr("CPU Power")
    assert select_sensors([total, cpu, sdr("Inlet", "°C")], []) == ({"bmc": total}, "named as the system total")
    ps1, ps2 = sdr("PS1 Input Power", kind="Power Supply"), sdr("PS2 Input Power", kind="Power Supply")
    devices, how = select_sensors([ps1, ps2, sdr("PS1 Output Power")], [])
    assert devices == {"ps1-input-power": ps1, "ps2-input-power": ps2}
    assert how == "power-supply inputs, summed"
    with pytest.raises(LookupError, match=r"name the whole machine's in ipmi\.sensors"):
        select_sensors([cpu, sdr("Mem Power")], [])
    assert select_sensors([cpu, total], ["cpu power", "CPU Power"]) == ({"bmc": cpu}, "configured")
    with pytest.raises(LookupError, match="no SDR sensor in watts"):
        select_sensors([sdr("Inlet", "°C")], [])
