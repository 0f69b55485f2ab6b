"""The redfish platform sensor against sushy-tools' static emulator (both power models, TLS) and, for what the
emulator cannot play (session auth, faults), the loopback FakeBmc in carbond.testing.redfish."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError
from structlog.testing import capture_logs

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.procfs import HostSample
from carbond.sensors.base import Context
from carbond.sensors.platform import Backoff, PlatformSensor, Rejected
from carbond.sensors.redfish import BACKEND, Plan, RedfishSettings, RedfishSource, control_index, retry_after, to_sample
from carbond.testing.redfish import NEWER, OLDER, FakeBmc, Fault, StaticEmulator, mockup_file
from tests.exporter import certs
from tests.harness.tools import require_tool
from tests.harness.wait import eventually, eventually_async

NO_HOST = HostSample(b"")
Emulate = Callable[..., StaticEmulator]


def edit(tree: Path, odata_id: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite one mockup resource in place (the emulators read files per request)."""
    file = mockup_file(tree, odata_id)
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc, indent=4))


def set_raw(tree: Path, odata_id: str, key: str, raw: str) -> None:
    """Put ``raw`` JSON text (``NaN`` too) as the value of ``key`` (a unique property name in the file)."""
    file = mockup_file(tree, odata_id)
    doc = json.loads(file.read_text())
    doc[key] = "@@RAW@@"
    file.write_text(json.dumps(doc).replace('"@@RAW@@"', raw))


def settings(url: str, **kw: Any) -> RedfishSettings:
    base: dict[str, Any] = {"url": url, "interval_s": 1.0, "min_interval_s": 0, "timeout_s": 3.0}
    return RedfishSettings(**(base | kw))


def platform(s: RedfishSettings) -> PlatformSensor:
    sensor = BACKEND.build(s, Context())
    assert isinstance(sensor, PlatformSensor)
    return sensor


@pytest.fixture
def emulate(tmp_path: Path) -> Iterator[Emulate]:
    """Start sushy-static on a copy of a mockup tree (in ``tmp_path/<tree name>``); stopped at teardown."""
    binary = require_tool("sushy-static", "sushy-tools (PyPI, the test extra)")
    started: list[StaticEmulator] = []

    def start(tree: Path, cert: certs.Pair | None = None) -> StaticEmulator:
        copy = tmp_path / tree.name
        if not copy.exists():
            shutil.copytree(tree, copy)
        log = tmp_path / f"sushy-{len(started)}.log"
        emu = StaticEmulator(binary, copy, log, cert.cert if cert else None, cert.key if cert else None)
        started.append(emu)
        emu.start()
        eventually(emu.ready, what="sushy-static listening")
        return emu

    yield start
    for emu in started:
        emu.stop()


@pytest_asyncio.fixture
async def bmc(tmp_path: Path) -> AsyncIterator[FakeBmc]:
    copy = tmp_path / "bmc"
    shutil.copytree(OLDER, copy)
    fake = FakeBmc(copy, username="admin", password="Sup3r-s3cret!")
    await fake.start()
    yield fake
    await fake.stop()


def password_file(tmp_path: Path, password: str) -> Path:
    f = tmp_path / "bmc.password"
    f.write_text(password + "\n")
    return f


class PowerWatch:
    """Mean power between consecutive distinct readings of one device, as the monitor would derive it."""

    def __init__(self, sensor: PlatformSensor) -> None:
        self.sensor = sensor
        self.last: tuple[float, float] | None = None  # (joules, at)
        self.powers: list[float] = []

    async def power(self) -> float | None:
        read = await self.sensor.read(NO_HOST)
        (r,) = read.readings
        last, self.last = self.last, (r.joules, r.at)
        if last is None or r.at == last[1] or r.baseline:
            return None
        self.powers.append((r.joules - last[0]) / (r.at - last[1]))
        return self.powers[-1]

    async def settles_at(self, watts: float) -> None:
        async def near() -> bool:
            p = await self.power()
            return p is not None and abs(p - watts) < 1e-6 * watts

        await eventually_async(near, what=f"power at {watts} W")


# --- the mockups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", [NEWER, OLDER], ids=["newer", "older"])
def test_mockups_follow_the_dmtf_shapes(tree: Path) -> None:
    """Every resource has its own path as @odata.id and a versioned @odata.type; collections count their
    members; every link leads to a resource of the tree."""
    links: list[str] = []

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "@odata.id" and isinstance(value, str) and "#" not in value:
                    links.append(value)
                walk(value)
        elif isinstance(obj, list):
            for item in obj:
                walk(item)

    files = sorted(tree.rglob("index.json"))
    assert len(files) >= 8
    for file in files:
        doc = json.loads(file.read_text())
        rel = file.parent.relative_to(tree).as_posix()
        assert doc["@odata.id"] == ("/redfish/v1/" + rel if rel != "." else "/redfish/v1"), file
        kind = doc["@odata.type"]
        name = kind.rsplit(".", 1)[-1]
        assert kind.startswith("#"), file
        assert name, file
        if name.endswith("Collection"):
            assert kind == f"#{name}.{name}", file
            assert doc["Members@odata.count"] == len(doc["Members"]), file
        else:
            version = kind[1:].split(".")[1]
            assert version.startswith("v1_"), file
            assert len(version.split("_")) == 3, file
            assert doc["Id"], file
            assert doc["Name"], file
        walk(doc)
    for link in links:
        assert mockup_file(tree, link).is_file(), link


# --- both models through sushy-static ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_older_model_follows_the_file_through_sushy_static(emulate: Emulate) -> None:
    emu = emulate(OLDER)
    sensor = platform(settings(emu.url))
    await sensor.start()
    try:
        assert "chassis 1 (RackMount)" in sensor.found
        assert "PowerControl[1]" in sensor.found
        watch = PowerWatch(sensor)
        await watch.settles_at(344.0)
        edit(emu.mockup, "/redfish/v1/Chassis/1/Power", lambda d: d["PowerControl"][1].update(PowerConsumedWatts=500))
        await watch.settles_at(500.0)
        assert all(344.0 - 1e-6 <= p <= 500.0 + 1e-6 for p in watch.powers)  # the trapezoid between, never a spike
        info = (await sensor.read(NO_HOST)).device_info
        assert [(i.device, i.method) for i in info] == [("chassis-1", "power integration")]
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_newer_model_prefers_the_energy_counter_and_the_outer_chassis(emulate: Emulate) -> None:
    emu = emulate(NEWER)
    sensor = platform(settings(emu.url))
    await sensor.start()
    try:
        assert "chassis 1U (RackMount)" in sensor.found
        assert "EnergyJoules" in sensor.found
        assert "not counted: GPUBaseboard" in sensor.found  # inside 1U: counting it too would count it twice
        first = (await sensor.read(NO_HOST)).readings[0]
        assert first.device == "chassis-1U"
        assert first.kind == "platform"
        assert not first.in_node_total
        env = "/redfish/v1/Chassis/1U/EnvironmentMetrics"
        edit(emu.mockup, env, lambda d: d["EnergyJoules"].update(Reading=d["EnergyJoules"]["Reading"] + 2500))

        async def counted() -> float:
            return (await sensor.read(NO_HOST)).readings[0].joules - first.joules

        assert await eventually_async(counted, what="the counter's step counted") == pytest.approx(2500.0)
        with capture_logs() as logs:
            edit(emu.mockup, env, lambda d: d["EnergyJoules"].update(Reading=1000))  # the BMC's counter restarted
            await eventually_async(lambda: sensor.rejected["counter_reset"], what="reset rejected")
        assert (await counted()) == pytest.approx(2500.0)  # no negative step, no spike
        assert any(e.get("reason") == "counter_reset" for e in logs)
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_newer_model_falls_back_in_order(emulate: Emulate) -> None:
    emu = emulate(NEWER)
    env = "/redfish/v1/Chassis/1U/EnvironmentMetrics"

    async def opened() -> tuple[str, str, Any]:
        source = RedfishSource(settings(emu.url))
        found = await source.open()
        try:
            (sample,) = (await source.sample()).values()
            assert source.plan is not None
            return found, source.plan.method, sample
        finally:
            await source.close()

    found, method, sample = await opened()
    assert method == "energy_joules"
    assert sample.energy_j == 9876543210
    assert sample.watts == 374.0
    edit(emu.mockup, env, lambda d: d.pop("EnergyJoules"))
    found, method, sample = await opened()
    assert method == "energy_kwh"
    assert sample.energy_j == pytest.approx(2743.48 * 3.6e6)
    edit(emu.mockup, env, lambda d: d["EnergykWh"].update(Reading=2743))  # whole kWh: far too coarse a counter
    found, method, sample = await opened()
    assert method == "env_power"
    assert sample.watts == 374.0
    assert sample.energy_j is None
    edit(emu.mockup, "/redfish/v1/Chassis/1U", lambda d: d.pop("EnvironmentMetrics"))
    found, method, sample = await opened()
    assert method == "psu_power"
    assert sample.watts == pytest.approx(190.0 + 184.0)
    assert "2 power supplies" in found
    edit(emu.mockup, "/redfish/v1/Chassis/1U", lambda d: d.pop("PowerSubsystem"))
    found, method, sample = await opened()  # only the GPU baseboard is left with power: it is the one found
    assert method == "env_power"
    assert sample.watts == 210.0
    assert "chassis GPUBaseboard" in found


@pytest.mark.asyncio
async def test_which_chassis_counts(emulate: Emulate) -> None:
    emu = emulate(NEWER)

    async def found(**kw: Any) -> str:
        source = RedfishSource(settings(emu.url, **kw))
        try:
            return await source.open()
        finally:
            await source.close()

    assert "chassis GPUBaseboard (Module): EnvironmentMetrics PowerWatts" in await found(chassis="GPUBaseboard")
    assert "chassis 1U" in await found(chassis="/redfish/v1/Chassis/1U")
    with pytest.raises(SensorUnavailable, match=r"no chassis 'nope'.*found: 1U, GPUBaseboard"):
        await found(chassis="nope")
    # Containment alone decides (here only the baseboard's ContainedBy says it)
    links = json.loads(mockup_file(emu.mockup, "/redfish/v1/Chassis/1U").read_text())["Links"]
    edit(emu.mockup, "/redfish/v1/Chassis/1U", lambda d: d.update(Links={}))
    assert "chassis 1U (RackMount): EnvironmentMetrics EnergyJoules" in await found()
    # Without containment links, the chassis linked to the ComputerSystem is the machine's
    edit(emu.mockup, "/redfish/v1/Chassis/1U", lambda d: d.update(Links={"ComputerSystems": links["ComputerSystems"]}))
    edit(emu.mockup, "/redfish/v1/Chassis/GPUBaseboard", lambda d: d.pop("Links"))
    assert "chassis 1U" in await found()
    # Two unrelated chassis with power and nothing to tell them apart: refuse rather than add them up
    edit(emu.mockup, "/redfish/v1/Chassis/1U", lambda d: d.pop("Links"))
    with pytest.raises(SensorUnavailable, match=r"several chassis.*1U, GPUBaseboard.*redfish.chassis"):
        await found()


def test_legacy_average_and_the_power_control_entry() -> None:
    power: dict[str, Any] = json.loads(mockup_file(OLDER, "/redfish/v1/Chassis/1/Power").read_text())
    assert control_index(power) == 1  # entry 0 is the CPU sub-system
    plan = Plan("/redfish/v1/Chassis/1", "1", "legacy", ("/redfish/v1/Chassis/1/Power",), 1)
    assert to_sample(plan, [power], 20_000).watts == 344
    power["PowerControl"][1]["PowerConsumedWatts"] = None
    sample = to_sample(plan, [power], 20_000)
    assert (sample.watts, sample.period_s) == (319, 60.0)  # the mean over IntervalInMin, with its period
    power["PowerControl"] = [power["PowerControl"][0]]
    assert control_index(power) is None


def test_retry_after_forms() -> None:
    from datetime import UTC, datetime

    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("7", now) == 7.0
    assert retry_after("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert retry_after("999999", now) == 3600.0
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


# --- bad values -------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "reason"), [("0", "zero"), ("65535", "implausible"), ("-12", "negative"), ("NaN", "nan")]
)
async def test_bad_values_are_rejected_counted_and_logged(emulate: Emulate, raw: str, reason: str) -> None:
    emu = emulate(OLDER)
    sensor = platform(settings(emu.url))
    await sensor.start()
    power = "/redfish/v1/Chassis/1/Power"
    try:
        watch = PowerWatch(sensor)
        await watch.settles_at(344.0)
        with capture_logs() as logs:

            def bad(d: dict[str, Any]) -> None:
                d["PowerControl"][1]["PowerConsumedWatts"] = "@@RAW@@"

            edit(emu.mockup, power, bad)
            file = mockup_file(emu.mockup, power)
            file.write_text(file.read_text().replace('"@@RAW@@"', raw))
            await eventually_async(lambda: sensor.rejected[reason], what=f"{reason} rejected")
        assert [e["reason"] for e in logs if e["event"] == "platform_reading_failed"] == [reason]
        edit(emu.mockup, power, lambda d: d["PowerControl"][1].update(PowerConsumedWatts=344))
        await watch.settles_at(344.0)
        assert max(watch.powers) <= 344.0 + 1e-6  # the rejected value never made energy
    finally:
        await sensor.close()


# --- auth, against the fake BMC -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_session_login_relogin_and_logout(bmc: FakeBmc, tmp_path: Path) -> None:
    s = settings(bmc.url, username="admin", password_file=password_file(tmp_path, bmc.password))
    source = RedfishSource(s)
    with capture_logs() as logs:
        await source.open()
        assert bmc.logins == 1
        assert len(bmc.sessions) == 1
        assert (await source.sample())["chassis-1"].watts == 344
        bmc.expire_sessions()  # the BMC timed the session out: one 401, one new login, the read goes through
        assert (await source.sample())["chassis-1"].watts == 344
        assert bmc.logins == 2
        assert bmc.unauthorized == 1
        await source.close()
    assert bmc.logouts == 1
    assert bmc.sessions == {}
    assert bmc.password not in repr(logs)
    assert [e["event"] for e in logs].count("redfish_session_opened") == 2


@pytest.mark.asyncio
async def test_a_refused_relogin_is_a_read_error_tried_once(bmc: FakeBmc, tmp_path: Path) -> None:
    source = RedfishSource(settings(bmc.url, username="admin", password_file=password_file(tmp_path, bmc.password)))
    await source.open()
    try:
        bmc.expire_sessions()
        real, bmc.password = bmc.password, "rotated-elsewhere"
        with pytest.raises(SensorReadError, match=r"login as 'admin'.*refused") as err:
            await source.sample()
        assert bmc.failed_logins == 1
        assert real not in str(err.value)
    finally:
        await source.close()


@pytest.mark.asyncio
async def test_wrong_password_is_a_clear_error_without_the_password(bmc: FakeBmc, tmp_path: Path) -> None:
    wrong = "not-the-Passw0rd"
    sensor = platform(settings(bmc.url, username="admin", password_file=password_file(tmp_path, wrong)))
    with capture_logs() as logs, pytest.raises(SensorUnavailable) as err:
        await sensor.start()
    assert "login as 'admin'" in str(err.value)
    assert "refused (HTTP 401)" in str(err.value)
    assert "password_file" in str(err.value)
    for secret in (wrong, bmc.password):
        assert secret not in str(err.value)
        assert secret not in repr(logs)
    assert bmc.failed_logins == 1


@pytest.mark.asyncio
async def test_basic_auth(tmp_path: Path) -> None:
    fake = FakeBmc(OLDER, auth="basic")
    await fake.start()
    try:
        good = RedfishSource(settings(fake.url, auth="basic", username="admin",
                                      password_file=password_file(tmp_path, fake.password)))  # fmt: skip
        await good.open()
        assert (await good.sample())["chassis-1"].watts == 344
        assert fake.logins == 0
        await good.close()
        bad = RedfishSource(settings(fake.url, auth="basic", username="admin",
                                     password_file=password_file(tmp_path, "wrong")))  # fmt: skip
        with pytest.raises(SensorUnavailable, match=r"HTTP 401 .*access refused for user 'admin'"):
            await bad.open()
    finally:
        await fake.stop()


@pytest.mark.asyncio
async def test_session_auth_against_a_service_without_tokens_says_so(emulate: Emulate, tmp_path: Path) -> None:
    emu = emulate(OLDER)  # sushy-static answers the login POST with 204 and no token
    source = RedfishSource(settings(emu.url, username="admin", password_file=password_file(tmp_path, "pw")))
    with pytest.raises(SensorUnavailable, match=r"no X-Auth-Token \(try auth: basic\)"):
        await source.open()
    basic = RedfishSource(settings(emu.url, auth="basic", username="admin",
                                   password_file=password_file(tmp_path, "pw")))  # fmt: skip
    await basic.open()
    await basic.close()
    assert "Authorization: Basic YWRtaW46cHc=" in emu.log.read_text()  # admin:pw, sent as configured


# --- faults ---------------------------------------------------------------------------------------------------


async def opened(bmc: FakeBmc, tmp_path: Path, **kw: Any) -> RedfishSource:
    source = RedfishSource(settings(bmc.url, username="admin",
                                    password_file=password_file(tmp_path, bmc.password), **kw))  # fmt: skip
    await source.open()
    return source


@pytest.mark.asyncio
async def test_an_html_page_instead_of_json(bmc: FakeBmc, tmp_path: Path) -> None:
    source = await opened(bmc, tmp_path)
    try:
        bmc.faults.append(Fault(200, "<html><title>Service busy</title></html>"))
        with pytest.raises(Rejected, match="text/html page instead of JSON") as err:
            await source.sample()
        assert err.value.reason == "format"
        bmc.faults.append(Fault(500, "<html><title>Internal error</title></html>"))
        with pytest.raises(SensorReadError, match="HTTP 500 from"):
            await source.sample()
        assert (await source.sample())["chassis-1"].watts == 344
    finally:
        await source.close()


@pytest.mark.asyncio
async def test_429_and_503_hold_polling_off(bmc: FakeBmc, tmp_path: Path) -> None:
    source = await opened(bmc, tmp_path)
    try:
        bmc.faults.append(Fault(429, "", "application/json", {"Retry-After": "7"}))
        with pytest.raises(Backoff) as backoff:
            await source.sample()
        assert backoff.value.seconds == 7.0
        assert "HTTP 429" in backoff.value.detail
        bmc.faults.append(Fault(503, "", "application/json", {"Retry-After": "12"}))
        with pytest.raises(Backoff) as backoff:
            await source.sample()
        assert backoff.value.seconds == 12.0
        bmc.faults.append(Fault(503, '{"error": {"message": "BMC restarting"}}', "application/json"))
        with pytest.raises(SensorReadError, match=r"HTTP 503 .*: BMC restarting"):
            await source.sample()
    finally:
        await source.close()


@pytest.mark.asyncio
async def test_retry_after_is_honoured_by_the_sensor(bmc: FakeBmc, tmp_path: Path) -> None:
    s = settings(bmc.url, username="admin", password_file=password_file(tmp_path, bmc.password), interval_s=0.5)
    sensor = platform(s)
    await sensor.start()
    try:
        served = len(bmc.served)
        bmc.faults.append(Fault(429, "", "application/json", {"Retry-After": "3"}))
        await eventually_async(lambda: not bmc.faults, what="the 429 served")
        held = time.monotonic()
        await eventually_async(lambda: len(bmc.served) > served, what="polling again after Retry-After")
        assert time.monotonic() - held >= 2.5  # no poll inside the 3 s asked for (0.5 s polls otherwise)
        assert sensor.errors >= 1
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_a_response_slower_than_the_timeout(bmc: FakeBmc, tmp_path: Path) -> None:
    source = await opened(bmc, tmp_path, timeout_s=0.3)
    try:
        bmc.faults.append(Fault(200, "{}", "application/json", delay_s=2.0))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await source.sample()
        assert time.monotonic() - started < 1.5
    finally:
        await source.close()
    bmc.faults.append(Fault(200, "{}", "application/json", delay_s=2.0))
    slow = RedfishSource(settings(bmc.url, username="admin", timeout_s=0.3,
                                  password_file=password_file(tmp_path, bmc.password)))  # fmt: skip
    with pytest.raises(SensorUnavailable, match=r"no answer within 0.3 s"):
        await slow.open()  # the login goes through; the chassis collection does not answer


# --- TLS --------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tls_verified_against_ca_file(emulate: Emulate, tmp_path: Path) -> None:
    ca = certs.ca(tmp_path)
    emu = emulate(OLDER, certs.signed(tmp_path, "bmc", ca, "127.0.0.1", "IP:127.0.0.1"))
    assert emu.url.startswith("https://")
    source = RedfishSource(settings(emu.url, ca_file=ca.cert))
    assert "chassis 1" in await source.open()
    assert (await source.sample())["chassis-1"].watts == 344
    await source.close()
    other = certs.ca(tmp_path, "other-ca")
    with pytest.raises(SensorUnavailable, match=r"TLS verification of https://127.0.0.1:.* failed"):
        await RedfishSource(settings(emu.url, ca_file=other.cert)).open()


@pytest.mark.asyncio
async def test_a_self_signed_certificate_fails_unless_verification_is_off(emulate: Emulate, tmp_path: Path) -> None:
    ca = certs.ca(tmp_path)
    emu = emulate(OLDER, certs.self_signed(tmp_path, "bmc"))
    with pytest.raises(SensorUnavailable, match=r"TLS verification .* failed"):
        await RedfishSource(settings(emu.url, ca_file=ca.cert)).open()
    with capture_logs() as logs:
        source = RedfishSource(settings(emu.url, verify_tls=False))
        await source.open()
        await source.close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redfish_tls_unverified"]


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_settings() -> None:
    with pytest.raises(ValidationError, match="must not carry credentials"):
        RedfishSettings(url="https://admin:pw@bmc")
    with pytest.raises(ValidationError, match="must be http"):
        RedfishSettings(url="bmc.example")
    with pytest.raises(ValidationError, match="username and password_file go together"):
        RedfishSettings(url="https://bmc", username="admin")
    with pytest.raises(ValidationError, match="Extra inputs"):
        RedfishSettings.model_validate({"url": "https://bmc", "password": "x"})
    assert platform(RedfishSettings(url="https://bmc", interval_s=1, min_interval_s=6)).interval_s == 6
    with pytest.raises(SensorUnavailable, match=r"no url configured"):
        await platform(RedfishSettings()).start()
    with pytest.raises(SensorUnavailable, match=r"cannot read .*missing"):
        await RedfishSource(
            RedfishSettings(url="https://bmc", username="a", password_file=Path("/nonexistent/missing"))
        ).open()
