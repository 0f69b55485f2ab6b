"""carbonboard (CodeCarbon 3.3.2's dashboard, ``codecarbon.viz``) on carbond's emissions.csv, driven as a browser
drives it: every callback through Dash's HTTP endpoint, in dependency order, in the ``.venv-codecarbon``
interpreter (with CodeCarbon's ``carbonboard`` extra).

The world average (``OfflineEmissionsTracker()`` without a country): CodeCarbon 3.3.2 writes the country columns
empty, pandas reads NaN (CodeCarbon's own test asserts it), and carbonboard's regional panel calls
``country_iso_code.upper()`` on it. Its own file fails there exactly as carbond's does; every other panel is drawn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.skips import skip_or_fail

#: the driver: read the file as carbonboard's ``viz()`` does, build its app, post each callback's inputs
BOARD = """import json, sys
import pandas as pd
from codecarbon.viz.carbonboard import render_app

df = pd.read_csv(sys.argv[1])
app = render_app(df)
client = app.server.test_client()
assert client.get("/_dash-layout").status_code == 200
values = {("project_name", "value"): df["project_name"].iloc[-1], ("energy_type", "value"): "wind"}
pending, failed = dict(app.callback_map), []
while pending:
    ready = [k for k, cb in pending.items() if all((i["id"], i["property"]) in values for i in cb["inputs"])]
    if not ready:
        break
    for key in ready:
        cb = pending.pop(key)
        ins = [(i["id"], i["property"]) for i in cb["inputs"]]
        many = isinstance(cb["output"], list)
        outs = cb["output"] if many else [cb["output"]]
        spec = [{"id": o.component_id, "property": o.component_property} for o in outs]
        body = {"output": key, "outputs": spec if many else spec[0], "state": [],
                "inputs": [{"id": i, "property": p, "value": values[(i, p)]} for i, p in ins],
                "changedPropIds": [f"{i}.{p}" for i, p in ins]}
        answer = client.post("/_dash-update-component", json=body)
        if answer.status_code != 200:
            failed.append(sorted(s["id"] for s in spec))
            continue
        for cid, props in json.loads(answer.data)["response"].items():
            values.update({(cid, prop): value for prop, value in props.items()})
row = df.iloc[-1]
print(json.dumps({"failed": sorted(failed), "unreached": len(pending), "drawn": len(app.callback_map) - len(failed),
                  "country": None if pd.isna(row["country_iso_code"]) else row["country_iso_code"]}))
"""
CC_WORLD = """from codecarbon import OfflineEmissionsTracker
t = OfflineEmissionsTracker(project_name="world", measure_power_secs=1, log_level="error")
t.start()
t.stop()
"""
REGIONAL = [["country_name", "regional_emissions_comparison_choropleth"], ["regional_emissions_comparison_component"]]


@pytest.fixture(scope="module")
def board_python(codecarbon_python: Path) -> Path:
    probe = [str(codecarbon_python), "-c", "import dash, dash_bootstrap_components, fire, codecarbon.viz.carbonboard"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        skip_or_fail(
            "carbonboard's dependencies are not in .venv-codecarbon (CodeCarbon's `carbonboard` extra: "
            f"pip install 'codecarbon[carbonboard]==3.3.2'): {done.stderr.strip()[-200:]}"
        )
    return codecarbon_python


def _board(python: Path, csv_path: Path) -> dict[str, object]:
    done = subprocess.run([str(python), "-c", BOARD, str(csv_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _carbond(cwd: Path, config: Path, **where: str) -> Path:
    cwd.mkdir()
    args = ", ".join(f"{k}={v!r}" for k, v in where.items())
    script = (
        "from carbond.codecarbon import OfflineEmissionsTracker\n"
        f"t = OfflineEmissionsTracker(project_name='carbond', {args})\nt.start()\nt.stop()\n"
    )
    env = {**os.environ, "CARBOND_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return cwd / "emissions.csv"


@pytest.mark.parametrize(
    ("where", "country"),
    [
        ({"country_iso_code": "FRA"}, "FRA"),
        ({"cloud_provider": "gcp", "cloud_region": "europe-west10"}, "DEU"),  # a region the table names "Berlin"
    ],
)
def test_carbonboard_draws_every_panel_of_carbonds_file(
    board_python: Path, fake_config: Path, tmp_path: Path, where: dict[str, str], country: str
) -> None:
    result = _board(board_python, _carbond(tmp_path / "carbond", fake_config, **where))
    assert result["country"] == country
    assert result["failed"] == []
    assert result["unreached"] == 0
    assert result["drawn"] == 9  # every callback of carbonboard 3.3.2


def test_world_average_fails_carbonboards_regional_panel_as_codecarbons_own_file(
    board_python: Path, fake_config: Path, tmp_path: Path
) -> None:
    theirs_dir = tmp_path / "codecarbon"
    theirs_dir.mkdir()
    done = subprocess.run(
        [str(board_python), "-c", CC_WORLD], cwd=theirs_dir, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    theirs = _board(board_python, theirs_dir / "emissions.csv")
    ours = _board(board_python, _carbond(tmp_path / "carbond", fake_config))
    assert theirs["country"] is None  # CodeCarbon's own file: NaN, the promise its test checks
    assert ours["country"] is None
    assert theirs["failed"] == REGIONAL  # carbonboard's .upper() on NaN, in CodeCarbon's file too
    assert ours["failed"] == theirs["failed"]
    assert ours["drawn"] == theirs["drawn"] == 7
