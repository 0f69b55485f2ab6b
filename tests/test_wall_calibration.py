"""The wall calibration in the daemon's loop: learnt while the meter reads, used while it does not (node stays at the
wall with the fit's uncertainty), persisted across restarts, exported."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from carbond.exporter.collector import families
from carbond.model import Intensity, Snapshot
from carbond.monitor import Monitor
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from carbond.wallfit import FILE_NAME, WallCalibration
from tests.harness.monitors import build_monitor

pytestmark = pytest.mark.asyncio
FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0, year=2023)


def wall_of(components_w: float, util: float) -> float:
    return 60.0 + 1.15 * components_w + 20.0 * util  # the machine's truth


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.clock = ManualClock()
        self.proc = ProcTree(tmp / "proc")
        self.parts = FakeSensor([FakeDevice("package-0", "cpu", 40.0), FakeDevice("dram-0", "dram", 6.0)], self.clock)
        self.wall = FakeSensor([FakeDevice("psu", "platform", wall_of(46.0, 0.0))], self.clock)
        self.wall.name = "wall"
        self.state = tmp / "state"
        self.state.mkdir(exist_ok=True)
        self.rng = random.Random(7)

    async def monitor(self) -> Monitor:
        for s in (self.parts, self.wall):
            await s.start()
        mon = build_monitor(
            self.parts,
            self.wall,
            host="n",
            intensity=FR,
            clock=self.clock,
            host_reader=HostReader(self.proc.root),
            calibration=WallCalibration("wall", self.state),
        )
        await mon.prime()
        return mon

    async def step(self, mon: Monitor, package_w: float | None = None, util: float | None = None) -> Snapshot:
        package_w = self.rng.uniform(20.0, 120.0) if package_w is None else package_w
        util = self.rng.uniform(0.05, 0.95) if util is None else util
        self.parts.set_watts("package-0", package_w)
        self.wall.set_watts("psu", wall_of(package_w + 6.0, util))
        self.clock.advance(10)
        self.proc.advance(10, util)
        return await mon.tick()


async def test_the_fit_learns_the_wall_then_stands_in_for_a_failed_meter(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    mon = await rig.monitor()
    for _ in range(80):
        snap = await rig.step(mon)
    cal = snap.node.calibration
    assert cal is not None
    assert cal.sensor == "wall"
    assert not cal.in_use
    assert cal.samples >= 60
    assert cal.per_component == pytest.approx(1.15, rel=0.02)
    assert cal.intercept_w == pytest.approx(60.0, rel=0.05)
    await rig.step(mon, 70.0, 0.5)  # the wall's last good reading before it fails
    before = mon.latest()
    assert before is not None
    rig.wall.fail_next(3)
    with capture_logs() as logs:
        down = await rig.step(mon, 70.0, 0.5)
    truth = wall_of(76.0, 0.5)
    assert down.node.calibration is not None
    assert down.node.calibration.in_use
    assert down.node.platform == ""  # not measured at the wall this tick
    assert down.node.power_w == pytest.approx(truth, rel=0.03)  # modelled, not the 76 W of the components
    assert down.node.energy_j_total - before.node.energy_j_total == pytest.approx(truth * 10, rel=0.03)
    assert down.node.power_u_w > 0
    assert "node_source_calibration" in [e["event"] for e in logs]
    other = next(d for d in down.devices.states if d.kind == "other")
    assert other.power_w == pytest.approx(truth - 76.0, rel=0.1)
    names = {f.name for f in families(down)}
    assert {"carbond_calibration_component_ratio", "carbond_calibration_in_use"} <= names


async def test_the_fit_survives_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    mon = await rig.monitor()
    for _ in range(60):
        snap = await rig.step(mon)
    assert snap.node.calibration is not None
    assert snap.node.calibration.samples >= 30
    mon._final = True  # the daemon's last tick on the way out saves the fit
    await rig.step(mon)
    assert (rig.state / FILE_NAME).is_file()
    again = await Rig(tmp_path).monitor()
    restored = again.latest()
    cal = WallCalibration("wall", rig.state)
    assert cal.fit.n >= 30
    assert cal.fit.model != "none"
    assert restored is None  # nothing published yet, but the fit is there before the first tick
    other_meter = WallCalibration("another-bmc", rig.state)
    assert other_meter.fit.n == 0  # learnt against another meter: not reused
    (rig.state / FILE_NAME).write_text("{not json")
    assert WallCalibration("wall", rig.state).fit.n == 0  # corrupt file: a fresh fit, no crash


async def test_no_calibration_without_enough_data_keeps_the_component_sum(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    mon = await rig.monitor()
    for _ in range(5):
        await rig.step(mon)
    rig.wall.fail_next(1)
    snap = await rig.step(mon, 40.0, 0.3)
    assert snap.node.calibration is not None
    assert not snap.node.calibration.in_use
    assert snap.node.power_w == pytest.approx(46.0)
    assert math.isnan(next(d for d in snap.devices.states if d.kind == "other").power_w)
