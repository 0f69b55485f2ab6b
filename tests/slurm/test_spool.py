"""The spool the Prolog and Epilog write: read cheaply (only what changed), malformed and half-written files
tolerated and reported once, jobs forgotten (and their files removed) once the ledger has them, memory bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog

from carbond.slurm.spool import SETTLE_S, JobMeta, SlurmSpool, parse_end, parse_meta, user_name
from carbond.testing.clock import ManualClock
from tests.slurm.spoolfiles import spool_dir, write_end, write_meta


def settled(spool: Path, clock: ManualClock) -> None:
    """Move the spool's wall clock past the settling time of every file and of the directory."""
    newest = max([spool.stat().st_mtime] + [p.stat().st_mtime for p in spool.iterdir()])
    clock.now = max(clock.now, newest + SETTLE_S + 1)


def test_metadata_and_end_are_read(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    write_meta(d, 42, start="1718000000.5")
    write_meta(d, 43, user="", uid=1001, account="", start=None)
    write_end(d, 42, 1_718_003_600)
    spool = SlurmSpool(d)
    spool.refresh()
    assert spool.meta("42") == JobMeta("42", "ada", "1000", "physics", "gpu", "train", "n[01-02]", 1718000000.5)
    assert spool.meta("43") == JobMeta("43", "", "1001", "", "gpu", "train", "n[01-02]", None)
    assert spool.meta("44") is None
    assert spool.ended() == [("42", 1_718_003_600.0)]
    assert spool.generation == 2


def test_only_changes_are_read(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    clock = ManualClock(0.0)
    write_meta(d, 1)
    spool = SlurmSpool(d, wall=clock)
    settled(d, clock)
    spool.refresh()
    assert (spool.scans, spool.reads) == (1, 1)
    for _ in range(5):  # nothing changed: one stat of the directory each, no listing, no read
        spool.refresh()
    assert (spool.scans, spool.reads) == (1, 1)
    write_meta(d, 2)
    write_meta(d, 3)
    settled(d, clock)
    spool.refresh()
    assert spool.scans == 2
    assert spool.reads == 3
    assert spool.meta("2") is not None
    assert spool.meta("3") is not None


def test_a_change_in_the_same_timestamp_tick_is_not_missed(tmp_path: Path) -> None:
    """A file renamed in after the listing but within the directory's timestamp granularity leaves the mtime as it
    was: a directory changed less than SETTLE_S ago is listed again."""
    d = spool_dir(tmp_path)
    write_meta(d, 1)
    spool = SlurmSpool(d)  # the real clock: the directory just changed
    spool.refresh()
    before = d.stat().st_mtime_ns
    write_meta(d, 2)
    os.utime(d, ns=(before, before))  # as if in the same tick
    spool.refresh()
    assert spool.meta("2") is not None


def test_metadata_rewritten_is_read_again(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    write_meta(d, 5, account="a")
    spool = SlurmSpool(d)
    spool.refresh()
    gen = spool.generation
    write_meta(d, 5, account="b")
    spool.refresh()
    meta = spool.meta("5")
    assert meta is not None
    assert meta.account == "b"
    assert spool.generation == gen + 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"job_id": "9", "user": "ad', "Unterminated string"),
        ("[1, 2]", "expected a JSON object"),
        ('{"job_id": "10"}', "does not match"),
        ('{"user": ["ada"]}', "user: expected a string"),
        ('{"start": "yesterday"}', "start: 'yesterday' is not a number"),
        ('{"start": -5}', "is not a time"),
        ('{"start": true}', "expected epoch seconds"),
        ('{"name": "' + "x" * 2000 + '"}', "longer than"),
        ('{"a": "' + "x" * 70_000 + '"}', "larger than"),
        ('{"user": "\xc3("}', "can't decode"),  # not UTF-8 (written as latin-1 bytes)
    ],
)
def test_malformed_files_are_reported_once(tmp_path: Path, text: str, reason: str) -> None:
    d = spool_dir(tmp_path)
    (d / "job_9.json").write_text(text, encoding="latin-1")
    write_meta(d, 8)
    clock = ManualClock(0.0)
    spool = SlurmSpool(d, wall=clock)
    settled(d, clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            spool.refresh()
            clock.advance(1)
    bad = [e for e in logs if e["event"] == "slurm_spool_file_malformed"]
    assert len(bad) == 1
    assert reason in bad[0]["error"]
    assert bad[0]["file"].endswith("job_9.json")
    assert spool.meta("9") is None
    assert spool.meta("8") is not None  # the others are read


def test_a_half_written_file_is_read_when_complete_without_a_report(tmp_path: Path) -> None:
    """A writer that does not rename (a site's own Prolog) is caught mid-write; the file completes in place, which
    does not change the directory's mtime."""
    d = spool_dir(tmp_path)
    path = d / "job_7.json"
    path.write_text('{"job_id": "7", "user": "gr')
    spool = SlurmSpool(d)
    with structlog.testing.capture_logs() as logs:
        spool.refresh()
        assert spool.meta("7") is None
        with path.open("r+") as f:  # same inode, same directory entry
            f.seek(0)
            f.write('{"job_id": "7", "user": "grace"}')
        spool.refresh()
    meta = spool.meta("7")
    assert meta is not None
    assert meta.user == "grace"
    assert not [e for e in logs if e["event"] == "slurm_spool_file_malformed"]


def test_an_end_file_without_a_time_ends_at_its_mtime(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    (d / "job_3.end").write_text("")
    os.utime(d / "job_3.end", (1_700_000_000, 1_700_000_000))
    (d / "job_4.end").write_text('{"job_id": 4}')
    os.utime(d / "job_4.end", (1_700_000_100, 1_700_000_100))
    spool = SlurmSpool(d)
    spool.refresh()
    assert spool.ended() == [("3", 1_700_000_000.0), ("4", 1_700_000_100.0)]


def test_other_names_and_links_are_ignored(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    elsewhere = write_meta(spool_dir(tmp_path / "x"), 11)
    (d / "job_11.json").symlink_to(elsewhere)
    write_meta(d, 12)
    (d / ".job_13.json.tmp").write_text('{"job_id": "13"}')  # a write not yet renamed
    (d / "job_14.json.swp").write_text("{}")
    (d / "job_x.json").write_text("{}")
    (d / "job_15.json").mkdir()
    spool = SlurmSpool(d)
    spool.refresh()
    assert [j for j in ("11", "12", "13", "14", "15") if spool.meta(j) is not None] == ["12"]


def test_forget_removes_the_job_and_its_files(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    write_meta(d, 21)
    write_end(d, 21, 100.0)
    write_meta(d, 22)
    spool = SlurmSpool(d)
    spool.refresh()
    spool.forget("21")
    assert spool.meta("21") is None
    assert spool.ended() == []
    assert sorted(p.name for p in d.iterdir()) == ["job_22.json"]
    spool.refresh()
    assert spool.meta("21") is None
    assert spool.meta("22") is not None
    spool.forget("99")  # unknown: nothing to do


def test_a_spool_that_cannot_delete_still_forgets(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    write_meta(d, 31)
    write_end(d, 31, 5.0)
    spool = SlurmSpool(d)
    spool.refresh()
    d.chmod(0o555)
    try:
        if os.access(d, os.W_OK):  # root ignores the mode; a file in the way of unlink does the same
            d.chmod(0o755)
            (d / "job_31.json").unlink()
            (d / "job_31.json").mkdir()
            (d / "job_31.json" / "x").touch()
        with structlog.testing.capture_logs() as logs:
            spool.forget("31")
            os.utime(d)  # the directory "changed": listed again
            spool.refresh()
    finally:
        d.chmod(0o755)
    assert spool.meta("31") is None
    assert spool.ended() == []
    assert any(e["event"] == "slurm_spool_unlink_failed" for e in logs)  # and not read again: meta is None


def test_memory_is_bounded_without_a_ledger(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    for job in range(1, 13):
        write_meta(d, job, start=1000 + job)
    for job in range(1, 5):
        write_end(d, job, 2000 - job)  # job 4 ended first
    spool = SlurmSpool(d, max_jobs=10)
    with structlog.testing.capture_logs() as logs:
        spool.refresh()
    held = [str(j) for j in range(1, 13) if spool.meta(str(j)) is not None]
    assert held == [str(j) for j in range(1, 13) if j not in (3, 4)]  # those that ended first went first
    assert [j for j, _ in spool.ended()] == ["2", "1"]
    assert [e["dropped"] for e in logs if e["event"] == "slurm_spool_full"] == [2]
    os.utime(d)
    spool.refresh()  # dropped files are not read again while they stay as they are
    assert spool.meta("4") is None


def test_a_missing_or_world_writable_spool_is_reported_once(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = SlurmSpool(d)
    with structlog.testing.capture_logs() as logs:
        spool.refresh()
        spool.refresh()
        d.mkdir()
        write_meta(d, 1)
        spool.refresh()
        assert spool.meta("1") is not None
        d.chmod(0o777)
        write_meta(d, 2)
        spool.refresh()
        spool.refresh()
        d.chmod(0o755)
    events = [e["event"] for e in logs]
    assert events == ["slurm_spool_unreadable", "slurm_spool_readable", "slurm_spool_unreadable"]
    assert "writable by every user" in logs[-1]["error"]
    assert spool.meta("2") is None  # not trusted


def test_parsers_directly() -> None:
    assert parse_meta("1", b'{"job_id": 1, "uid": 0, "extra": {"x": 1}}') == JobMeta("1", uid="0")
    prolog = (  # what deploy/slurm/prolog.sh writes, on a job without an account or a name
        b'{"job_id": "5", "user": "root", "uid": 0, "account": "", "partition": "debug", "name": "", '
        b'"nodes": "", "num_nodes": 1, "node": "localhost", "cluster": "c", "start": null}\n'
    )
    assert parse_meta("5", prolog) == JobMeta("5", "root", "0", "", "debug", "", "", None)
    assert parse_end("1", b"  \n", 12.0) == 12.0
    assert parse_end("1", b'{"end": "99.5"}', 12.0) == 99.5
    with pytest.raises(ValueError, match="not a time"):
        parse_end("1", b'{"end": "nan"}', 12.0)


def test_user_names() -> None:
    assert user_name("0") == "root"
    assert user_name("") == ""
    assert user_name("4000000000") == "4000000000"  # no such user: the uid
    assert user_name("ada") == "ada"
