"""Against a real single-node Slurm (Debian's slurm-wlm and munge, started here as root: :mod:`carbond.testing.slurm`).

Jobs burn a known amount of CPU time between barriers the test controls (FIFOs the job blocks on), so every reading
is taken while nothing moves: no job's CPU time changes between the daemon's read and the test's. The daemon runs on
a fake powercap tree at a constant power, on the host's real /proc and real cgroups, with Slurm attribution on. With
only a package zone, a cgroup's CPU energy over a span is the power per CPU times its CPU time (its share of the
busy time, times the busy share of the node), whatever else the host runs: so the jobs' energies are in the ratio of
their CPU times, and each is ``watts / cpus x cpu seconds``.

One cluster serves the module (it starts in well under a second; its first job waits for the controller's first
scheduling pass, about 3 s). The whole module takes about 20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carbond.attribution.cgroupfs import CgroupReader
from carbond.attribution.paths import identify
from carbond.testing.powercap import PowercapTree, PowercapWriter
from carbond.testing.slurm import CGROUP_ROOT, Job, SlurmCluster, can_create_cgroups, cgroup_version
from tests.harness.daemon import Daemon, Metrics
from tests.harness.skips import host_lacks, skip_or_fail
from tests.harness.tools import require_tool
from tests.harness.wait import GapClock, eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent.parent
NOBODY = 65534
WATTS = 20.0
INTERVAL_S = 1.0
#: Runs in the job, as the job's user, with the system Python (the job user cannot reach the test's virtualenv).
BURNER = """\
import os, sys, time
d, tag, cpu_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
def mark(name):
    open(os.path.join(d, f"{tag}.{name}"), "w").close()
def wait(name):
    with open(os.path.join(d, f"{tag}.{name}")) as f:
        f.read()
mark("ready")
wait("go")
end = time.process_time() + cpu_s
while time.process_time() < end:
    pass
mark("done")
wait("release")
"""


@dataclass
class Env:
    cluster: SlurmCluster
    spool: Path
    jobs_dir: Path  # reachable and writable by every job user


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    for tool, package in (
        ("slurmctld", "slurmctld"),
        ("slurmd", "slurmd"),
        ("munged", "munge"),
        ("srun", "slurm-client"),
    ):
        require_tool(tool, package)
    if os.geteuid() != 0:
        skip_or_fail("the real Slurm tests start slurmctld, slurmd and munged as root")
    why = can_create_cgroups()
    if why:
        host_lacks("writable-cgroup2", why)
    work = tmp_path_factory.mktemp("slurm")
    spool = work / "spool"
    spool.mkdir()
    jobs_dir = Path(tempfile.mkdtemp(prefix="carbond-slurm-jobs-"))
    jobs_dir.chmod(0o777)
    (jobs_dir / "burner.py").write_text(BURNER)
    (work / "cluster").mkdir()
    cluster = SlurmCluster(
        work / "cluster",
        prolog=ROOT / "deploy" / "slurm" / "prolog.sh",
        epilog=ROOT / "deploy" / "slurm" / "epilog.sh",
        script_env={"CARBOND_SLURM_SPOOL": str(spool)},
    )
    try:
        with cluster:
            yield Env(cluster, spool, jobs_dir)
    finally:
        shutil.rmtree(jobs_dir, ignore_errors=True)
    assert not cluster.step_daemons()
    assert not cluster.cgroup_dirs() or cgroup_version() == 2


class Burner:
    """A batch job whose step 0 burns ``cpu_s`` of CPU time between the barriers ``go`` and ``release``."""

    def __init__(self, env: Env, tag: str, cpu_s: float, *sbatch_args: str) -> None:
        self.env, self.tag = env, tag
        d = env.jobs_dir
        for fifo in ("go", "release"):
            path = d / f"{tag}.{fifo}"
            os.mkfifo(path)
            path.chmod(0o666)
        script = d / f"{tag}.sh"
        script.write_text(f"#!/bin/sh\nsrun /usr/bin/python3 {d / 'burner.py'} {d} {tag} {cpu_s}\n")
        script.chmod(0o755)
        args = ("--chdir", str(d), "-o", str(d / f"{tag}.out"), "-J", f"burn-{tag}", *sbatch_args, str(script))
        self.job_id = env.cluster.sbatch(*args)

    def marked(self, name: str) -> bool:
        return (self.env.jobs_dir / f"{self.tag}.{name}").exists()

    def wait_marked(self, name: str) -> None:
        eventually(lambda: self.marked(name) or self._failed(), 60.0, what=f"job {self.tag} {name}")
        assert self.marked(name), self.output()

    def _failed(self) -> bool:
        job = self.env.cluster.job(self.job_id)
        return job is not None and job.finished

    def open_barrier(self, name: str) -> None:
        """Let the job past ``name`` (a FIFO it reads: opening it for writing fails until the job has opened it)."""
        path = self.env.jobs_dir / f"{self.tag}.{name}"
        fd = eventually(
            lambda: os.open(path, os.O_WRONLY | os.O_NONBLOCK), 60.0, what=f"{path} open", ignore=(OSError,)
        )
        os.write(fd, b"1")
        os.close(fd)

    def job(self) -> Job:
        job = self.env.cluster.job(self.job_id)
        assert job is not None
        return job

    def cpu_ns(self) -> int:
        """The job's CPU time so far (its cgroup's, which includes every step's)."""
        cgroup = self.env.cluster.job_cgroup(self.job())
        if cgroup_version() == 2:
            stat = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) * 1000
        return int((cgroup / "cpuacct.usage").read_text())

    def output(self) -> str:
        out = self.env.jobs_dir / f"{self.tag}.out"
        return out.read_text(errors="replace") if out.exists() else ""

    def finish(self) -> Job:
        if not self.marked("done"):
            self.open_barrier("go")
            self.wait_marked("done")
        self.open_barrier("release")
        return self.env.cluster.wait_job(self.job_id, lambda j: j.finished, "finished")


def test_real_job_cgroups_are_identified_as_slurm_steps(env: Env) -> None:
    """The cgroups real Slurm makes for a job (``sbatch`` with an ``srun`` step, as another user) are Slurm steps to
    the walker: job id, step and uid come out of the real paths, and the reader finds the steps as workloads."""
    b = Burner(env, "layout", 0.0, f"--uid={NOBODY}")
    b.wait_marked("ready")
    job = b.job()
    assert (job.state, job.user, job.uid) == ("RUNNING", "nobody", NOBODY)
    hierarchy = CGROUP_ROOT / "cpuacct" if cgroup_version() == 1 else CGROUP_ROOT
    job_dir = env.cluster.job_cgroup(job)
    step0 = job_dir / "step_0"
    assert {p.name for p in job_dir.iterdir() if p.is_dir()} >= {"step_0", "step_batch"}
    rel = str(step0.relative_to(hierarchy))
    ident = identify(rel)
    assert (ident.slurm_job_id, ident.slurm_step, ident.is_workload) == (str(b.job_id), "0", True)
    if cgroup_version() == 1:
        assert rel == f"slurm_{env.cluster.node_name}/uid_{NOBODY}/job_{b.job_id}/step_0"
        assert ident.slurm_uid == str(NOBODY)
        assert identify(f"{rel}/task_0").slurm_step == "0"  # a task folds into its step
    whole = identify(str(job_dir.relative_to(hierarchy)))
    assert (whole.slurm_job_id, whole.slurm_step, whole.is_workload) == (str(b.job_id), "", False)
    reader = CgroupReader(CGROUP_ROOT)
    try:
        cpu, _memory = reader.read_all()
    finally:
        reader.close()
    mine = {k for k in cpu if f"/job_{b.job_id}/" in k}
    assert mine == {rel, rel.replace("step_0", "step_batch")}, mine
    assert b.finish().state == "COMPLETED", b.output()
    eventually(lambda: not job_dir.exists(), 30.0, what="Slurm removing the job's cgroup")


def test_prolog_and_epilog_hand_the_job_to_the_spool(env: Env) -> None:
    """The shipped node scripts, run by slurmd around a real job: its metadata while it runs, its end after."""
    b = Burner(env, "spool", 0.0, "-A", "physics", f"--uid={NOBODY}")
    b.wait_marked("ready")
    meta_path = env.spool / f"job_{b.job_id}.json"
    assert meta_path.exists()  # the Prolog ran before the job's first step
    meta = json.loads(meta_path.read_text())
    assert meta["job_id"] == str(b.job_id)
    assert (meta["user"], meta["uid"], meta["account"], meta["partition"]) == ("nobody", NOBODY, "physics", "debug")
    assert (meta["node"], meta["cluster"], meta["num_nodes"]) == (env.cluster.node_name, "carbondtest", 1)
    assert not (env.spool / f"job_{b.job_id}.end").exists()
    b.finish()
    end = eventually(lambda: _read_json(env.spool / f"job_{b.job_id}.end"), 30.0, what="the Epilog's end file")
    assert end["job_id"] == str(b.job_id)
    assert end["end"] >= meta["start"]
    assert not [p for p in env.spool.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


# -- the daemon on real jobs -----------------------------------------------------------------------------------------


def of_job(labels: dict[str, str], job_id: int) -> bool:
    """A series of the job: by its label, or by its cgroup (``.../job_<id>/step_<n>``)."""
    return labels.get("slurm_job_id") == str(job_id) or f"/job_{job_id}/" in labels.get("cgroup", "") + "/"


def job_series(m: Metrics, job_id: int, name: str = "carbond_cgroup_energy_joules_total") -> list[dict[str, str]]:
    """The job's series of ``name``: their labels, and their value under ``"value"``."""
    return [dict(lab) | {"value": str(v)} for (n, lab), v in m.items() if n == name and of_job(dict(lab), job_id)]


def job_joules(m: Metrics, job_id: int) -> float:
    return sum(float(s["value"]) for s in job_series(m, job_id))


def job_grams(m: Metrics, job_id: int) -> float:
    return sum(float(s["value"]) for s in job_series(m, job_id, "carbond_cgroup_emissions_grams_total"))


def wait_ledger_line(ledger_dir: Path, job_id: int) -> dict[str, Any]:
    line: dict[str, Any] = eventually(lambda: ledger_line(ledger_dir, job_id), 60.0, what=f"job {job_id}'s ledger line")
    return line


def ledger_line(ledger_dir: Path, job_id: int) -> dict[str, Any] | None:
    path = ledger_dir / "ledger.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        doc: dict[str, Any] = json.loads(line)
        if str(doc.get("job_id")) == str(job_id):
            return doc
    return None


def burn(d: Daemon, jobs: tuple[Burner, ...]) -> tuple[dict[Burner, float], dict[Burner, float], Metrics]:
    """Let the blocked jobs burn; their CPU seconds and their energy on /metrics over the burn, and the last scrape.

    A blocked job has no series yet (no energy). Two ticks after every job blocked, the daemon has read their
    cgroups since, so what it attributes from there is what they burn after ``go``; two ticks after they all
    blocked again, it has read everything they burned. The jobs idle four ticks at their start, as a job staging
    its data does: longer than the ledger's tolerance for a start the daemon missed, which it did not miss."""
    for job in jobs:
        job.wait_marked("ready")
    m0 = d.wait_for_ticks(4)
    u0 = {job: job.cpu_ns() for job in jobs}
    for job in jobs:
        job.open_barrier("go")
    for job in jobs:
        job.wait_marked("done")
    u1 = {job: job.cpu_ns() for job in jobs}
    m1 = d.wait_for_ticks(2)
    cpu_s = {job: (u1[job] - u0[job]) / 1e9 for job in jobs}
    return cpu_s, {job: job_joules(m1, job.job_id) - job_joules(m0, job.job_id) for job in jobs}, m1


def test_daemon_splits_node_energy_over_real_jobs_and_ledgers_them(env: Env, tmp_path: Path) -> None:
    """Two jobs burning 3:1 CPU time at once (one as root, one as nobody): their series, labelled with the job,
    step and user, split the node's energy 3:1, each at the node's power per CPU; at their end each has a ledger
    line agreeing with its series, and ``carbond slurm report`` agrees with both."""
    tree = PowercapTree(tmp_path / "sys")
    pkg = tree.add_zone("package-0")
    ledger_dir = tmp_path / "ledger"
    cfg = {
        "host_name": env.cluster.node_name,
        "measure_power_secs": INTERVAL_S,
        "sensors": ["rapl"],
        "paths": {"sysfs": str(tmp_path / "sys"), "procfs": "/proc", "cgroupfs": str(CGROUP_ROOT)},
        "intensity": {"zone": "FR"},
        "attribution": {
            "slurm": {
                "enabled": True,
                "spool_dir": str(env.spool),
                "labels": ["account", "partition"],
                "ledger": {"dir": str(ledger_dir)},
            }
        },
    }
    cpus = os.cpu_count() or 1
    clock = GapClock()
    with PowercapWriter({pkg: WATTS}, clock=clock), Daemon(tmp_path, cfg) as d:
        a = Burner(env, "a", 2.4, "-A", "physics")
        b = Burner(env, "b", 0.8, "-A", "chem", f"--uid={NOBODY}")
        cpu_s, joules, m1 = burn(d, (a, b))
        stale_s = clock.max_gap_s()
        # the jobs burned what they were asked, 3:1 (the interpreter's own start-up was before the first reading)
        assert cpu_s[a] / cpu_s[b] == pytest.approx(3.0, rel=0.1), cpu_s
        # the split follows the CPU times (the attribution's tolerance elsewhere: 5 %); each job's energy is its CPU
        # time at the node's power per CPU (a counter read up to ``stale_s`` late shifts a 1 s tick's energy)
        assert joules[a] / joules[b] == pytest.approx(cpu_s[a] / cpu_s[b], rel=0.05), (joules, cpu_s)
        for j in (a, b):
            expected = WATTS / cpus * cpu_s[j]
            assert joules[j] == pytest.approx(expected, rel=0.05 + 2 * stale_s / INTERVAL_S), (j.tag, joules, cpu_s)
        # the series carry the job, the step and the user
        users = {j.tag: {s.get("slurm_user") for s in job_series(m1, j.job_id)} for j in (a, b)}
        assert users == {"a": {"root"}, "b": {"nobody"}}
        accounts = {
            j.tag: {(s.get("slurm_account"), s.get("slurm_partition")) for s in job_series(m1, j.job_id)}
            for j in (a, b)
        }
        assert accounts == {"a": {("physics", "debug")}, "b": {("chem", "debug")}}
        steps = {s.get("slurm_step") for s in job_series(m1, a.job_id)}
        assert "0" in steps, steps
        assert steps <= {"0", "batch", "extern"}, steps
        for j in (a, b):
            assert j.finish().state == "COMPLETED", j.output()
        lines = {j: wait_ledger_line(ledger_dir, j.job_id) for j in (a, b)}
        m2 = d.scrape()
    # after the end each job has its ledger line, agreeing with its series on /metrics
    for j in (a, b):
        line = lines[j]
        assert line["energy_j"] == pytest.approx(job_joules(m2, j.job_id), rel=1e-6), line
        assert line["emissions_g"] == pytest.approx(job_grams(m2, j.job_id), rel=1e-6), line
        assert line["partial"] is False, line  # the daemon ran all along, though the job idled at its start
    assert (lines[a]["account"], lines[b]["account"]) == ("physics", "chem")
    assert (lines[a]["user"], lines[b]["user"]) == ("root", "nobody")
    report = subprocess.run(
        [sys.executable, "-m", "carbond", "slurm", "report", "--ledger-dir", str(ledger_dir), "--json", str(a.job_id)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["energy_j"] == pytest.approx(job_joules(m2, a.job_id), rel=1e-6), summary
    assert summary["emissions_g"] == pytest.approx(job_grams(m2, a.job_id), rel=1e-6), summary
