"""One emissions.csv shared by the real CodeCarbon 3.3.2 (``.venv-codecarbon``) and carbond's drop-in.

CodeCarbon 3.3's FileOutput appends only when the file's header has exactly its own set of columns (it compares the
sorted names); any other header, a superset included, is moved aside to a ``.bak`` and a new file started. So:
carbond appends to CodeCarbon's file in CodeCarbon's header; CodeCarbon appends to a carbond file written with
``csv_columns="codecarbon"``; carbond's default file (CodeCarbon's columns, then carbond's) is moved aside by
CodeCarbon, intact. Only OfflineEmissionsTracker is used: CodeCarbon's online tracker would geolocate over the
network.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

from carbond.job.csvfile import CODECARBON_COLUMNS, COLUMNS

CC_SCRIPT = """from codecarbon import OfflineEmissionsTracker
import sys, time
kwargs = dict(arg.split("=", 1) for arg in sys.argv[2:])
t = OfflineEmissionsTracker(project_name=sys.argv[1], country_iso_code="FRA", measure_power_secs=1, **kwargs)
t.start()
s = time.process_time()
while time.process_time() - s < 0.2:
    pass
print(t.stop())
"""
#: pandas (CodeCarbon's dependency) reads the shared file as one table
READ = """import pandas as pd, sys
df = pd.read_csv(sys.argv[1])
assert df["energy_consumed"].dtype.kind == "f", df.dtypes
assert df["emissions"].dtype.kind == "f", df.dtypes
assert df["energy_consumed"].notna().all() and (df["energy_consumed"] > 0).all()
print(",".join(df["project_name"]))
"""


def _codecarbon(python: Path, cwd: Path, project: str) -> None:
    done = subprocess.run(
        [str(python), "-c", CC_SCRIPT, project, "log_level=error"], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0, done.stderr


def _carbond(cwd: Path, config: Path, project: str, *options: str) -> str:
    script = CC_SCRIPT.replace("from codecarbon import", "from carbond.codecarbon import")
    env = {**os.environ, "CARBOND_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-c", script, project, *options], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0, done.stderr
    return done.stderr


def _projects(python: Path, path: Path) -> list[str]:
    done = subprocess.run([str(python), "-c", READ, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(",")


def test_carbond_appends_to_codecarbons_file_and_codecarbon_goes_on(
    codecarbon_python: Path, fake_config: Path, tmp_path: Path
) -> None:
    tmp_path = tmp_path / "work"  # only the CSV files in it
    tmp_path.mkdir()
    _codecarbon(codecarbon_python, tmp_path, "cc1")
    header = (tmp_path / "emissions.csv").read_text().splitlines()[0]
    assert header.split(",") == CODECARBON_COLUMNS  # the column list carbond copies is CodeCarbon's, in order
    stderr = _carbond(tmp_path, fake_config, "carbond")
    assert "header" not in stderr  # CodeCarbon's own header is what carbond expects there: no warning
    _codecarbon(codecarbon_python, tmp_path, "cc2")
    assert [p.name for p in tmp_path.iterdir()] == ["emissions.csv"]  # nothing moved aside
    text = (tmp_path / "emissions.csv").read_text()
    assert text.splitlines()[0] == header
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["project_name"] for r in rows] == ["cc1", "carbond", "cc2"]
    assert all(None not in r for r in rows)
    ours = rows[1]
    assert ours["country_iso_code"] == "FRA"
    assert ours["tracking_mode"] == "machine"
    assert float(ours["pue"]) == 1.5
    assert _projects(codecarbon_python, tmp_path / "emissions.csv") == ["cc1", "carbond", "cc2"]


def test_codecarbon_appends_to_carbonds_codecarbon_columns_file(
    codecarbon_python: Path, fake_config: Path, tmp_path: Path
) -> None:
    tmp_path = tmp_path / "work"  # only the CSV files in it
    tmp_path.mkdir()
    _carbond(tmp_path, fake_config, "carbond", "csv_columns=codecarbon")
    _codecarbon(codecarbon_python, tmp_path, "cc")
    assert not list(tmp_path.glob("*.bak"))
    assert not list(tmp_path.glob("emissions.csv_*"))
    assert _projects(codecarbon_python, tmp_path / "emissions.csv") == ["carbond", "cc"]


def test_codecarbon_moves_carbonds_full_file_aside_intact(
    codecarbon_python: Path, fake_config: Path, tmp_path: Path
) -> None:
    tmp_path = tmp_path / "work"  # only the CSV files in it
    tmp_path.mkdir()
    _carbond(tmp_path, fake_config, "carbond")
    before = (tmp_path / "emissions.csv").read_text()
    assert before.splitlines()[0].split(",") == list(COLUMNS)
    _codecarbon(codecarbon_python, tmp_path, "cc")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("emissions") and p.name != "emissions.csv"]
    assert len(aside) == 1
    assert aside[0].read_text() == before
    assert _projects(codecarbon_python, tmp_path / "emissions.csv") == ["cc"]


def test_codecarbon_reads_its_configuration_as_carbond_does(
    codecarbon_python: Path, fake_config: Path, tmp_path: Path
) -> None:
    """The same script, configuration files and variables under the real CodeCarbon and under carbond: the same
    project, experiment, country and output directory."""
    from .test_codecarbon import configured_run

    theirs = configured_run(str(codecarbon_python), tmp_path / "cc")
    ours = configured_run(sys.executable, tmp_path / "carbond", env={"CARBOND_CONFIG": str(fake_config)})
    keys = ("project_name", "experiment_id", "country_iso_code", "country_name")
    assert [theirs[k] for k in keys] == [ours[k] for k in keys] == ["local", "home-exp", "DEU", "Germany"]


def test_location_columns_as_codecarbon_writes_them(codecarbon_python: Path, fake_config: Path, tmp_path: Path) -> None:
    """A US state: the same country and region columns (carbond wrote region 'CA' where CodeCarbon writes the
    state's name, lowercased)."""
    from .test_codecarbon import configured_run

    where = ("country_iso_code=USA", "region=California")
    theirs = configured_run(str(codecarbon_python), tmp_path / "cc", *where)
    ours = configured_run(sys.executable, tmp_path / "carbond", *where, env={"CARBOND_CONFIG": str(fake_config)})
    keys = ("country_name", "country_iso_code", "region", "cloud_provider", "on_cloud")
    assert [ours[k] for k in keys] == [theirs[k] for k in keys] == ["United States", "USA", "california", "", "N"]
    assert ours["intensity_zone"] == "US-CA"
