"""``carbond slurm report``: a multi-node job summed from the node ledgers, or from Prometheus's raw samples."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from carbond.cli import main
from carbond.slurm.ledger import SlurmLedger
from carbond.slurm.spool import SlurmSpool
from carbond.units import JOULES_PER_KWH
from tests.slurm.test_ledger import INTERVAL, T0, cgroup, snapshot, spool_files


def node_ledger(root: Path, host: str, steps: dict[str, tuple[float, float]]) -> None:
    """Job 42 on ``host``: each step's (cpu J, gpu J), counted in one tick, ended and written."""
    spool_dir = root / f"spool-{host}"
    spool_files(spool_dir, "42", start=T0, end=T0 + 5)
    spool = SlurmSpool(spool_dir)
    led = SlurmLedger(spool, root / "nfs" / host, host=host, max_bytes=1 << 20, keep=2)
    cgs = [cgroup("42", step, cpu, gpu) for step, (cpu, gpu) in steps.items()]
    total = sum(c + g for c, g in steps.values())
    gpu = sum(g for _, g in steps.values())
    for i, wall in enumerate((T0 + 4, T0 + 5 + INTERVAL + 1)):
        spool.refresh()
        led.on_tick(snapshot(i + 1, wall, cgs if i == 0 else [], node_j=total, gpu_j=gpu))
    led.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["slurm", "report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_multi_node_job_is_summed_from_the_shared_ledgers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node_ledger(tmp_path, "n1", {"0": (1000.0, 3000.0), "batch": (200.0, 0.0)})
    node_ledger(tmp_path, "n2", {"0": (800.0, 1000.0)})
    code, out, _ = run(capsys, "42", "--nodes-dir", str(tmp_path / "nfs"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["energy_j"] == pytest.approx(6000.0)
    assert doc["energy_by_kind_j"] == {"cpu": 2000.0, "gpu": 4000.0}
    assert {h: n["energy_j"] for h, n in doc["nodes"].items()} == {"n1": 4200.0, "n2": 1800.0}
    assert {s: p["energy_j"] for s, p in doc["steps"].items()} == {"0": 5800.0, "batch": 200.0}
    assert doc["emissions_g"] == pytest.approx(6000.0 / JOULES_PER_KWH * 50.0)
    assert doc["g_per_kwh_it"] == pytest.approx(50.0)
    assert (doc["user"], doc["account"], doc["partition"], doc["partial"]) == ("ada", "physics", "gpu", False)
    assert doc["equivalents"]["car_km"] == pytest.approx(doc["emissions_g"] / 251.0)
    # the same from the two ledger directories named one by one, as text and as one line
    dirs = ["--ledger-dir", str(tmp_path / "nfs" / "n1"), "--ledger-dir", str(tmp_path / "nfs" / "n2")]
    code, text, _ = run(capsys, "42", *dirs)
    assert code == 0
    assert "Slurm job 42 (ada, account physics, partition gpu): 2 node(s)" in text
    assert "6,000 J, 0.001667 kWh" in text
    assert "km by car" in text
    assert "n1" in text
    assert "batch" in text
    code, line, _ = run(capsys, "42", *dirs, "--oneline")
    assert code == 0
    assert line.count("\n") == 1
    assert line.startswith("carbond: 0.00167 kWh, 83.3 mg CO2e")
    assert "2 node(s), GPU 67%" in line
    assert '"' not in line


def test_an_unknown_job_exits_1_and_a_bad_id_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "l").mkdir()
    code, _, err = run(capsys, "99", "--ledger-dir", str(tmp_path / "l"))
    assert code == 1
    assert "no ledger line for job 99" in err
    assert main(["slurm", "report", "12;rm", "--ledger-dir", str(tmp_path)]) == 2


def test_wait_returns_once_the_line_is_written(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "carbond", "slurm", "report", "42", "--oneline", "--wait", "60"]
    proc = subprocess.Popen([*cmd, "--ledger-dir", str(tmp_path / "nfs" / "n1")], stdout=subprocess.PIPE, text=True)
    try:
        node_ledger(tmp_path, "n1", {"0": (3600.0, 0.0)})
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.startswith("carbond: 0.001 kWh")


class _FakePrometheus(BaseHTTPRequestHandler):
    """/api/v1/query answering a range-vector selector with canned matrices, as the HTTP API documents them."""

    answers: ClassVar[dict[str, list[dict[str, Any]]]] = {}
    queries: ClassVar[list[dict[str, list[str]]]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        self.queries.append(params)
        expr = params["query"][0]
        metric = expr.split("{", 1)[0]
        if url.path != "/api/v1/query" or metric not in self.answers:
            body = {"status": "error", "errorType": "bad_data", "error": f"unknown {expr}"}
            code = 400
        else:
            body = {"status": "success", "data": {"resultType": "matrix", "result": self.answers[metric]}}
            code = 200
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        _FakePrometheus.answers, _FakePrometheus.queries = {}, []


def series(host: str, step: str, values: list[float], kind: str | None = None) -> dict[str, Any]:
    labels = {"__name__": "x", "host": host, "slurm_job_id": "42", "slurm_step": step, "slurm_user": "ada"}
    if kind is not None:
        labels["kind"] = kind
    return {"metric": labels, "values": [[T0 + 15 * i, str(v)] for i, v in enumerate(values)]}


def test_prometheus_samples_are_summed_from_zero_across_restarts(
    prometheus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _FakePrometheus.answers = {
        # n1 step 0: 100, 300, then carbond restarted (the counter starts over): 50, 80 -> 300 + 80 = 380 J
        "carbond_cgroup_energy_joules_total": [
            series("n1", "0", [100, 300, 50, 80], "cpu"),
            series("n1", "0", [1000, 2000], "gpu"),
            series("n2", "0", [40, 60], "cpu"),
        ],
        "carbond_cgroup_emissions_grams_total": [series("n1", "0", [0.5, 1.5]), series("n2", "0", [0.25])],
    }
    code, out, _ = run(capsys, "42", "--prometheus", prometheus, "--window", "2d", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["energy_by_kind_j"] == {"cpu": 440.0, "gpu": 2000.0}
    assert {h: n["energy_j"] for h, n in doc["nodes"].items()} == {"n1": 2380.0, "n2": 60.0}
    assert doc["emissions_g"] == pytest.approx(1.75)
    assert doc["embodied_g"] is None  # Prometheus has no embodied share per job
    assert (doc["start"], doc["end"], doc["user"]) == (T0, T0 + 45, "ada")
    exprs = [q["query"][0] for q in _FakePrometheus.queries]
    assert exprs == [
        'carbond_cgroup_energy_joules_total{slurm_job_id="42"}[172800s]',
        'carbond_cgroup_emissions_grams_total{slurm_job_id="42"}[172800s]',
    ]


def test_prometheus_errors_exit_1(prometheus: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "42", "--prometheus", prometheus)  # the fake knows no metric: an error answer
    assert code == 1
    assert "bad_data" in err
    _FakePrometheus.answers = {"carbond_cgroup_energy_joules_total": [], "carbond_cgroup_emissions_grams_total": []}
    code, _, err = run(capsys, "42", "--prometheus", prometheus)
    assert code == 1
    assert "no series with slurm_job_id=42" in err
