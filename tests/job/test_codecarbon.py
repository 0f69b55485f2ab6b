"""carbond.codecarbon: CodeCarbon-style scripts run with only the import changed, on the shipped fake sensors."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carbond.codecarbon import EmissionsData, EmissionsTracker, track_emissions, zone_of
from carbond.job.csvfile import CODECARBON_COLUMNS, CODECARBON_TASK_COLUMNS, COLUMNS

from .conftest import PUE, assert_ratio, together

#: written for CodeCarbon 3.3 (its documented usages); only the first line changes for carbond
SCRIPT = """from codecarbon import EmissionsTracker, OfflineEmissionsTracker, track_emissions
import time


def busy(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


tracker = EmissionsTracker(project_name="explicit", measure_power_secs=1, save_to_api=False, api_key="x")
tracker.start()
try:
    busy(0.3)
finally:
    emissions = tracker.stop()
print("explicit", type(emissions).__name__, emissions > 0, tracker.final_emissions == emissions)
print("data", tracker.final_emissions_data.project_name, tracker.final_emissions_data.energy_consumed > 0)

with EmissionsTracker(project_name="context", measure_power_secs=1) as t:
    busy(0.2)
print("context", t.final_emissions > 0)


@track_emissions
def bare():
    busy(0.1)
    return "bare-result"


@track_emissions(project_name="decorated", offline=True, country_iso_code="FRA", measure_power_secs=1)
def with_args(x):
    busy(0.1)
    return x * 2


print(bare(), with_args(21))

offline = OfflineEmissionsTracker(project_name="offline", country_iso_code="FRA", measure_power_secs=1)
offline.start()
offline.start_task("load")
busy(0.1)
load = offline.stop_task()
offline.start_task("train")
busy(0.3)
train = offline.stop_task()
partial = offline.flush()
total = offline.stop()
print("tasks", load.energy_consumed < train.energy_consumed, load.duration > 0, partial <= total)
"""


def _run(script: str, cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CARBOND_CONFIG": str(config), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_codecarbon_script_with_only_the_import_changed(fake_config: Path, tmp_path: Path) -> None:
    script = SCRIPT.replace("from codecarbon import", "from carbond.codecarbon import", 1)
    assert [a for a, b in zip(SCRIPT.splitlines(), script.splitlines(), strict=True) if a != b] == [
        SCRIPT.splitlines()[0]
    ]
    done = _run(script, tmp_path, fake_config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "explicit float True True",
        "data explicit True",
        "context True",
        "bare-result 42",
        "tasks True True True",
    ]
    # one warning naming the options carbond does not implement; no raw Python warning, no traceback
    ignored = [line for line in done.stderr.splitlines() if "does not implement" in line]
    assert len(ignored) == 1, done.stderr
    assert ignored[0].endswith("ignored: api_key, save_to_api"), done.stderr
    assert "Warning:" not in done.stderr
    assert "Traceback" not in done.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "emissions.csv").read_text())))
    assert list(rows[0]) == list(COLUMNS)
    # codecarbon's default project name for the bare decorator; flush adds a row for the offline run
    projects = [r["project_name"] for r in rows]
    assert projects == ["explicit", "context", "codecarbon", "decorated", "offline", "offline"]
    for r in rows:
        assert float(r["emissions"]) > 0
        assert r["tracking_mode"] == "machine"
        assert r["error"] == ""
        assert r["experiment_id"] == "5b0fa12a-3dd7-45bb-9766-cc326314d9f1"
        # CodeCarbon's meaning: energy_consumed includes the PUE; emissions = IT energy x PUE x intensity
        assert float(r["energy_consumed"]) == pytest.approx(float(r["it_energy_consumed"]) * PUE)
        assert_ratio(float(r["it_energy_consumed"]) * 3.6e6, float(r["emissions"]) * 1000)
    assert rows[3]["country_iso_code"] == "FRA"
    assert rows[4]["intensity_zone"] == "FR"
    offline_run = rows[-1]["run_id"]
    assert rows[-2]["run_id"] == offline_run
    assert float(rows[-2]["duration"]) <= float(rows[-1]["duration"])
    tasks = list(csv.DictReader(io.StringIO((tmp_path / f"emissions_base_{offline_run}.csv").read_text())))
    assert list(tasks[0])[: len(CODECARBON_TASK_COLUMNS)] == CODECARBON_TASK_COLUMNS
    assert [t["task_name"] for t in tasks] == ["load", "train"]
    assert sum(float(t["energy_consumed"]) for t in tasks) <= float(rows[-1]["energy_consumed"]) * 1.01


def test_keywords_honoured(fake_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    tracker = EmissionsTracker(
        project_name="kw",
        experiment_id="exp-1",
        measure_power_secs=0.2,
        tracking_mode="process",
        gpu_ids=[],  # no GPU counted: the fake gpu-0's 100 W is left out
        output_dir=str(out),
        output_file="mine.csv",
        pue=2.0,
        wue=1.8,
        config=fake_config,
    )
    tracker.start()
    t = 0.0
    import time

    start = time.process_time()
    while time.process_time() - start < 0.3:
        t += 1
    kg = tracker.stop()
    assert kg is not None
    assert kg > 0
    data = tracker.final_emissions_data
    assert data is not None
    assert isinstance(data, EmissionsData)
    assert (data.project_name, data.experiment_id, data.tracking_mode, data.pue) == ("kw", "exp-1", "process", 2.0)
    assert data.gpu_energy == 0.0
    assert data.cpu_energy > 0
    assert data.water_consumed == pytest.approx(1.8 * data.energy_consumed)
    report = tracker.report()
    assert report.scope == "job"
    assert "gpu-0" not in {d.device for d in report.devices}
    row = next(csv.DictReader(io.StringIO((out / "mine.csv").read_text())))
    assert row["run_id"] == str(tracker.run_id)
    assert float(row["pue"]) == 2.0
    again = EmissionsTracker(save_to_file=False, measure_power_secs=0.2, config=fake_config)
    with again:
        pass
    assert again.final_emissions is not None
    assert not (tmp_path / "emissions.csv").exists()


def test_update_mode_keeps_one_row_per_run(fake_config: Path, tmp_path: Path) -> None:
    tracker = EmissionsTracker(
        output_dir=str(tmp_path), on_csv_write="update", measure_power_secs=0.2, config=fake_config
    )
    tracker.start()
    tracker.flush()
    tracker.flush()
    tracker.stop()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "emissions.csv").read_text())))
    assert len(rows) == 1
    assert rows[0]["run_id"] == str(tracker.run_id)


def test_codecarbon_columns_only(fake_config: Path, tmp_path: Path) -> None:
    with EmissionsTracker(
        output_dir=str(tmp_path), csv_columns="codecarbon", measure_power_secs=0.2, config=fake_config
    ):
        pass
    header = (tmp_path / "emissions.csv").read_text().splitlines()[0].split(",")
    assert header == CODECARBON_COLUMNS


def test_bad_keywords_and_values(fake_config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        EmissionsTracker(no_such_option=1)
    with caplog.at_level(logging.ERROR, logger="carbond.codecarbon"):  # logged and replaced, never raised
        EmissionsTracker(on_csv_write="replace", save_to_file=False, config=fake_config)
        EmissionsTracker(tracking_mode="gpu", save_to_file=False, config=fake_config)
    assert "on_csv_write" in caplog.text
    assert "tracking_mode" in caplog.text
    caplog.clear()
    with pytest.raises(OSError, match="doesn't exist"):
        EmissionsTracker(output_dir=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="projet_name"):
        track_emissions(projet_name="typo")
    with caplog.at_level(logging.WARNING, logger="carbond.codecarbon"):
        EmissionsTracker(output_dir=str(tmp_path), api_key="k", logger_preamble="p", config=fake_config)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "api_key" in said[0], said
    assert "logger_preamble" in said[0], said


def test_stop_without_start_and_double_start(fake_config: Path, tmp_path: Path) -> None:
    tracker = EmissionsTracker(output_dir=str(tmp_path), measure_power_secs=0.2, config=fake_config)
    assert tracker.stop() is None
    assert tracker.flush() is None
    assert tracker.stop_task() is None
    tracker.start()
    tracker.start()  # a warning, the run goes on
    assert (tracker.stop() or 0) > 0


def test_allow_multiple_runs_false_locks(fake_config: Path, tmp_path: Path) -> None:
    first = EmissionsTracker(
        output_dir=str(tmp_path), allow_multiple_runs=False, measure_power_secs=0.2, config=fake_config
    )
    second = EmissionsTracker(output_dir=str(tmp_path), allow_multiple_runs=False, config=fake_config)
    second.start()
    assert second.stop() is None  # inert while the first holds the lock
    first.start()
    assert (first.stop() or 0) > 0
    third = EmissionsTracker(
        output_dir=str(tmp_path), allow_multiple_runs=False, measure_power_secs=0.2, config=fake_config
    )
    with third:
        pass
    assert third.final_emissions is not None  # the lock was released by the first's stop


def test_zones_from_codecarbon_locations() -> None:
    assert zone_of("FRA") == "FR"
    assert zone_of("USA", "california") == "US-CA"
    assert zone_of("CAN", "quebec") == "CA-QC"
    assert zone_of(cloud_provider="aws", cloud_region="eu-west-3") == "aws:eu-west-3"
    assert zone_of(country_2letter_iso_code="de") == "DE"
    assert zone_of() is None
    with pytest.raises(ValueError, match="cloud_region"):
        zone_of(cloud_provider="gcp")


def test_decorator_keeps_the_function(fake_config: Path, tmp_path: Path) -> None:
    @track_emissions(output_dir=str(tmp_path), measure_power_secs=0.2, config=fake_config)
    def work(a: int, b: int = 1) -> int:
        """doc"""
        return a + b

    assert work(1, b=2) == 3
    assert work.__name__ == "work"
    assert work.__doc__ == "doc"
    with pytest.raises(ZeroDivisionError):
        track_emissions(lambda: 1 / 0, output_dir=str(tmp_path), config=fake_config)()
    assert len((tmp_path / "emissions.csv").read_text().splitlines()) == 3  # header + both runs, the failing one too


def test_nothing_measured_is_a_log_line_not_an_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sensors: [rapl]\npaths: {{sysfs: {tmp_path / 'nosys'}}}\n")
    with caplog.at_level(logging.WARNING, logger="carbond.codecarbon"):
        tracker = EmissionsTracker(output_dir=str(tmp_path), config=cfg)
        tracker.start()
        assert tracker.stop() is None  # unknown, as CodeCarbon's None: a 0 kg here would be summed into a report
    assert tracker.final_emissions is None
    assert tracker.final_emissions_data is None
    assert any("not measuring: no sensor available" in r.getMessage() for r in caplog.records)
    assert not [w for w in recwarn if "not measuring" in str(w.message)]  # no raw Python warning
    row = next(csv.DictReader(io.StringIO((tmp_path / "emissions.csv").read_text())))
    assert row["scope"] == "none"
    assert "no sensor available" in row["error"]
    assert row["emissions"] == ""


def test_import_starts_nothing() -> None:
    code = (
        "import sys, threading\n"
        "from carbond.codecarbon import EmissionsTracker\n"
        "assert threading.active_count() == 1\n"
        "assert not {'pynvml', 'amdsmi'} & set(sys.modules)\n"
        "assert not {'pydantic', 'carbond.config', 'carbond.job.tracker'} & set(sys.modules)\n"  # 0.02 s, not 0.24
        "EmissionsTracker(save_to_file=False)\n"  # constructing measures nothing yet either
        "assert threading.active_count() == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr


def test_one_tracker_stopped_from_two_threads(fake_config: Path, tmp_path: Path) -> None:
    """Both callers get the run's kg; the file gets the run's rows only (no empty 'not measured' row)."""
    for n in range(8):
        out = tmp_path / f"{n}.csv"
        tracker = EmissionsTracker(
            output_file=out.name, output_dir=str(tmp_path), measure_power_secs=0.2, config=fake_config
        )
        tracker.start()
        got: list[float | None] = []

        def flush(t: EmissionsTracker = tracker) -> None:
            for _ in range(5):
                t.flush()

        def stop(t: EmissionsTracker = tracker, got: list[float | None] = got) -> None:
            got.append(t.stop())

        together(stop, stop, flush)
        assert len(got) == 2, (n, got)
        assert got[0] == got[1], (n, got)
        assert (got[0] or 0) > 0, (n, got)
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        assert all(r["error"] == "" and float(r["emissions"]) > 0 for r in rows), rows
        assert {r["run_id"] for r in rows} == {str(tracker.run_id)}


def test_a_forked_child_leaves_the_parents_run_alone(fake_config: Path, tmp_path: Path) -> None:
    """A child forked while the tracker runs (multiprocessing's fork, or a ``with`` block unwound in the child):
    its ``stop()`` is ignored at once (it used to wait 10 s for the measuring thread it does not have, then write
    a failed row); the parent's stop writes the run's only row."""
    import multiprocessing
    import time

    tracker = EmissionsTracker(output_dir=str(tmp_path), measure_power_secs=0.2, config=fake_config)
    tracker.start()

    def child() -> None:
        os._exit(0 if tracker.stop() is None and tracker.flush() is None else 1)

    started = time.monotonic()
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert time.monotonic() - started < 5
    assert (tracker.stop() or 0) > 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "emissions.csv").read_text())))
    assert len(rows) == 1
    assert rows[0]["error"] == ""
    assert float(rows[0]["emissions"]) > 0


CONFIGURED = """from codecarbon import OfflineEmissionsTracker
import sys
t = OfflineEmissionsTracker(**dict(arg.split("=", 1) for arg in sys.argv[1:]))
t.start()
print(t.stop() > 0)
"""


def configured_run(python: str, cwd: Path, *kwargs: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """CONFIGURED run in ``cwd`` under CodeCarbon's configuration there: HOME's and the local
    ``.codecarbon.config``, ``CODECARBON_*`` variables; the row it wrote."""
    home = cwd / "home"
    (cwd / "out").mkdir(parents=True)
    home.mkdir()
    (home / ".codecarbon.config").write_text("[codecarbon]\nproject_name = home\nexperiment_id = home-exp\n")
    local = "[codecarbon]\nproject_name = local\noutput_dir = out\nmeasure_power_secs = 1\nsave_to_api = False\n"
    (cwd / ".codecarbon.config").write_text(local)
    variables = {**os.environ, **(env or {}), "HOME": str(home), "CODECARBON_COUNTRY_ISO_CODE": "DEU"}
    variables["CODECARBON_LOG_LEVEL"] = "error"
    script = CONFIGURED if "codecarbon" in python else CONFIGURED.replace("from codecarbon", "from carbond.codecarbon")
    done = subprocess.run(
        [python, "-c", script, *kwargs], cwd=cwd, env=variables, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True\n", done.stderr
    return next(csv.DictReader(io.StringIO((cwd / "out" / "emissions.csv").read_text())))


def test_codecarbon_config_files_and_variables(fake_config: Path, tmp_path: Path) -> None:
    """Keywords not given come from CODECARBON_* variables, then ./.codecarbon.config, then ~/.codecarbon.config
    (they were ignored: a row in ./emissions.csv, project 'codecarbon', no country for the offline tracker)."""
    row = configured_run(sys.executable, tmp_path / "a", env={"CARBOND_CONFIG": str(fake_config)})
    assert (row["project_name"], row["experiment_id"], row["country_iso_code"]) == ("local", "home-exp", "DEU")
    assert row["intensity_zone"] == "DE"
    row = configured_run(sys.executable, tmp_path / "b", "project_name=kw", env={"CARBOND_CONFIG": str(fake_config)})
    assert row["project_name"] == "kw"  # a keyword wins
    bad = tmp_path / "c"
    bad.mkdir()
    (bad / ".codecarbon.config").write_text("[codecarbon]\nmeasure_power_secs = often\n")
    with contextlib.chdir(bad):  # logged and ignored: the default interval, and the run goes on
        tolerant = EmissionsTracker(config=fake_config, save_to_file=False)
    assert tolerant is not None


def test_two_trackers_in_two_threads_leave_the_programs_warnings_alone(fake_config: Path, tmp_path: Path) -> None:
    """Each tracker reports its problems on the logger, not by catching Python warnings around its calls
    (process-wide: interleaved, one thread's 'always' filter stayed and later warnings went to a dead list)."""
    import warnings

    before = list(warnings.filters)
    for n in range(4):

        def run(name: str = f"{n}") -> None:
            with EmissionsTracker(output_file=f"{name}.csv", output_dir=str(tmp_path), config=fake_config):
                pass

        together(run, lambda n=n: run(f"{n}b"))
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown", UserWarning, stacklevel=1)
