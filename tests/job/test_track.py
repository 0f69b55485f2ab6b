from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import carbond
from carbond.config import load
from carbond.job.report import load_json
from carbond.job.tracker import MeasurementWarning, Tracker

from .conftest import assert_ratio, together


def _burn(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def test_context_manager_with_phases(fake_config: Path, tmp_path: Path) -> None:
    threads = threading.active_count()
    out_json, out_csv = tmp_path / "r.json", tmp_path / "e.csv"
    with carbond.track(project="p", config=fake_config, interval_s=0.2, json=out_json, csv=out_csv) as t:
        assert threading.active_count() == threads + 1  # one measuring thread, only while tracking
        with t.phase("train"):
            _burn(0.3)
        with t.phase("idle"):
            time.sleep(0.1)
        assert t.report().scope == "job"  # live figures while running
    assert threading.active_count() == threads
    r = t.report()
    assert (r.project, r.scope, r.method) == ("p", "job", "proctree")
    assert t.duration_s == r.duration_s >= 0.4
    assert t.energy_kwh == r.energy_kwh > 0
    assert t.emissions_g == r.emissions_g
    assert_ratio(r.energy_j, r.emissions_g)
    train, idle = r.phases
    assert (train.name, idle.name) == ("train", "idle")
    assert train.duration_s >= 0.3
    assert idle.started_s >= train.started_s + train.duration_s
    assert_ratio(train.energy_j, train.emissions_g)
    assert train.energy_j > idle.energy_j  # burning CPU is a larger share than sleeping
    assert train.energy_j + idle.energy_j <= r.energy_j + 1e-9
    # package 40 W + dram 6 W + gpu 100 W (core is inside the package)
    assert train.machine_energy_j == pytest.approx(146.0 * train.duration_s, rel=0.25)
    assert load_json(out_json).run_id == r.run_id
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [row["run_id"] for row in rows] == [r.run_id]
    # phases are rows of CodeCarbon's task file beside it, in the same units as the run's row
    tasks = list(csv.DictReader(io.StringIO((tmp_path / f"emissions_base_{r.run_id}.csv").read_text())))
    assert [t["task_name"] for t in tasks] == ["train", "idle"]
    assert float(tasks[0]["it_energy_consumed"]) * 3.6e6 == pytest.approx(train.energy_j)
    assert float(tasks[0]["energy_consumed"]) == pytest.approx(float(tasks[0]["it_energy_consumed"]) * 1.5)


def test_decorator_new_run_per_call(fake_config: Path) -> None:
    @carbond.track(project="deco", config=fake_config, interval_s=0.2)
    def work(x: int) -> int:
        _burn(0.1)
        return 2 * x

    assert work(3) == 6
    tracker: Tracker = work.tracker  # type: ignore[attr-defined]
    first = tracker.report()
    assert first.project == "deco"
    assert first.energy_j > 0
    assert work(4) == 8
    assert tracker.report().run_id != first.run_id
    assert work.__name__ == "work"


def test_async_decorator(fake_config: Path) -> None:
    t = carbond.track(config=fake_config, interval_s=0.2, scope="machine")

    @t
    async def work() -> str:
        await asyncio.sleep(0.2)
        return "done"

    assert asyncio.run(work()) == "done"
    r = t.report()
    assert (r.scope, r.method) == ("machine", "machine")
    assert r.energy_j == r.machine_energy_j > 0
    assert_ratio(r.energy_j, r.emissions_g)


def test_failure_warns_and_gives_an_empty_report(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.warns(MeasurementWarning, match="not measuring"), carbond.track(config=missing) as t:  # noqa: PT031
        with t.phase("p"):  # the warning may come at start or at the phase: the whole use is what is checked
            pass
        value = 42
    assert value == 42
    r = t.report()
    assert r.scope == "none"
    assert str(missing) in r.error
    assert r.energy_j == 0
    assert [p.name for p in r.phases] == ["p"]


def test_user_exceptions_propagate_and_the_run_still_ends(fake_config: Path) -> None:
    t = carbond.track(config=fake_config, interval_s=0.2)
    with pytest.raises(ZeroDivisionError), t:
        _ = 1 / 0
    assert t.report().scope == "job"


def test_no_sensor_is_a_warning_not_an_error(tmp_path: Path) -> None:
    cfg = load(None).model_copy(update={"sensors": ["rapl"]})
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"sysfs": tmp_path})})
    with pytest.warns(MeasurementWarning, match="no sensor available"), carbond.track(config=cfg) as t:
        pass
    assert t.report().scope == "none"


def test_import_is_cheap_and_side_effect_free() -> None:
    code = (
        "import sys, threading\n"
        "import carbond\n"
        "assert not any(m.startswith(('carbond.job', 'carbond.app', 'carbond.monitor')) for m in sys.modules)\n"
        "assert threading.active_count() == 1\n"
        "from carbond import track\n"
        "assert callable(track) and threading.active_count() == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout == "ok\n", out.stderr


def test_stopped_from_two_threads_writes_one_row(fake_config: Path, tmp_path: Path) -> None:
    """The second stop waits for the first and gets the same report (it used to write a 'not measured' row)."""
    for n in range(5):
        out = tmp_path / f"{n}.csv"
        t = Tracker("p", config=fake_config, interval_s=0.2, csv=out).start()
        got: list[float] = []

        def stop(t: Tracker = t, got: list[float] = got) -> None:
            got.append(t.stop().emissions_g)

        together(stop, stop)
        assert len(got) == 2, (n, got)
        assert got[0] == got[1] > 0, (n, got)
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        assert len(rows) == 1, rows
        assert rows[0]["error"] == "", rows


def test_a_forked_child_neither_waits_nor_writes(fake_config: Path, tmp_path: Path) -> None:
    """``with track(...)`` unwound in a child forked inside it: the child's stop returns at once and writes no row;
    the parent's run is whole."""
    import os

    out = tmp_path / "e.csv"
    with carbond.track(project="fork", config=fake_config, interval_s=0.2, csv=out) as t:
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: what unwinding the with block does, then leave without pytest's teardown
            r = t.stop()
            os._exit(0 if r.scope == "none" and "forked child" in r.error and time.monotonic() - started < 5 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1
    assert rows[0]["error"] == ""
    assert float(rows[0]["emissions"]) > 0


def test_older_header_warns_codecarbons_does_not(fake_config: Path, tmp_path: Path) -> None:
    """An older carbond header loses columns (a warning names them); CodeCarbon's own header is expected."""
    from carbond.job.csvfile import CODECARBON_COLUMNS, COLUMNS

    older, theirs = tmp_path / "older.csv", tmp_path / "theirs.csv"
    older.write_text(",".join(c for c in COLUMNS if c != "embodied_emissions") + "\n")
    theirs.write_text(",".join(CODECARBON_COLUMNS) + "\n")
    for path, expected in ((older, ["embodied_emissions"]), (theirs, [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with carbond.track(config=fake_config, interval_s=0.2, csv=path):
                pass
        named = [str(w.message).rpartition(": ")[2] for w in caught if "older header" in str(w.message)]
        assert named == expected, path
        assert len(path.read_text().splitlines()) == 2
