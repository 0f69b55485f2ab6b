from __future__ import annotations

import email.utils
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
from structlog.testing import capture_logs

from carbond.errors import SensorUnavailable
from carbond.procfs import HostSample
from carbond.sensors.base import Context
from carbond.sensors.platform import PlatformSensor
from carbond.sensors.smartplug import BACKEND, SmartplugSettings, retry_after
from carbond.testing.clock import ManualClock
from carbond.testing.smartplug_fake import FakeShelly, FakeTasmota

NO_HOST = HostSample(b"")


async def started(clock: ManualClock, plugs: list[dict[str, Any]], **kw: Any) -> PlatformSensor:
    """The sensor with a poll period long enough that the background poller never runs: the test polls."""
    settings = SmartplugSettings.model_validate({"interval_s": 3600, "plugs": plugs, **kw})
    s = BACKEND.build(settings, Context(clock=clock))
    assert isinstance(s, PlatformSensor)
    await s.start()
    return s


async def poll(s: PlatformSensor, clock: ManualClock, dt: float = 10.0) -> None:
    clock.advance(dt)
    await s._poll_once()


async def joules(s: PlatformSensor) -> dict[str, float]:
    return {r.device: r.joules for r in (await s.read(NO_HOST)).readings}


def shelly(fake: FakeShelly, **kw: Any) -> dict[str, Any]:
    return {"type": "shelly", "host": fake.host, **kw}


def tasmota(fake: FakeTasmota, **kw: Any) -> dict[str, Any]:
    return {"type": "tasmota", "host": fake.host, **kw}


@pytest.mark.asyncio
async def test_shelly_energy_counter_is_used() -> None:
    clock = ManualClock()
    async with FakeShelly(apower=100.0, total_wh=1000.0, channels=2) as fake:
        s = await started(clock, [shelly(fake, channel=1, name="workstation")])
        assert fake.requests == ["/rpc/Switch.GetStatus?id=1"]
        r = (await s.read(NO_HOST)).readings[0]
        assert (r.device, r.kind, r.joules, r.baseline) == ("workstation", "platform", 0.0, True)
        fake.wh[1] += 0.5  # 0.5 Wh = 1800 J, whatever apower says
        await poll(s, clock, 20.0)
        assert await joules(s) == {"workstation": 1800.0}
        assert [i.method for i in (await s.read(NO_HOST)).device_info] == ["energy counter"]
        await s.close()


@pytest.mark.asyncio
async def test_every_plug_is_part_of_the_machine_and_summed() -> None:
    clock = ManualClock()
    async with FakeShelly(apower=180.0) as pc, FakeTasmota(power=25.0, total_kwh=3.0) as screen:
        s = await started(clock, [shelly(pc, name="workstation"), tasmota(screen, name="monitor")])
        assert screen.requests == ["/cm?cmnd=Status%208"]  # the documented form, no credentials without a password
        pc.total_wh += 0.5
        screen.total_kwh += 0.0001  # 0.1 Wh
        await poll(s, clock, 10.0)
        got = await joules(s)
        assert got == pytest.approx({"workstation": 1800.0, "monitor": 360.0})
        assert sum(got.values()) == pytest.approx(2160.0)
        await s.close()


@pytest.mark.asyncio
async def test_shelly_digest_auth_reuses_the_nonce_and_never_shows_the_password(tmp_path: Path) -> None:
    secret = "s3cret-Pw!"
    (tmp_path / "pw").write_text(secret + "\n")
    clock = ManualClock()
    async with FakeShelly(password=secret) as fake:
        with capture_logs() as logs:
            s = await started(clock, [shelly(fake)], password_file=str(tmp_path / "pw"))
            for _ in range(3):
                fake.total_wh += 1.0
                await poll(s, clock)
            assert (await joules(s))[f"shelly-{fake.host}-0"] == 3 * 3600.0
            assert fake.challenges == 1  # one 401, then the nonce is reused with nc 2, 3, 4
            assert "algorithm=SHA-256" in fake.authorizations[-1]
            assert "nc=00000004" in fake.authorizations[-1]
            fake.expire_nonces()  # the device restarted: a 401 with a new nonce, answered in the same poll
            fake.total_wh += 1.0
            await poll(s, clock)
            assert (await joules(s))[f"shelly-{fake.host}-0"] == 4 * 3600.0
            assert fake.challenges == 2
            fake.password = "changed"
            await poll(s, clock)
            assert s.errors == 1
            await s.close()
        assert [e["reason"] for e in logs if e["event"] == "platform_reading_failed"] == ["error"]
        assert "check the password in" in logs[0]["detail"]
        text = repr(logs) + s.found + repr(fake.authorizations)
        assert secret not in text
        assert "s3cret" not in text


@pytest.mark.asyncio
async def test_shelly_401_without_password_names_the_fix(tmp_path: Path) -> None:
    async with FakeShelly(password="pw") as fake:
        with pytest.raises(SensorUnavailable, match="HTTP 401 unauthorized \\(set password_file\\)"):
            await started(ManualClock(), [shelly(fake)])
    with pytest.raises(SensorUnavailable, match="cannot read password_file"):
        await started(ManualClock(), [{"type": "shelly", "host": "127.0.0.1:9"}], password_file=str(tmp_path))


@pytest.mark.asyncio
async def test_tasmota_password_in_the_query_never_in_errors(tmp_path: Path) -> None:
    secret = "tz pass&x"
    (tmp_path / "pw").write_text(secret)
    clock = ManualClock()
    async with FakeTasmota(password=secret, user="carbond") as fake:
        with capture_logs() as logs:
            s = await started(clock, [tasmota(fake, user="carbond", password_file=str(tmp_path / "pw"))])
            assert fake.requests[0] == "/cm?cmnd=Status%208&user=carbond&password=tz%20pass%26x"
            fake.fail(500)
            await poll(s, clock)
            await fake.stop()  # connection refused: aiohttp's error names the URL, ours must not show the password
            await poll(s, clock)
            await s.close()
        assert s.errors == 2
        details = [e["detail"] for e in logs]
        assert "HTTP 500" in details[0]
        text = repr(logs) + s.found
        assert "tz pass" not in text
        assert "tz%20pass" not in text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "counted"),
    [
        ({"apower": -5.0}, ("rejected", "negative")),
        ({"apower": float("nan")}, ("rejected", "nan")),
        ({"apower": 65535.0}, ("rejected", "implausible")),
        ({"apower": "n/a"}, ("rejected", "format")),
        ({"total_wh": float("nan")}, ("rejected", "nan")),
        ("html", ("rejected", "format")),
        ("auth", ("errors", "error")),
        ("503", ("errors", "error")),
        ("404", ("errors", "error")),
    ],
)
async def test_bad_answers_are_counted_and_give_no_energy(fault: Any, counted: tuple[str, str]) -> None:
    clock = ManualClock()
    async with FakeShelly(apower=150.0, total_wh=500.0) as fake:
        s = await started(clock, [shelly(fake, name="pc")])
        fake.total_wh += 1.0
        if isinstance(fault, dict):
            for key, value in fault.items():
                setattr(fake, key, value)
        elif fault == "html":
            fake.html()
        elif fault == "auth":
            fake.password = "set on the device since"
        elif fault == "404":
            fake.raw("{}", "application/json")
            fake.fail(404)
        else:
            fake.fail(503)
        with capture_logs() as logs:
            await poll(s, clock)
        assert s.errors == 1
        assert [e["reason"] for e in logs] == [counted[1]]
        if counted[0] == "rejected":
            assert s.rejected == {counted[1]: 1}
        assert (await joules(s))["pc"] == 0.0
        fake.ok()
        fake.password, fake.apower, fake.total_wh = None, 150.0, 502.0
        await poll(s, clock)
        assert (await joules(s))["pc"] == 2 * 3600.0  # the counter's delta since the last good poll: no spike, no loss
        await s.close()


@pytest.mark.asyncio
async def test_zero_watts_is_a_switched_off_load() -> None:
    clock = ManualClock()
    async with FakeShelly(apower=0.0, total_wh=10.0) as fake:
        s = await started(clock, [shelly(fake, name="monitor")])
        await poll(s, clock)
        assert (await joules(s))["monitor"] == 0.0
        assert not s.rejected
        assert s.errors == 0
        await s.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "header", "wait"), [(429, "30", 30.0), (503, "120", 120.0), (429, None, 60.0)])
async def test_retry_after_delays_the_next_poll(status: int, header: str | None, wait: float) -> None:
    clock = ManualClock()
    async with FakeTasmota(power=50.0, total_kwh=1.0) as fake:
        s = await started(clock, [tasmota(fake, name="pc")])
        fake.fail(status, header)
        with capture_logs() as logs:
            await poll(s, clock, 1.0)
        assert logs[0]["reason"] == "backoff"
        assert f"next poll in {wait:.0f} s" in logs[0]["detail"]
        asked = len(fake.requests)
        fake.ok()
        await poll(s, clock, wait - 2.0)
        assert len(fake.requests) == asked  # not asked again before Retry-After
        fake.total_kwh += 0.001
        await poll(s, clock, 2.0)
        assert len(fake.requests) == asked + 1
        assert (await joules(s))["pc"] == pytest.approx(3600.0)
        await s.close()


def test_retry_after_forms() -> None:
    assert retry_after("5", None) == 5.0
    assert retry_after("0", None) == 1.0  # never a busy loop
    assert retry_after("999999", None) == 3600.0
    assert retry_after("soon", 60.0) == 60.0
    in_90 = email.utils.formatdate(time.time() + 90, usegmt=True)
    assert 80.0 <= (retry_after(in_90, None) or 0) <= 91.0


@pytest.mark.asyncio
async def test_slower_than_the_timeout_is_a_counted_timeout() -> None:
    clock = ManualClock()
    async with FakeShelly() as fake:
        s = await started(clock, [shelly(fake, name="pc")], timeout_s=0.3)
        fake.hang(30.0)
        started_at = time.monotonic()
        with capture_logs() as logs:
            await poll(s, clock)
        assert time.monotonic() - started_at < 10.0  # bounded by the timeout, not by the device
        assert s.errors == 1
        assert logs[0]["reason"] in {"timeout", "error"}
        assert "0.3 s" in logs[0]["detail"]
        fake.ok()
        fake.total_wh += 1.0
        await poll(s, clock)
        assert (await joules(s))["pc"] == 3600.0
        await s.close()


@pytest.mark.asyncio
async def test_power_cycled_plug_restarts_its_counter_without_a_spike() -> None:
    clock = ManualClock()
    async with FakeShelly(apower=120.0, total_wh=5000.0) as fake:
        s = await started(clock, [shelly(fake, name="pc")])
        fake.total_wh += 1.0
        await poll(s, clock)
        fake.total_wh = 0.0  # unplugged and plugged back: aenergy starts again at 0
        await poll(s, clock)
        assert s.rejected == {"counter_reset": 1}
        r = (await s.read(NO_HOST)).readings[0]
        assert (r.joules, r.baseline) == (3600.0, True)
        fake.total_wh = 0.5
        await poll(s, clock)
        assert (await joules(s))["pc"] == 3600.0 + 1800.0
        await s.close()


@pytest.mark.asyncio
async def test_tasmota_multi_channel_reply() -> None:
    clock = ManualClock()
    async with FakeTasmota(power=[10.0, 40.0], total_kwh=[1.0, 2.0]) as fake:
        s = await started(clock, [tasmota(fake, channel=1, name="pc")])
        fake.total_kwh = [1.5, 2.001]
        await poll(s, clock)
        assert (await joules(s))["pc"] == pytest.approx(3600.0)
        await s.close()


@pytest.mark.asyncio
async def test_config_is_checked() -> None:
    with pytest.raises(SensorUnavailable, match="no plugs configured"):
        await started(ManualClock(), [])
    for bad in (
        {"plugs": [{"type": "shelly", "host": "http://10.0.0.2"}]},
        {"plugs": [{"type": "kasa", "host": "10.0.0.2"}]},
        {"plugs": [{"type": "shelly", "host": "10.0.0.2", "colour": "red"}]},
        {"plugs": [{"type": "shelly", "host": "a"}, {"type": "tasmota", "host": "b", "name": "shelly-a-0"}]},
    ):
        with pytest.raises(pydantic.ValidationError):
            SmartplugSettings.model_validate(bad)
