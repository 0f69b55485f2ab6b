"""A state file that cannot be used: corrupt, short, unreadable or written for another host. The daemon starts,
says so in one log line, measures from zero and keeps going; the store never raises on any of them."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from carbond.sensors.rapl import MAX_POWER_W
from carbond.state import _HEADER, SLOT_BYTES, Persistence, SavedState, StateStore, encode
from tests.harness.daemon import Daemon, Metrics
from tests.harness.skips import skip_or_fail
from tests.harness.wait import eventually

HOST = "h"
LOAD_EVENTS = {"state_ignored", "state_unreadable"}


def _good(state_dir: Path, host: str = HOST, saves: int = 1) -> StateStore:
    store = StateStore(state_dir)
    for i in range(saves):
        store.save(SavedState(host, "boot", 1.7e9 + i, node_energy_j_total=5000.0 + i))
    store.close()
    return store


def corrupt(state_dir: Path) -> None:
    """An intact-looking record whose body no longer matches its CRC (a flipped bit)."""
    path = _good(state_dir).path
    data = bytearray(path.read_bytes())
    data[SLOT_BYTES + _HEADER.size + 3] ^= 0x40  # the first save (sequence 1) went to slot 1
    path.write_bytes(bytes(data))


def short(state_dir: Path) -> None:
    """A record cut after its header and a few bytes of its body (a copy or a disk that gave up)."""
    path = _good(state_dir).path
    data = path.read_bytes()
    path.write_bytes(data[: SLOT_BYTES + _HEADER.size + 5])


def foreign(state_dir: Path) -> None:
    """Both slots hold intact records, written for another host (a state_dir copied from another node)."""
    _good(state_dir, host="elsewhere", saves=2)


def unreadable(state_dir: Path) -> None:
    """Something at the path that cannot be opened as the state file: a directory (mode bits do not stop root)."""
    (state_dir / "counters.state").mkdir(parents=True)


def events(log_text: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def persist_errors(m: Metrics) -> float:
    return next((v for (name, _), v in m.items() if name == "carbond_state_persist_errors_total"), 0.0)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("damage", "event", "reason"),
    [
        (corrupt, "state_ignored", "no intact record"),
        (short, "state_ignored", "no intact record"),
        (foreign, "state_ignored", "written for host 'elsewhere'"),
        (unreadable, "state_unreadable", ""),
    ],
    ids=["corrupt", "short", "foreign", "unreadable"],
)
def test_the_daemon_starts_on_a_bad_state_file_with_one_log_line_and_keeps_going(
    tmp_path: Path, damage: Callable[[Path], None], event: str, reason: str
) -> None:
    state_dir = tmp_path / "state"
    damage(state_dir)
    cfg = {"measure_power_secs": 0.2, "sensors": ["fake"], "host_name": HOST, "intensity": {"zone": "FR"}}
    with Daemon(tmp_path, cfg) as d:
        d.wait_for_ticks(3)  # started, and measuring
        if damage is unreadable:
            # every save fails, is counted, and the daemon goes on; the failure is logged once, not per tick
            d.wait_for(lambda m: persist_errors(m) >= 3, what="failed saves counted")
            d.wait_for_ticks(2)
        else:  # the next save replaces the bad file with this host's counters
            saved = eventually(lambda: StateStore(state_dir).load(HOST), what="a good state file")
            assert saved.host == HOST
            assert saved.node_energy_j_total < 5000.0
        log = d.log()
    assert d.proc is not None
    assert d.proc.returncode == 0
    said = [e for e in events(log) if e.get("event") in LOAD_EVENTS]
    assert [e["event"] for e in said] == [event], said
    assert reason in said[0].get("reason", said[0].get("error", ""))
    assert "Traceback" not in log
    if damage is unreadable:
        assert [e["event"] for e in events(log) if e.get("event", "").startswith("state_persist")] == [
            "state_persist_failed"
        ]


def test_a_read_error_on_the_state_file_is_logged_and_ignored(tmp_path: Path) -> None:
    """A regular file whose read fails (EIO): ``/proc/self/mem`` at offset 0 is one, on every Linux."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError as exc:
        skip_or_fail(f"/proc/self/mem cannot be opened here: {exc}")
    try:
        with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is asserted below, not the text
            os.pread(fd, 16, 0)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EIO
    (tmp_path / "counters.state").symlink_to("/proc/self/mem")
    with capture_logs() as logs:
        p = Persistence(StateStore(tmp_path), HOST, "boot", max_power_w=MAX_POWER_W)
    assert p.restored is None
    assert p.node_totals() == (0.0, 0.0)
    assert [(e["event"], os.strerror(errno.EIO) in e["error"]) for e in logs] == [("state_unreadable", True)]
    p.close()  # never saved: the test does not write through that link


def _doc(**changes: Any) -> bytes:
    doc = json.loads(encode(SavedState(HOST, "boot", 1.7e9, node_energy_j_total=10.0)))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (_doc(node_energy_j_total=10**400), "node_energy_j_total"),  # too large for a float: not a crash
        (_doc(devices=[]), "devices"),
        (_doc(devices={"rapl/package-0": 5}), "device entry"),
        (_doc(devices={"rapl/package-0": {"energy_j_total": 1.0, "emissions_g_total": 0.0, "raw_j": -1}}), "raw_j"),
        (_doc(embodied_g_total=[1.0]), "embodied_g_total"),
        (_doc(boot_id=7), "boot_id"),
        (b"[" * 100_000 + b"]" * 100_000, ""),  # JSON nested past the recursion limit
    ],
    ids=["huge-number", "devices-list", "device-scalar", "negative-raw", "embodied-list", "boot-id-int", "deep"],
)
def test_each_malformed_record_is_one_line_naming_what_is_wrong(tmp_path: Path, body: bytes, named: str) -> None:
    store = StateStore(tmp_path)
    store.write(body)  # an intact record (its CRC matches) of a document that is not a usable state
    store.close()
    with capture_logs() as logs:
        p = Persistence(StateStore(tmp_path), HOST, "boot", max_power_w=MAX_POWER_W)
    assert p.restored is None
    assert [e["event"] for e in logs] == ["state_ignored"]
    assert named in logs[0]["reason"]
    p.save(p.new_state(1.7e9 + 5))  # and the store goes on: the next save is a good record
    p.close()
    assert StateStore(tmp_path).load(HOST) == SavedState(HOST, "boot", 1.7e9 + 5)


def test_a_bad_newest_record_falls_back_to_the_older_one_with_one_line(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(SavedState(HOST, "boot", 1.7e9, node_energy_j_total=10.0))
    store.write(_doc(boot_id=None))  # the newer slot: intact, but not a usable state
    store.close()
    with capture_logs() as logs:
        restored = StateStore(tmp_path).load(HOST)
    assert restored is not None
    assert restored.node_energy_j_total == 10.0
    assert [e["event"] for e in logs] == ["state_ignored"]
    assert "boot_id" in logs[0]["reason"]


def test_two_foreign_records_are_one_line_not_one_per_slot(tmp_path: Path) -> None:
    foreign(tmp_path)
    with capture_logs() as logs:
        assert StateStore(tmp_path).load(HOST) is None
    assert [e["event"] for e in logs] == ["state_ignored"]
    assert "elsewhere" in logs[0]["reason"]
