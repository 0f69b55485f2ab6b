"""The state_dir lock is held for the whole life of the daemon process, across SIGHUP reloads.

A reload closes the measurement pipeline and builds a new one; the lock must not be released in between, or a
second daemon starting in that gap takes it and the first exits at its next build.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from carbond.state import LOCK_NAME
from tests.harness.daemon import Daemon, free_port
from tests.harness.wait import eventually

pytestmark = pytest.mark.e2e

CONFIG = {"measure_power_secs": 0.2, "sensors": ["fake"], "intensity": {"zone": "FR"}}


class Contender(threading.Thread):
    """Tries the lock the way a second daemon does (flock, non-blocking) as fast as it can; keeps it once taken."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        self.done = threading.Event()
        self.acquired = False
        self.tries = 0

    def run(self) -> None:
        while not self.done.is_set():
            self.tries += 1
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.done.wait(0.0002)  # pacing, not waiting: the next try comes at once
                continue
            self.acquired = True  # held until close(), as a second daemon would hold it
            return

    def close(self) -> None:
        self.done.set()
        self.join(5)
        os.close(self.fd)


def events(d: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]


def named(d: Daemon, event: str) -> list[dict[str, object]]:
    return [e for e in events(d) if e["event"] == event]


def outcomes(d: Daemon) -> list[dict[str, object]]:
    """The reloads' outcomes so far, in log order: reloaded or reload_rejected."""
    return [e for e in events(d) if e["event"] in ("reloaded", "reload_rejected")]


def reload(d: Daemon) -> dict[str, object]:
    """SIGHUP, and wait for the reload it causes to be done; returns its outcome."""
    assert d.proc is not None
    before = len(outcomes(d))
    d.proc.send_signal(signal.SIGHUP)
    done = eventually(lambda: outcomes(d)[before:], what="the reload's outcome in the log")
    assert len(done) == 1, done
    return done[0]


def test_a_second_daemon_never_gets_the_lock_while_the_first_reloads(tmp_path: Path) -> None:
    with Daemon(tmp_path, CONFIG) as d:
        contender = Contender(tmp_path / "state")
        contender.start()
        second_cfg = tmp_path / "second.yaml"
        second_cfg.write_text(
            yaml.safe_dump(
                {**CONFIG, "state_dir": str(tmp_path / "state"), "listen_address": f"127.0.0.1:{free_port()}"}
            )
        )
        second = subprocess.Popen(
            [sys.executable, "-m", "carbond", "run", "--config", str(second_cfg), "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # reloads back to back, each one closing and rebuilding the pipeline, until the second daemon has tried
            # (and given up) and the contender has tried across at least five of them
            reloads = 0
            while second.poll() is None or reloads < 5:
                assert reload(d)["event"] == "reloaded"
                reloads += 1
                assert reloads < 200, "the second daemon never gave up"
            _, second_err = second.communicate(timeout=60)
        finally:
            contender.close()
            if second.poll() is None:
                second.kill()
                second.wait()
        assert not contender.acquired, f"the lock was free during a reload ({contender.tries} tries)"
        assert contender.tries > 100  # it did try, all along
        assert second.returncode == 1
        assert "state_dir_in_use" in second_err
        reloaded = [e for e in events(d) if e["event"] == "reloaded"]
        assert len(reloaded) >= 5  # the reloads did happen while it tried
        assert d.proc is not None, d.log()
        assert d.proc.poll() is None, d.log()
        assert d.get("/readyz")[0] == 200
        assert d.stop() == 0


def test_a_reload_to_a_state_dir_another_process_holds_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with Daemon(tmp_path, CONFIG) as d:
        fd = os.open(other / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            cfg = yaml.safe_load(d.config_path.read_text())
            d.config_path.write_text(yaml.safe_dump({**cfg, "state_dir": str(other), "measure_power_secs": 0.3}))
            rejected = reload(d)
            assert rejected["event"] == "reload_rejected"
            assert str(other) in json.dumps(rejected["problems"])
            assert not [e for e in events(d) if e["event"] == "reloaded"]
            probe = os.open(tmp_path / "state" / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
            try:
                with pytest.raises(BlockingIOError):  # the running state_dir is still the daemon's
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
            assert d.get("/readyz")[0] == 200
        finally:
            os.close(fd)
        assert d.stop() == 0


def test_a_reload_that_moves_state_dir_takes_the_new_lock_and_releases_the_old(tmp_path: Path) -> None:
    new = tmp_path / "new"
    with Daemon(tmp_path, CONFIG) as d:
        cfg = yaml.safe_load(d.config_path.read_text())
        d.config_path.write_text(yaml.safe_dump({**cfg, "state_dir": str(new)}))
        assert reload(d)["event"] == "reloaded"
        old_fd = os.open(tmp_path / "state" / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        new_fd = os.open(new / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        try:

            def old_lock_free() -> bool:
                try:
                    fcntl.flock(old_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            eventually(old_lock_free, what="the old state_dir's lock let go (just after the new pipeline runs)")
            with pytest.raises(BlockingIOError):
                fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(old_fd)
            os.close(new_fd)
        assert (new / LOCK_NAME).read_text().strip() == str(d.proc.pid if d.proc else "")
        assert d.stop() == 0
