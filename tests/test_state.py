from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.model import Reading, SensorRead
from carbond.monitor import Monitor
from carbond.procfs import HostSample
from carbond.sensors.rapl import MAX_POWER_W
from carbond.state import (
    SLOT_BYTES,
    DeviceTotals,
    Persistence,
    SavedState,
    StateDirInUse,
    StateLock,
    StateStore,
    _flock,
    decode,
    downtime_joules,
    encode,
)
from carbond.testing.clock import ManualClock
from tests.harness.daemon import free_port
from tests.harness.monitors import build_monitor

RANGE_J = 262143.32885


class CounterSensor:
    """A RAPL-like device: cumulative joules from 0 at sensor start, and the raw wrapping counter."""

    name = "rapl"
    inline = True
    covers = frozenset({"cpu"})

    def __init__(self, clock: ManualClock, raw_start: float, watts: float) -> None:
        self.clock, self.raw_start, self.watts = clock, raw_start, watts
        self.t0 = clock()

    async def start(self) -> None:
        return None

    def raw(self) -> float:
        return (self.raw_start + self.watts * (self.clock() - self.t0)) % RANGE_J

    async def read(self, host: HostSample) -> SensorRead:
        joules = self.watts * (self.clock() - self.t0)
        return SensorRead((Reading("package-0", "cpu", joules, self.clock(), raw_j=self.raw(), range_j=RANGE_J),))

    async def close(self) -> None:
        return None


def monitor(sensor: CounterSensor, clock: ManualClock, wall: list[float], store: StateStore, boot: str) -> Monitor:
    return build_monitor(
        sensor, clock=clock, wall_clock=lambda: wall[0], persistence=Persistence(store, "h", boot, max_power_w=1000.0)
    )


@pytest.mark.asyncio
async def test_restart_continues_counters_and_recovers_downtime(tmp_path: Path) -> None:
    clock, wall = ManualClock(), [1.7e9]
    store = StateStore(tmp_path)
    first = CounterSensor(clock, raw_start=RANGE_J - 500, watts=50.0)  # will wrap while we are down
    mon = monitor(first, clock, wall, store, "boot-1")
    await mon.tick()
    for _ in range(3):
        clock.advance(10)
        wall[0] += 10
        snap = await mon.tick()
    assert snap.node.energy_j_total == pytest.approx(1500.0)
    # carbond is killed; 40 s pass; the hardware counter keeps running and wraps
    clock.advance(40)
    wall[0] += 40
    second = CounterSensor(clock, raw_start=first.raw(), watts=50.0)
    mon2 = monitor(second, clock, wall, store, "boot-1")
    snap = await mon2.tick()
    assert snap.node.energy_j_total == pytest.approx(1500.0 + 2000.0)  # 40 s x 50 W recovered
    clock.advance(10)
    wall[0] += 10
    snap = await mon2.tick()
    assert snap.node.energy_j_total == pytest.approx(1500.0 + 2000.0 + 500.0)
    assert snap.devices.states[0].energy_j_total == pytest.approx(4000.0)
    assert snap.node.emissions_g_total == pytest.approx(4000.0 / 3.6e6 * 50.0)


@pytest.mark.asyncio
async def test_other_boot_keeps_totals_but_adds_no_downtime(tmp_path: Path) -> None:
    clock, wall = ManualClock(), [1.7e9]
    store = StateStore(tmp_path)
    mon = monitor(CounterSensor(clock, 0.0, 10.0), clock, wall, store, "boot-1")
    await mon.tick()
    clock.advance(10)
    await mon.tick()
    mon2 = monitor(CounterSensor(clock, 5.0, 10.0), clock, wall, store, "boot-2")
    snap = await mon2.tick()
    assert snap.node.energy_j_total == pytest.approx(100.0)


def test_downtime_too_long_for_one_wrap_is_unknown() -> None:
    saved = DeviceTotals(0.0, 0.0, raw_j=100.0, range_j=2000.0)
    assert downtime_joules(saved, 300.0, 2000.0, downtime_s=1.0, max_power_w=1000) == pytest.approx(200.0)
    assert downtime_joules(saved, 50.0, 2000.0, downtime_s=1.0, max_power_w=1000) == pytest.approx(1950.0)
    assert downtime_joules(saved, 300.0, 2000.0, downtime_s=2.0, max_power_w=1000) is None
    assert downtime_joules(saved, None, None, downtime_s=1.0, max_power_w=1000) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\x00\xff garbage",
        b"[]",
        json.dumps({"format": "other"}).encode(),
        json.dumps({"format": "carbond-state/1", "host": "elsewhere", "devices": {}}).encode(),
        json.dumps(
            {
                "format": "carbond-state/1",
                "host": "h",
                "boot_id": "b",
                "saved_wall": 1,
                "node_energy_j_total": -5,
                "node_emissions_g_total": 0,
                "devices": {},
            }
        ).encode(),
        json.dumps(
            {
                "format": "carbond-state/1",
                "host": "h",
                "boot_id": "b",
                "saved_wall": 1,
                "node_energy_j_total": 1,
                "node_emissions_g_total": 0,
                "devices": {"x": {"energy_j_total": "NaN"}},
            }
        ).encode(),
    ],
)
def test_corrupt_truncated_or_foreign_state_is_ignored(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.write(content)  # an intact record (good CRC) whose document is not a usable state
    store.close()
    assert StateStore(tmp_path).load("h") is None


def test_a_state_dir_with_only_another_file_starts_empty(tmp_path: Path) -> None:
    """A counters.json (an earlier state format) or any other file is ignored, and left alone."""
    doc = {"format": "carbond-state/1", "host": "h", "boot_id": "b", "saved_wall": 1.0, "devices": {}}
    (tmp_path / "counters.json").write_text(json.dumps({**doc, "node_energy_j_total": 5.0}))
    p = Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W)
    assert p.restored is None
    assert p.node_totals() == (0.0, 0.0)
    p.save(p.new_state(2.0))
    p.close()
    assert StateStore(tmp_path).load("h") == SavedState("h", "b", 2.0)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["carbond.lock", "counters.json", "counters.state"]


def test_save_is_atomic_and_roundtrips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "sub")
    state = SavedState("h", "b", 5.0, 10.0, 1.0, {"rapl/package-0": DeviceTotals(10.0, 1.0, 3.0, 9.0)})
    store.save(state)
    assert store.load("h") == state
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["counters.state"]  # no temp file left behind


def test_a_torn_record_falls_back_to_the_other_slot(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    older = SavedState("h", "b", 5.0, 10.0, 1.0, {"rapl/package-0": DeviceTotals(10.0, 1.0, 3.0, 9.0)})
    newer = SavedState("h", "b", 6.0, 12.0, 1.2, {"rapl/package-0": DeviceTotals(12.0, 1.2, 5.0, 9.0)})
    store.save(older)
    store.save(newer, durable=False)
    store.close()
    assert StateStore(tmp_path).load("h") == newer
    data = bytearray(store.path.read_bytes())
    data[0 * SLOT_BYTES + 40] ^= (
        0xFF  # sequence 2 went to slot 0  # a crash mid-write: the newer record's body is damaged
    )
    store.path.write_bytes(bytes(data))
    reloaded = StateStore(tmp_path)
    assert reloaded.load("h") == older
    reloaded.save(newer)  # writes above the surviving record's sequence, into the damaged slot
    assert StateStore(tmp_path).load("h") == newer


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"CBDSTAT1" + b"\xff" * 40, bytes(range(256)) * 20])
def test_garbage_slot_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "counters.state").write_bytes(content)
    assert StateStore(tmp_path).load("h") is None


def test_unwritable_state_counts_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # mkdir under a regular file fails, even as root
    p = Persistence(StateStore(blocker / "state"), "h", "b", max_power_w=MAX_POWER_W)
    p.save(p.new_state(1.0))
    p.save(p.new_state(2.0))
    assert p.errors_total == 2


_finite_floats = st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(
    host=st.text(max_size=20),
    devices=st.dictionaries(
        st.text(max_size=20),
        st.tuples(_finite_floats, _finite_floats, st.none() | _finite_floats, st.none() | _finite_floats),
        max_size=5,
    ),
    embodied=st.dictionaries(st.text(max_size=10), _finite_floats, max_size=3),
    totals=st.tuples(_finite_floats, _finite_floats, _finite_floats),
)
def test_encoded_record_is_the_json_of_the_state(
    host: str,
    devices: dict[str, tuple[float, float, float | None, float | None]],
    embodied: dict[str, float],
    totals: tuple[float, float, float],
) -> None:
    state = SavedState(
        host=host,
        boot_id="boot",
        saved_wall=totals[0],
        node_energy_j_total=totals[1],
        node_emissions_g_total=totals[2],
        devices={k: DeviceTotals(*v) for k, v in devices.items()},
        embodied_g_total=embodied,
    )
    doc = json.loads(encode(state))
    assert doc["devices"] == {
        k: {"energy_j_total": a, "emissions_g_total": b, "raw_j": c, "range_j": d}
        for k, (a, b, c, d) in devices.items()
    }
    assert (doc["host"], doc["saved_wall"], doc["node_energy_j_total"]) == (host, totals[0], totals[1])
    assert decode(doc, host) == state  # and the loader takes it back unchanged


def test_a_fifo_at_the_state_path_neither_hangs_nor_is_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "counters.state")
    t0 = time.monotonic()
    p = Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W)  # a blocking open would hang here
    assert p.restored is None
    p.save(p.new_state(1.0))  # refused, counted, never written into the pipe
    assert p.errors_total == 1
    assert time.monotonic() - t0 < 2
    p.close()


def test_a_device_or_a_huge_file_at_the_state_path_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "counters.state").symlink_to("/dev/zero")  # reading it whole never ends
    assert StateStore(tmp_path / "zero").load("h") is None
    huge = tmp_path / "huge"
    huge.mkdir()
    with open(huge / "counters.state", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: costs no disk, would cost 1 GiB of memory to read whole
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert StateStore(huge).load("h") is None
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_a_second_daemon_on_the_same_state_dir_gets_a_clear_error(tmp_path: Path) -> None:
    first = Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W)
    with pytest.raises(StateDirInUse, match=rf"state_dir {tmp_path} is in use by process {os.getpid()}"):
        Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W)
    first.close()  # a store's own lock is released when it closes
    Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W).close()


def test_a_held_state_lock_outlives_the_stores_that_open_and_close_on_it(tmp_path: Path) -> None:
    held = StateLock.acquire(tmp_path)  # the daemon's, taken once for the process
    try:
        assert StateLock.acquire(tmp_path / ".." / tmp_path.name) is held
        for _ in range(3):  # the pipeline of each reload
            Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W).close()
            with pytest.raises(StateDirInUse):  # what another process's store meets, between reloads too
                _flock(tmp_path)
    finally:
        held.release()
    assert StateLock.held(tmp_path) is None
    Persistence(StateStore(tmp_path), "h", "b", max_power_w=MAX_POWER_W).close()
    (tmp_path / "file").write_text("not a directory")
    nothing = StateLock.acquire(tmp_path / "file" / "state")  # logged; each store then tries for itself
    assert StateLock.held(tmp_path / "file" / "state") is None
    nothing.release()


def test_a_second_daemon_process_exits_with_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sensors: [tdp]\nstate_dir: {tmp_path / 'state'}\nlisten_address: 127.0.0.1:{free_port()}\n")
    first = Persistence(StateStore(tmp_path / "state"), socket.gethostname(), "b", max_power_w=MAX_POWER_W)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "carbond", "run", "--config", str(cfg), "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        first.close()
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
    locked = [e for e in events if e["event"] == "state_dir_in_use"]
    assert len(locked) == 1
    assert str(tmp_path / "state") in locked[0]["error"]


@pytest.mark.parametrize("command", ["report", "budgets"])
def test_an_unwritable_output_path_is_one_line_and_no_traceback(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from carbond.cli import main

    if command == "report":
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"sensors: [fake]\nmeasure_power_secs: 0.1\nstate_dir: {tmp_path / 'state'}\n")
        source = tmp_path / "r.json"
        argv = ["measure", "--config", str(cfg), "-q", "--attribution", "machine", "--json", str(source)]
        assert main([*argv, "--", sys.executable, "-c", "pass"]) == 0
        args = ["report", str(source)]
    else:
        args = ["budgets", "render", str(Path(__file__).parents[1] / "deploy/prometheus/budgets.example.yaml")]
    capsys.readouterr()
    for target in (tmp_path / "missing-dir" / "out.txt", tmp_path):  # no such directory; a directory
        assert main([*args, "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"carbond: cannot write {target}: "), err


def test_a_killed_daemon_leaves_no_stale_lock_and_jobs_are_never_blocked(tmp_path: Path) -> None:
    """The lock is an flock: the kernel drops it with the process, so after SIGKILL (OOM killer, node crash) the
    next daemon starts. Jobs (measure, probe) never take it and run beside a daemon on the same config."""
    from tests.harness.daemon import Daemon

    with Daemon(tmp_path, {"sensors": ["tdp"], "measure_power_secs": 0.5}) as d:
        assert d.proc is not None
        cfg = str(d.config_path)
        carbond = [sys.executable, "-m", "carbond"]
        measure = [*carbond, "measure", "--config", cfg, "-q", "--", sys.executable, "-c", "pass"]
        for argv in (measure, [*carbond, "probe", "--config", cfg, "--seconds", "0.1"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (argv, done.stderr)
            assert "state_dir" not in done.stderr, (argv, done.stderr)
        d.proc.kill()
        d.proc.wait(10)
        assert (tmp_path / "state" / "carbond.lock").is_file()  # the file stays; its lock went with the process
        d.start()
        assert d.get("/readyz")[0] == 200
        assert "state_dir_in_use" not in d.log()
