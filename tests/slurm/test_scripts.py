"""The shipped Prolog and Epilog, run by ``sh`` with the environment slurmd gives them: spool files written
atomically and as valid JSON, never a failure, and the optional AdminComment with one ``scontrol`` call."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[2] / "deploy" / "slurm"
JOB_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_USER": "ada",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_ACCOUNT": "physics",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURMD_NODENAME": "n1",
    "SLURM_CLUSTER_NAME": "c1",
}


def run(script: str, spool: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"CARBOND_SLURM_SPOOL": str(spool), **JOB_ENV, **env}
    return subprocess.run(["sh", str(SCRIPTS / script)], env=full, capture_output=True, text=True, timeout=60)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o755)
    return d


def test_prolog_writes_the_jobs_metadata(spool: Path) -> None:
    out = run("prolog.sh", spool, SLURM_JOB_NAME="train")
    assert out.returncode == 0
    assert out.stdout == out.stderr == ""
    assert [p.name for p in spool.iterdir()] == ["job_4242.json"]  # no temporary file left behind
    doc = json.loads((spool / "job_4242.json").read_text())
    assert {k: doc[k] for k in ("job_id", "user", "uid", "account", "partition", "name", "node", "cluster")} == {
        "job_id": "4242",
        "user": "ada",
        "uid": 1000,
        "account": "physics",
        "partition": "gpu",
        "name": "train",
        "node": "n1",
        "cluster": "c1",
    }
    assert doc["nodes"] == ""  # no node list in this environment
    assert isinstance(doc["start"], int)
    assert doc["start"] > 1.6e9


@pytest.mark.parametrize("variable", ["SLURM_NODELIST", "SLURM_JOB_NODELIST"])
def test_prolog_passes_the_node_list_under_either_name(spool: Path, variable: str) -> None:
    assert run("prolog.sh", spool, **{variable: "n[1-4]"}).returncode == 0
    assert json.loads((spool / "job_4242.json").read_text())["nodes"] == "n[1-4]"  # 22.05 names it SLURM_NODELIST


def test_values_are_json_escaped(spool: Path) -> None:
    nasty = 'a"b\\c\td\re\x01f\nline2 é'
    assert run("prolog.sh", spool, SLURM_JOB_ACCOUNT=nasty, SLURM_JOB_UID="12x").returncode == 0
    doc = json.loads((spool / "job_4242.json").read_text())
    assert doc["account"] == 'a"b\\c d ef\nline2 é'  # tab and CR as spaces, other controls dropped
    assert doc["uid"] is None  # not a number


@pytest.mark.parametrize("job_id", ["", "12;touch x", "../1", "1 2"])
def test_no_file_for_a_missing_or_strange_job_id(spool: Path, job_id: str) -> None:
    assert run("prolog.sh", spool, SLURM_JOB_ID=job_id).returncode == 0
    assert run("epilog.sh", spool, SLURM_JOB_ID=job_id).returncode == 0
    assert list(spool.iterdir()) == []


def test_never_fails_without_a_spool(tmp_path: Path) -> None:
    for script in ("prolog.sh", "epilog.sh"):
        out = run(script, tmp_path / "missing")
        assert out.returncode == 0
        assert out.stderr == ""
    assert not (tmp_path / "missing").exists()  # not created either


def test_never_fails_when_the_spool_is_not_a_directory(tmp_path: Path) -> None:
    not_dir = tmp_path / "spool"
    not_dir.write_text("x")
    for script in ("prolog.sh", "epilog.sh"):
        assert run(script, not_dir).returncode == 0
    assert not_dir.read_text() == "x"


def test_epilog_writes_the_end(spool: Path) -> None:
    out = run("epilog.sh", spool)
    assert out.returncode == 0
    assert [p.name for p in spool.iterdir()] == ["job_4242.end"]
    doc = json.loads((spool / "job_4242.end").read_text())
    assert doc["job_id"] == "4242"
    assert doc["end"] > 1.6e9


def fake_commands(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A ``carbond`` printing a summary and a ``scontrol`` recording its arguments, one per line."""
    calls = tmp_path / "calls"
    carbond = tmp_path / "carbond"
    carbond.write_text(f'#!/bin/sh\necho "carbond $*" >> {calls}\necho "carbond: 1.2 kWh, 40 g CO2e"\n')
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "scontrol-arg $a" >> {calls}; done\n')
    for p in (carbond, scontrol):
        p.chmod(0o755)
    return carbond, scontrol, calls


def test_admin_comment_is_off_by_default(tmp_path: Path, spool: Path) -> None:
    carbond, scontrol, calls = fake_commands(tmp_path)
    env = {"CARBOND_BIN": str(carbond), "SCONTROL": str(scontrol), "CARBOND_SLURM_COMMENT_FOREGROUND": "1"}
    assert run("epilog.sh", spool, **env).returncode == 0
    assert not calls.exists()


def test_admin_comment_single_node_job(tmp_path: Path, spool: Path) -> None:
    carbond, scontrol, calls = fake_commands(tmp_path)
    env = {"CARBOND_BIN": str(carbond), "SCONTROL": str(scontrol), "CARBOND_SLURM_COMMENT_FOREGROUND": "1"}
    assert run("epilog.sh", spool, CARBOND_SLURM_ADMIN_COMMENT="1", **env).returncode == 0
    assert calls.read_text().splitlines() == [
        "carbond slurm report --oneline --wait 60 4242",
        "scontrol-arg update",
        "scontrol-arg job=4242",
        "scontrol-arg AdminComment=carbond: 1.2 kWh, 40 g CO2e",
    ]
    assert (spool / "job_4242.end").exists()


def test_admin_comment_multi_node_job_only_from_the_controller(tmp_path: Path, spool: Path) -> None:
    carbond, scontrol, calls = fake_commands(tmp_path)
    env = {"CARBOND_BIN": str(carbond), "SCONTROL": str(scontrol), "CARBOND_SLURM_COMMENT_FOREGROUND": "1"}
    env |= {"CARBOND_SLURM_ADMIN_COMMENT": "1", "SLURM_JOB_NUM_NODES": "4"}
    assert run("epilog.sh", spool, **env).returncode == 0  # a node's Epilog: no call, one per node would be many
    assert not calls.exists()
    env |= {"SLURM_SCRIPT_CONTEXT": "epilog_slurmctld", "CARBOND_SLURM_REPORT_ARGS": "--nodes-dir /shared/carbond"}
    env |= {"CARBOND_SLURM_COMMENT_FIELD": "Comment"}
    spool_before = sorted(p.name for p in spool.iterdir())
    assert run("epilog.sh", spool, **env).returncode == 0
    assert calls.read_text().splitlines() == [
        "carbond slurm report --oneline --wait 60 --nodes-dir /shared/carbond 4242",
        "scontrol-arg update",
        "scontrol-arg job=4242",
        "scontrol-arg Comment=carbond: 1.2 kWh, 40 g CO2e",
    ]
    assert sorted(p.name for p in spool.iterdir()) == spool_before  # the controller has no spool to write


def test_a_failing_report_makes_no_controller_call(tmp_path: Path, spool: Path) -> None:
    _, scontrol, calls = fake_commands(tmp_path)
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    env = {"CARBOND_BIN": str(failing), "SCONTROL": str(scontrol), "CARBOND_SLURM_COMMENT_FOREGROUND": "1"}
    assert run("epilog.sh", spool, CARBOND_SLURM_ADMIN_COMMENT="1", **env).returncode == 0
    assert not calls.exists()
