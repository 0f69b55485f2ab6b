"""The per-job ledger: sums of the job-labelled cgroup series, written once the Epilog's end is covered by a tick."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from carbond.model import (
    CgroupLabels,
    CgroupState,
    Devices,
    DeviceState,
    Health,
    HistogramState,
    Intensity,
    IntensityState,
    NodeState,
    Snapshot,
)
from carbond.slurm.ledger import ORPHAN_S, SlurmLedger
from carbond.slurm.ledgerfile import LEDGER_NAME, LedgerFile, ledger_files
from carbond.slurm.spool import SlurmSpool
from carbond.units import JOULES_PER_KWH

SCRIPTS = Path(__file__).parents[2] / "deploy" / "slurm"
AVERAGE = Intensity(g_per_kwh=50.0, provider="static", zone="FR", observed_at=0.0)
MARGINAL = Intensity(g_per_kwh=400.0, provider="watttime", zone="FR", observed_at=0.0, signal="marginal")
T0 = 1_700_000_000.0
INTERVAL = 10.0


def cgroup(job: str, step: str, cpu_j: float, gpu_j: float = 0.0, *, pue: float = 1.0) -> CgroupState:
    """A step's series with cumulative counters, emissions at the average intensity."""
    path = f"system.slice/slurmstepd.scope/job_{job}/step_{step}"
    extra = (("slurm_account", "physics"), ("slurm_job_id", job), ("slurm_step", step), ("slurm_user", "ada"))
    kinds = (("cpu", None, cpu_j), ("gpu", None, gpu_j))
    g = (cpu_j + gpu_j) / JOULES_PER_KWH * pue * AVERAGE.g_per_kwh
    return CgroupState(path, kinds, g, CgroupLabels(extra=extra))


def snapshot(
    seq: int,
    wall: float,
    cgroups: Sequence[CgroupState],
    *,
    node_j: float,
    gpu_j: float,
    embodied: tuple[tuple[str, float], ...] = (),
    energy_u: float = 0.0,
    marginal: bool = True,
) -> Snapshot:
    g = node_j / JOULES_PER_KWH * AVERAGE.g_per_kwh
    node = NodeState(
        math.nan, node_j, g, 1.0, embodied, energy_u_j_total=energy_u, emissions_u_g_total=energy_u * g / node_j
    )
    gpu = DeviceState("gpu-0", "gpu", "fake", 0.0, gpu_j, 0.0, True, True)
    cpu = DeviceState("package-0", "cpu", "rapl", 0.0, node_j - gpu_j, 0.0, True, True)
    other = ((MARGINAL, 1.0),) if marginal else ()
    return Snapshot(
        seq=seq,
        host="n1",
        taken_at=float(seq),
        wall_time=wall,
        interval_s=INTERVAL,
        node=node,
        devices=Devices((cpu, gpu)),
        intensity=IntensityState(AVERAGE, 1.0, other),
        health=Health((), HistogramState((), (), 0, 0.0)),
        cgroups=tuple(cgroups),
    )


def spool_files(spool: Path, job: str, *, start: float | None = None, end: float | None = None) -> None:
    spool.mkdir(exist_ok=True, mode=0o755)
    if start is not None:
        meta = {"job_id": job, "user": "ada", "uid": "1000", "account": "physics", "partition": "gpu", "start": start}
        (spool / f"job_{job}.json").write_text(json.dumps(meta))
    if end is not None:
        (spool / f"job_{job}.end").write_text(json.dumps({"job_id": job, "end": end}))


def lines(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in ledger_files(directory) for line in p.read_text().splitlines()]


def ledger(tmp_path: Path, spool: SlurmSpool, *, max_bytes: int = 1 << 20, keep: int = 3) -> SlurmLedger:
    return SlurmLedger(spool, tmp_path / "ledger", host="n1", max_bytes=max_bytes, keep=keep)


def tick(led: SlurmLedger, spool: SlurmSpool, snap: Snapshot) -> None:
    spool.refresh()  # the attributor's sampling step does this in the daemon
    led.on_tick(snap)


def test_job_is_written_after_the_tick_covering_its_end(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_files(spool_dir, "42", start=T0 - 5)
    spool = SlurmSpool(spool_dir, wall=lambda: T0 + 1000)
    led = ledger(tmp_path, spool)
    other = CgroupState("system.slice/ssh.service", (("cpu", None, 500.0),), 1.0, CgroupLabels(unit="ssh.service"))
    # tick 1: step 0 used 100 J cpu; tick 2: +200 J cpu, step 1 appears with 50 J cpu + 300 J gpu
    # node: 1000 J then +2000 J (GPU 600 then +900); server embodied 10 g then +20 g, gpu-0 4 g then +6 g
    tick(
        led,
        spool,
        snapshot(
            1,
            T0 + 10,
            [cgroup("42", "0", 100.0), other],
            node_j=1000,
            gpu_j=600,
            embodied=(("server", 10.0), ("gpu-0", 4.0)),
            energy_u=50.0,
        ),
    )
    tick(
        led,
        spool,
        snapshot(
            2,
            T0 + 20,
            [cgroup("42", "0", 300.0), cgroup("42", "1", 50.0, 300.0), other],
            node_j=3000,
            gpu_j=1500,
            embodied=(("server", 30.0), ("gpu-0", 10.0)),
            energy_u=150.0,
        ),
    )
    spool_files(spool_dir, "42", end=T0 + 25)
    tick(
        led,
        spool,
        snapshot(
            3,
            T0 + 30,
            [cgroup("42", "0", 300.0), cgroup("42", "1", 50.0, 300.0)],
            node_j=3000,
            gpu_j=1500,
            embodied=(("server", 30.0), ("gpu-0", 10.0)),
        ),
    )
    led.flush()
    assert lines(tmp_path / "ledger") == []  # the tick that began at T0 + 20 does not cover an end at T0 + 25
    assert (spool_dir / "job_42.end").exists()
    tick(led, spool, snapshot(4, T0 + 40, [], node_j=3000, gpu_j=1500))
    led.flush()
    [rec] = lines(tmp_path / "ledger")
    assert (rec["job_id"], rec["host"], rec["user"], rec["account"], rec["partition"]) == (
        "42",
        "n1",
        "ada",
        "physics",
        "gpu",
    )
    assert (rec["start"], rec["end"], rec["partial"]) == (T0 - 5, T0 + 25, False)
    steps = {s["step"]: s for s in rec["steps"]}
    assert steps["0"]["energy_by_kind_j"] == {"cpu": 300.0, "gpu": 0.0}
    assert steps["1"]["energy_by_kind_j"] == {"cpu": 50.0, "gpu": 300.0}
    assert rec["energy_j"] == pytest.approx(650.0)
    assert rec["energy_by_kind_j"] == {"cpu": 350.0, "gpu": 300.0}
    assert rec["emissions_g"] == pytest.approx(650.0 / JOULES_PER_KWH * 50.0)
    assert rec["intensity"]["g_per_kwh"] == pytest.approx(50.0)
    assert rec["intensity"]["marginal_g_per_kwh"] == pytest.approx(400.0)
    assert rec["emissions_marginal_g"] == pytest.approx(650.0 / JOULES_PER_KWH * 400.0)
    # embodied: tick 2 is the first with a previous one; the server's 20 g by the job's 250 J of the node's 1100 J
    # beside the GPUs, gpu-0's 6 g by its 300 J of 900 J of GPU energy
    assert rec["embodied_g"] == pytest.approx(20.0 * 250 / 1100 + 6.0 * 300 / 900)
    # uncertainty: the node's relative band carried over (5 % each tick here)
    assert rec["energy_u_j"] == pytest.approx(0.05 * 650.0)
    assert not (spool_dir / "job_42.json").exists()
    assert not (spool_dir / "job_42.end").exists()
    assert spool.meta("42") is None
    assert led.books.jobs == {}
    led.close()


def test_a_restart_keeps_the_sums_and_says_what_it_missed(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_files(spool_dir, "7", start=T0)
    spool = SlurmSpool(spool_dir)
    first = ledger(tmp_path, spool)
    tick(first, spool, snapshot(1, T0 + 10, [cgroup("7", "batch", 100.0)], node_j=100, gpu_j=0))
    tick(first, spool, snapshot(2, T0 + 20, [cgroup("7", "batch", 250.0)], node_j=250, gpu_j=0))
    first.close()  # the daemon stops: the job in progress is saved
    assert json.loads((tmp_path / "ledger" / "open.json").read_text())["jobs"][0]["job_id"] == "7"
    # 300 s later a new process: the cgroup's counters start over from zero
    second = ledger(tmp_path, spool)
    tick(second, spool, snapshot(1, T0 + 330, [cgroup("7", "batch", 40.0)], node_j=40, gpu_j=0))
    spool_files(spool_dir, "7", end=T0 + 335)
    tick(second, spool, snapshot(2, T0 + 340, [cgroup("7", "batch", 60.0)], node_j=60, gpu_j=0))
    tick(second, spool, snapshot(3, T0 + 350, [], node_j=60, gpu_j=0))
    second.close()
    [rec] = lines(tmp_path / "ledger")
    assert rec["energy_j"] == pytest.approx(250.0 + 60.0)
    assert rec["partial"] is True
    # only the time carbond was down: it was counting from its first tick's start (T0), before the job's first energy
    assert rec["missed_s"] == pytest.approx((T0 + 330 - INTERVAL) - (T0 + 20))
    assert rec["watched_from"] == pytest.approx(T0)
    assert json.loads((tmp_path / "ledger" / "open.json").read_text())["jobs"] == []


def test_a_job_idle_at_first_is_whole_while_carbond_was_counting(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_files(spool_dir, "8", start=T0 + 5, end=T0 + 75)
    spool = SlurmSpool(spool_dir)
    led = ledger(tmp_path, spool)
    tick(led, spool, snapshot(1, T0 + 10, [], node_j=10, gpu_j=0))
    for i in range(2, 7):  # the job's series appears only at its first energy, 40 s after it started
        series = [cgroup("8", "0", 10.0 * (i - 4))] if i >= 5 else []
        tick(led, spool, snapshot(i, T0 + 10 * i, series, node_j=10 * i, gpu_j=0))
    tick(led, spool, snapshot(7, T0 + 80, [], node_j=70, gpu_j=0))
    tick(led, spool, snapshot(8, T0 + 90, [], node_j=80, gpu_j=0))
    led.close()
    [rec] = lines(tmp_path / "ledger")
    assert rec["first_seen"] == pytest.approx(T0 + 50)
    assert (rec["partial"], rec["missed_s"]) == (False, 0.0)


def test_a_job_that_started_before_carbond_is_partial(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_files(spool_dir, "9", start=T0 - 3600, end=T0 + 15)
    spool = SlurmSpool(spool_dir)
    led = ledger(tmp_path, spool)
    tick(led, spool, snapshot(1, T0 + 10, [cgroup("9", "0", 10.0)], node_j=10, gpu_j=0, marginal=False))
    tick(led, spool, snapshot(2, T0 + 30, [], node_j=10, gpu_j=0, marginal=False))
    led.close()
    [rec] = lines(tmp_path / "ledger")
    assert rec["partial"] is True
    assert rec["missed_s"] >= 3600
    assert rec["emissions_marginal_g"] is None
    assert rec["intensity"]["marginal_g_per_kwh"] is None


def test_a_job_without_an_epilog_is_written_once_its_series_are_gone(tmp_path: Path) -> None:
    spool = SlurmSpool(tmp_path / "spool")
    (tmp_path / "spool").mkdir(mode=0o755)
    led = ledger(tmp_path, spool)
    tick(led, spool, snapshot(1, T0, [cgroup("5", "0", 10.0)], node_j=10, gpu_j=0))
    tick(led, spool, snapshot(2, T0 + ORPHAN_S - 1, [], node_j=10, gpu_j=0))
    led.flush()
    assert lines(tmp_path / "ledger") == []
    tick(led, spool, snapshot(3, T0 + ORPHAN_S + 1, [], node_j=10, gpu_j=0))
    led.close()
    [rec] = lines(tmp_path / "ledger")
    assert (rec["job_id"], rec["end"], rec["energy_j"]) == ("5", None, 10.0)


def test_the_ledger_rotates_by_size_and_keeps_so_many_files(tmp_path: Path) -> None:
    f = LedgerFile(tmp_path, max_bytes=100, keep=2)
    for i in range(5):
        f.append([json.dumps({"job_id": str(i), "pad": "x" * 60})])
    files = ledger_files(tmp_path)
    assert [p.name for p in files] == [f"{LEDGER_NAME}.2", f"{LEDGER_NAME}.1", LEDGER_NAME]
    kept = [json.loads(line)["job_id"] for p in files for line in p.read_text().splitlines()]
    assert kept == ["2", "3", "4"]  # oldest first; 0 and 1 rotated away


def test_the_prolog_and_epilog_feed_the_ledger(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o755)
    env = {
        "CARBOND_SLURM_SPOOL": str(spool_dir),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_USER": "bob",
        "SLURM_JOB_UID": "1001",
        "SLURM_JOB_ACCOUNT": "chem",
        "SLURM_JOB_PARTITION": "cpu",
    }
    subprocess.run(["sh", str(SCRIPTS / "prolog.sh")], env=env, check=True)
    spool = SlurmSpool(spool_dir)
    led = ledger(tmp_path, spool)
    spool.refresh()
    meta = spool.meta("77")
    assert meta is not None
    assert meta.start is not None
    start = meta.start
    tick(led, spool, snapshot(1, start + 10, [cgroup("77", "0", 5.0)], node_j=5, gpu_j=0))
    subprocess.run(["sh", str(SCRIPTS / "epilog.sh")], env=env, check=True)
    spool.refresh()
    [(_job, end)] = spool.ended()
    tick(led, spool, snapshot(2, end + INTERVAL + 1, [], node_j=5, gpu_j=0))
    led.close()
    [rec] = lines(tmp_path / "ledger")
    assert (rec["job_id"], rec["user"], rec["account"], rec["partition"], rec["uid"]) == (
        "77",
        "bob",
        "chem",
        "cpu",
        "1001",
    )
    assert rec["energy_j"] == 5.0
    assert list(spool_dir.iterdir()) == []
