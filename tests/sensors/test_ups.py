"""The ``ups`` platform sensor against a real upsd (Debian nut-server) serving dummy-ups drivers; its pure parts."""

from __future__ import annotations

import asyncio
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Context
from carbond.sensors.platform import Rejected
from carbond.sensors.ups import BACKEND, NutClient, UpsSensor, UpsSettings, machine_power, split_words
from carbond.testing.nut import NutServer, find_binary
from tests.harness.skips import skip_or_fail
from tests.harness.tools import require_tool
from tests.harness.wait import NotYet, eventually, eventually_async

NO_HOST = HostSample(b"")
SECRET = "pw-9f3a'never-shown"
DIRECT = {"ups.realpower": 230, "ups.realpower.nominal": 600}


UPSES: dict[str, dict[str, str]] = {
    "direct": {k: str(v) for k, v in {**DIRECT, "input.realpower": 250}.items()},
    "derived": {"ups.load": "40", "ups.realpower.nominal": "600"},
    "va": {"ups.load": "50", "ups.power.nominal": "1000"},
}


class SharedNut:
    """One upsd with its three drivers for the module (starting them takes seconds), handed to each test as it
    started: values a test changed are written back and paused processes resumed; a server a test left stopped or
    not answering is replaced by a new one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: NutServer | None = None
        self.starts = 0

    def pristine(self) -> NutServer:
        if self.server is None or not self._restored(self.server):
            self.close()
            self.starts += 1
            server = NutServer(self.root / f"s{self.starts}", maxage_s=3, users={"carbond": SECRET})
            server.root.mkdir()
            for name, values in UPSES.items():
                server.add_ups(name, values)
            self.server = server
            server.start()
        return self.server

    @staticmethod
    def _restored(server: NutServer) -> bool:
        """Back to the start, or False where that needs a new server (upsd or a driver stopped, upsd paused)."""
        try:
            for name in UPSES:
                server.resume_driver(name)  # KeyError: the driver was stopped
            server.ready()  # OSError: upsd stopped, or paused (the query times out); what it serves is checked below
        except (OSError, KeyError):
            return False
        for name, values in UPSES.items():
            if server.values[name] != values:
                server.set_values(name, values)  # returns once upsd serves them
        try:
            eventually(
                lambda: all(server.get(n, k) == f'VAR {n} {k} "{v}"' for n in UPSES for k, v in UPSES[n].items()),
                what="upsd serving the initial values",
                ignore=(OSError,),
            )
        except NotYet:
            return False
        return True

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture(scope="module")
def shared_nut() -> Iterator[SharedNut]:
    require_tool("upsd", "nut-server")
    if find_binary("dummy-ups") is None:
        skip_or_fail("dummy-ups is not installed (Debian package 'nut-server')")
    # a short path: the drivers' Unix sockets live here (108 bytes at most)
    with tempfile.TemporaryDirectory(prefix="nut") as d:
        shared = SharedNut(Path(d))
        try:
            yield shared
        finally:
            shared.close()


@pytest.fixture
def nut(shared_nut: SharedNut) -> NutServer:
    return shared_nut.pristine()


def build(nut: NutServer, **settings: Any) -> UpsSensor:
    opts: dict[str, Any] = {"port": nut.port, "interval_s": 0.5, "timeout_s": 2.0, "ups": "direct", **settings}
    sensor = BACKEND.build(UpsSettings(**opts), Context())
    assert isinstance(sensor, UpsSensor)
    return sensor


class Follower:
    """Mean power between the sensor's consecutive readings (as the monitor computes it), over the ``at`` interval
    the sensor reports; every figure seen is kept."""

    def __init__(self, sensor: UpsSensor) -> None:
        self.sensor = sensor
        self.prev: Reading | None = None
        self.seen: list[float] = []
        self.last: SensorRead | None = None

    async def power(self) -> float | None:
        self.last = await self.sensor.read(NO_HOST)
        (r,) = self.last.readings
        prev, self.prev = self.prev, r
        if prev is None or r.baseline or r.at == prev.at:
            return None
        w = (r.joules - prev.joules) / (r.at - prev.at)
        self.seen.append(w)
        return w

    async def reaches(self, watts: float) -> None:
        async def at_value() -> bool:
            w = await self.power()
            return w is not None and math.isclose(w, watts, rel_tol=1e-9)

        await eventually_async(at_value, what=f"{watts} W", ignore=(SensorReadError,))

    async def fails(self, text: str) -> str:
        async def failing() -> str:
            try:
                await self.sensor.read(NO_HOST)
            except SensorReadError as exc:
                return str(exc) if text in str(exc) else ""
            return ""

        return await eventually_async(failing, what=f"read fails with {text!r}")


# ---- against the real upsd


@pytest.mark.asyncio
async def test_realpower_read_and_followed(nut: NutServer) -> None:
    sensor = build(nut)
    with structlog.testing.capture_logs() as logs:
        await sensor.start()
    try:
        assert "UPS 'direct' (Dummy Manufacturer Dummy UPS), input.realpower 250 W not charged" in sensor.found
        assert any(e["event"] == "ups_whole_output_charged" and e["log_level"] == "warning" for e in logs)
        f = Follower(sensor)
        await f.reaches(230.0)
        assert f.last is not None
        (r,) = f.last.readings
        assert (r.device, r.kind, r.measured, r.in_node_total) == ("ups-direct", "platform", True, False)
        (info,) = f.last.device_info
        assert (info.model, info.method, info.sensor) == ("Dummy Manufacturer Dummy UPS", "ups.realpower", "ups")
        await asyncio.to_thread(nut.set_values, "direct", {"ups.realpower": 310})
        await f.reaches(310.0)
        assert all(229.999 < w < 310.001 for w in f.seen), f.seen  # the step is a trapezoid, never a spike
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_load_times_nominal_is_derived_and_marked_estimated(nut: NutServer) -> None:
    sensor = build(nut, ups="derived")
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(240.0)  # 40 % of 600 W
        assert f.last is not None
        assert [i.method for i in f.last.device_info] == ["ups.load x ups.realpower.nominal (estimated)"]
        assert [r.measured for r in f.last.readings] == [False]
        await asyncio.to_thread(nut.set_values, "derived", {"ups.load": 55})
        await f.reaches(330.0)
    finally:
        await sensor.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("power_factor", "expected"), [(None, 450.0), (0.8, 400.0)])
async def test_load_times_va_rating_uses_the_configured_power_factor(
    nut: NutServer, power_factor: float | None, expected: float
) -> None:
    extra = {} if power_factor is None else {"power_factor": power_factor}
    sensor = build(nut, ups="va", **extra)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(expected)  # 50 % of 1000 VA x the power factor (0.9 by default)
        assert f.last is not None
        pf = power_factor or 0.9
        want = f"ups.load x ups.power.nominal x power_factor {pf} (estimated)"
        assert [i.method for i in f.last.device_info] == [want]
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_stale_data_fails_the_sample_and_is_never_reused(nut: NutServer) -> None:
    sensor = build(nut)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(230.0)
        nut.pause_driver("direct")  # upsd declares the data stale after MAXAGE (3 s)
        message = await f.fails("stale")
        assert "the data is stale" in message
        assert "last reading" in message
        assert sensor.rejected["stale"] >= 1
        nut.resume_driver("direct")

        async def back() -> Reading | None:
            try:
                (r,) = (await sensor.read(NO_HOST)).readings
            except SensorReadError:
                return None
            return r

        first = await eventually_async(back, what="reading after the stale period")
        assert first.baseline, "the stale period must give no energy"
        f.prev = None
        await f.reaches(230.0)
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_stopped_driver_then_restarted(nut: NutServer) -> None:
    sensor = build(nut)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(230.0)
        await asyncio.to_thread(nut.stop_driver, "direct")
        assert "driver" in await f.fails("DRIVER-NOT-CONNECTED")
        await asyncio.to_thread(nut.start_driver, "direct")
        await f.reaches(230.0)
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_wrong_ups_name_is_a_clear_unavailable(nut: NutServer) -> None:
    with pytest.raises(SensorUnavailable) as err:
        await build(nut, ups="nope").start()
    assert f"upsd at 127.0.0.1:{nut.port}: no UPS 'nope' (it serves: derived, direct, va)" in err.value.reason
    with pytest.raises(SensorUnavailable) as err:
        await build(nut, ups=None).start()
    assert "serves 3 UPSes (derived, direct, va): name the one to read in ups.ups" in err.value.reason


@pytest.mark.asyncio
async def test_unknown_outlet_is_unavailable(nut: NutServer) -> None:
    with pytest.raises(SensorUnavailable, match="UPS 'direct' has no outlet '3'"):
        await build(nut, outlet="3").start()


@pytest.mark.asyncio
async def test_upsd_down_then_back(nut: NutServer) -> None:
    sensor = build(nut)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(230.0)
        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(nut.stop_upsd)
            assert "connection refused" in await f.fails(f"upsd at 127.0.0.1:{nut.port}")
            assert sensor.covers == frozenset({"platform"})  # down, not gone: it comes back by itself
            await asyncio.to_thread(nut.start_upsd)
            await f.reaches(230.0)
        events = [e["event"] for e in logs if e.get("sensor") == "ups"]
        assert "platform_reading_failed" in events
        assert "platform_reading_recovered" in events
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_upsd_not_answering_times_out_then_recovers(nut: NutServer) -> None:
    sensor = build(nut, timeout_s=0.5)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(230.0)
        nut.pause_upsd()
        try:
            await f.fails("no answer within 0.5 s")
        finally:
            nut.resume_upsd()
        await f.reaches(230.0)
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_bad_values_are_rejected_and_counted(nut: NutServer) -> None:
    bad = [("0", "zero"), ("-5", "negative"), ("abc", "format"), ("nan", "nan"), ("65535", "implausible")]
    sensor = build(nut)
    await sensor.start()
    try:
        f = Follower(sensor)
        await f.reaches(230.0)
        for value, reason in bad:
            with structlog.testing.capture_logs() as logs:
                await asyncio.to_thread(nut.set_values, "direct", {"ups.realpower": value})
                await eventually_async(lambda r=reason: sensor.rejected[r] >= 1, what=f"{reason} counted")
                await asyncio.to_thread(nut.set_values, "direct", {"ups.realpower": 230})
                await f.reaches(230.0)
            failed = [e for e in logs if e["event"] == "platform_reading_failed"]
            assert failed, failed
            assert failed[0]["reason"] == reason, failed
            assert "ups.realpower" in failed[0]["detail"], failed
        assert set(sensor.rejected) == {r for _, r in bad}
        assert all(229.999 < w < 230.001 for w in f.seen), f.seen  # rejected samples never move the energy
    finally:
        await sensor.close()


@pytest.mark.asyncio
async def test_password_file_used_but_never_shown(nut: NutServer, tmp_path: Path) -> None:
    secret = tmp_path / "ups-password"
    secret.write_text(SECRET + "\n")
    texts: list[str] = []
    with structlog.testing.capture_logs() as logs:
        sensor = build(nut, username="carbond", password_file=secret)
        await sensor.start()
        try:
            f = Follower(sensor)
            await f.reaches(230.0)
            await asyncio.to_thread(nut.stop_upsd)
            texts.append(await f.fails("connection refused"))
            await asyncio.to_thread(nut.start_upsd)
            await f.reaches(230.0)
        finally:
            await sensor.close()
        for bad in ({"ups": "nope"}, {"password_file": tmp_path / "missing"}):
            with pytest.raises(SensorUnavailable) as err:
                await build(nut, **{"username": "carbond", "password_file": secret, **bad}).start()
            texts.append(str(err.value))
    assert "cannot read password_file" in texts[-1]
    assert str(tmp_path / "missing") in texts[-1]
    assert all(SECRET not in t for t in texts + [repr(e) for e in logs])


@pytest.mark.asyncio
async def test_one_connection_kept_and_replaced_after_upsd_restart(nut: NutServer) -> None:
    client = NutClient("127.0.0.1", nut.port, 2.0)
    try:
        for _ in range(3):
            assert (await client.list_var("direct"))["ups.realpower"] == "230"
        assert _established(nut.port) == 1
        await asyncio.to_thread(nut.stop_upsd)
        await asyncio.to_thread(nut.start_upsd)
        assert (await client.list_var("direct"))["ups.realpower"] == "230"  # the dead connection replaced at once
        assert _established(nut.port) == 1
    finally:
        await client.close()
    assert _established(nut.port) == 0


def _established(port: int) -> int:
    """Client-side TCP connections to 127.0.0.1:``port`` in state ESTABLISHED (01)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[2] == f"0100007F:{port:04X}" and r.split()[3] == "01")


# ---- pure parts


def test_words_unquote_and_unescape() -> None:
    assert split_words('VAR ups ups.model "Back \\"UPS\\" 650\\\\x"\n') == [
        "VAR",
        "ups",
        "ups.model",
        'Back "UPS" 650\\x',
    ]
    assert split_words('VAR u v ""') == ["VAR", "u", "v", ""]


def p(variables: Mapping[str, object], **kw: Any) -> tuple[float, str, bool]:
    opts: dict[str, Any] = {"power_factor": 0.9, "max_watts": 20_000.0, **kw}
    got = machine_power({k: str(v) for k, v in variables.items()}, **opts)
    return round(got.watts, 6), got.method, got.estimated


def test_power_chain_order() -> None:
    full = {"ups.realpower": 200, "ups.power": 300, "output.powerfactor": 0.8, "ups.load": 50}
    assert p({**full, "ups.realpower.nominal": 600}) == (200, "ups.realpower", False)
    assert p({"outlet.realpower": 180, "ups.power": 300}) == (180, "outlet.realpower", False)
    assert p({k: v for k, v in full.items() if k != "ups.realpower"}) == (
        240,
        "ups.power x output.powerfactor (estimated)",
        True,
    )
    assert p({"ups.load": 50, "ups.realpower.nominal": 600, "ups.power": 300}) == (
        300,
        "ups.load x ups.realpower.nominal (estimated)",
        True,
    )
    assert p({"ups.power": 300, "ups.power.nominal": 1000, "ups.load": 10}) == (
        270,
        "ups.power x power_factor 0.9 (estimated)",
        True,
    )
    assert p({"input.realpower": 250, "ups.load": 10, "ups.power.nominal": 1000}) == (
        90,
        "ups.load x ups.power.nominal x power_factor 0.9 (estimated)",
        True,
    )


def test_outlet_and_share_select_this_machines_part() -> None:
    v = {"ups.realpower": 500, "outlet.1.realpower": 120, "outlet.2.power": 200, "outlet.2.powerfactor": 0.95}
    assert p(v, outlet="1") == (120, "outlet.1.realpower", False)
    assert p(v, outlet="2") == (190, "outlet.2.power x outlet.2.powerfactor (estimated)", True)
    assert p({"outlet.3.power": 100}, outlet="3") == (90, "outlet.3.power x power_factor 0.9 (estimated)", True)
    assert p(v, share=0.25) == (125, "ups.realpower x share 0.25 (estimated)", True)
    with pytest.raises(SensorReadError, match="outlet 4 reports neither"):
        p(v, outlet="4")


@pytest.mark.parametrize(
    ("variables", "reason", "detail"),
    [
        ({"ups.realpower": 901, "ups.realpower.nominal": 600}, "implausible", "above max_watts 900"),
        ({"ups.realpower": "12 W"}, "format", "ups.realpower = '12 W' is not a number"),
        ({"ups.load": "n/a", "ups.realpower.nominal": 600}, "format", "ups.load = 'n/a'"),
        ({"ups.load": 0, "ups.realpower.nominal": 600}, "zero", "ups.load x ups.realpower.nominal"),
        ({"ups.load": 30, "ups.realpower.nominal": -600}, "negative", "ups.load x ups.realpower.nominal"),
        ({"ups.realpower": "inf"}, "nan", "ups.realpower"),
    ],
)
def test_unusable_figures_are_rejected(variables: dict[str, object], reason: str, detail: str) -> None:
    with pytest.raises(Rejected) as err:
        p(variables)
    assert err.value.reason == reason
    assert detail in err.value.detail


def test_garbage_rating_is_no_bound_and_no_figure_is_an_error() -> None:
    assert p({"ups.realpower": 1000, "ups.realpower.nominal": "unknown"})[0] == 1000
    with pytest.raises(SensorReadError, match="reports none of"):
        p({"ups.status": "OL", "input.realpower": 250})


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="password_file needs username"):
        UpsSettings(password_file=Path("/x"))
    with pytest.raises(ValidationError, match="outlet or share"):
        UpsSettings(outlet="1", share=0.5)
    with pytest.raises(ValidationError):
        UpsSettings(ups="two words")
    with pytest.raises(ValidationError):
        UpsSettings(power_factor=1.2)
    with pytest.raises(ValidationError):
        UpsSettings.model_validate({"hostname": "x"})
    s = UpsSettings()
    assert (s.host, s.port, s.ups, s.power_factor, s.share, s.outlet) == ("127.0.0.1", 3493, None, 0.9, 1.0, None)
