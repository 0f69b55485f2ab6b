"""CodeCarbon 3.3's output methods on carbond's drop-in: the Pushgateway (a loopback fake), the logger output,
the user's own output handlers, the methods carbond does not implement, and carbonboard reading carbond's file."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from carbond.codecarbon import EmissionsData, EmissionsTracker, LoggerOutput, OfflineEmissionsTracker, OutputMethod
from carbond.testing.pushgateway import FakePushgateway


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_pushgateway_gets_codecarbons_metrics_at_flush_and_stop(fake_config: Path) -> None:
    with FakePushgateway() as gw:
        t = OfflineEmissionsTracker(
            project_name="my proj",
            country_iso_code="FRA",
            save_to_prometheus=True,
            prometheus_url=gw.address,
            config=fake_config,
            measure_power_secs=1,
        )
        t.start()
        t.flush()
        t.stop()
        pushes = gw.received()
    assert [p.method for p in pushes] == ["PUT", "PUT", "DELETE"]
    assert {p.path for p in pushes} == {"/metrics/job/my_proj_base"}  # CodeCarbon's job name
    body = pushes[1].body
    for name in (
        "codecarbon_emissions",
        "codecarbon_energy_consumed",
        "codecarbon_cpu_power",
        "codecarbon_energy_total",
    ):
        assert f"\n{name}" in body or body.startswith(name) or f"# TYPE {name}" in body, name
    assert 'project_name="my proj"' in body


def test_a_pushgateway_that_is_down_is_logged_not_raised(fake_config: Path) -> None:
    with FakePushgateway() as gw:
        address = gw.address
    errors = Collect()
    logging.getLogger("carbond.codecarbon").addHandler(errors)
    try:
        t = EmissionsTracker(save_to_prometheus=True, prometheus_url=address, config=fake_config)
        t.start()
        assert t.stop() is not None
    finally:
        logging.getLogger("carbond.codecarbon").removeHandler(errors)
    assert any("PrometheusOutput.out failed" in m for m in errors.messages), errors.messages


def test_logger_output_writes_one_json_row(fake_config: Path) -> None:
    target = logging.getLogger("test.emissions")
    target.setLevel(logging.INFO)
    got = Collect()
    target.addHandler(got)
    try:
        t = EmissionsTracker(
            output_methods=[OutputMethod.LOGGER], logging_logger=LoggerOutput(target), config=fake_config
        )
        t.start()
        kg = t.stop()
    finally:
        target.removeHandler(got)
    assert len(got.messages) == 1
    row = json.loads(got.messages[0])
    assert row["emissions"] == kg
    assert row["run_id"] == str(t.run_id)
    assert not list(Path.cwd().glob("emissions*.csv"))  # output_methods without CSV: no file


def test_users_output_handlers_get_totals_deltas_tasks_and_exit(fake_config: Path) -> None:
    calls: list[tuple[str, Any]] = []

    class Mine:
        def out(self, total: EmissionsData, delta: EmissionsData) -> None:
            calls.append(("out", (total.energy_consumed, delta.energy_consumed)))

        def task_out(self, data: list[EmissionsData], experiment_name: str) -> None:
            calls.append(("task_out", ([getattr(d, "task_name", None) for d in data], experiment_name)))

        def exit(self) -> None:
            calls.append(("exit", None))

    t = EmissionsTracker(output_handlers=[Mine()], config=fake_config, experiment_name="exp")
    t.start()
    t.start_task("a")
    t.stop_task()
    t.flush()
    t.stop()
    assert [c[0] for c in calls] == ["out", "out", "task_out", "exit"]
    (first_total, first_delta), (total, delta) = calls[0][1], calls[1][1]
    assert first_total == first_delta
    assert abs(delta - (total - first_total)) < 1e-15
    assert calls[2][1] == (["a"], "exp")


def test_methods_carbond_does_not_implement_are_named_once(fake_config: Path) -> None:
    got = Collect()
    logging.getLogger("carbond.codecarbon").addHandler(got)
    try:
        t = EmissionsTracker(
            output_methods=["csv", "api", "logfire", "boamps"],
            emissions_endpoint="http://127.0.0.1:9",
            config=fake_config,
        )
    finally:
        logging.getLogger("carbond.codecarbon").removeHandler(got)
    named = [m for m in got.messages if "does not implement" in m]
    assert len(named) == 1
    for word in ("output_methods=api", "output_methods=logfire", "output_methods=boamps", "emissions_endpoint"):
        assert word in named[0]
    assert t._csv is not None


#: what carbonboard (codecarbon.viz, whose dash extra the comparison venv lacks) does with the file: pandas reads
#: it, the last run's summary is taken, its country code upper-cased (the crash on an empty country)
CARBONBOARD = """import sys, pandas as pd
df = pd.read_csv(sys.argv[1])
last = df[df["project_name"] == df["project_name"].iloc[-1]].to_dict("records")[-1]
print(last["country_iso_code"].upper(), last["country_name"], float(last["energy_consumed"]) > 0)
"""


def test_carbonboard_reads_carbonds_file(codecarbon_python: Path, fake_config: Path, tmp_path: Path) -> None:
    t = OfflineEmissionsTracker(project_name="board", country_iso_code="FRA", config=fake_config)
    t.start()
    t.stop()
    done = subprocess.run(
        [str(codecarbon_python), "-c", CARBONBOARD, str(tmp_path / "emissions.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["FRA", "France", "True"]
