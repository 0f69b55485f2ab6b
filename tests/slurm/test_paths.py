"""Slurm's job cgroups as its cgroup/v1 and cgroup/v2 plugins lay them out: the step is the workload, its tasks fold
into it, the job's own directory and the v2 scope are walked through, and names that only look like Slurm's are not
taken for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution.cgroupfs import CgroupReader
from carbond.attribution.paths import Identity, identify, job_cgroup
from carbond.testing.cgroupfs import CgroupTree, add_slurm_step, slurm_job_cgroup

SCOPE = "system.slice/slurmstepd.scope"


@pytest.mark.parametrize(
    ("path", "job", "step", "uid"),
    [
        # cgroup v1, relative to the cpuacct (or memory, freezer ...) mount
        ("slurm/uid_1000/job_42/step_0", "42", "0", "1000"),
        ("slurm/uid_1000/job_42/step_0/task_3", "42", "0", "1000"),
        ("slurm/uid_0/job_7/step_batch", "7", "batch", "0"),
        ("slurm/uid_1000/job_7/step_extern/task_0", "7", "extern", "1000"),
        ("slurm/uid_1000/job_7/step_interactive", "7", "interactive", "1000"),
        ("slurm_node-01.cluster/uid_5001/job_99/step_12", "99", "12", "5001"),  # multiple-slurmd
        ("slurm_localhost/uid_65534/job_3/step_0/task_0", "3", "0", "65534"),  # Debian 12's Slurm 22.05, seen
        # cgroup v2
        (f"{SCOPE}/job_42/step_0", "42", "0", ""),
        (f"{SCOPE}/job_42/step_0/user/task_0", "42", "0", ""),
        (f"{SCOPE}/job_42/step_0/user/task_special", "42", "0", ""),
        (f"{SCOPE}/job_42/step_0/slurm", "42", "0", ""),  # the step's own slurmstepd
        (f"{SCOPE}/job_42/step_batch/user/task_0", "42", "batch", ""),
        (f"{SCOPE}/job_42/step_extern", "42", "extern", ""),
        (f"{SCOPE}/job_42/step_interactive/user/task_0", "42", "interactive", ""),
        ("system.slice/gamba1_slurmstepd.scope/job_3385/step_0", "3385", "0", ""),  # multiple-slurmd
        ("slurm.slice/slurmstepd.scope/job_8/step_1", "8", "1", ""),  # cgroup.conf CgroupSlice=slurm.slice
        ("system.slice/slurmstepd.scope/job_4294967290/step_4294967200", "4294967290", "4294967200", ""),
    ],
)
def test_steps_are_workloads(path: str, job: str, step: str, uid: str) -> None:
    ident = identify(path)
    assert (ident.slurm_job_id, ident.slurm_step, ident.slurm_uid) == (job, step, uid)
    assert ident.is_workload
    assert ident.cgroup == path
    assert (ident.unit, ident.pod_uid, ident.container_id) == ("", "", "")


@pytest.mark.parametrize(
    ("path", "job", "uid"),
    [
        ("slurm/uid_1000/job_42", "42", "1000"),
        (f"{SCOPE}/job_42", "42", ""),
        ("slurm/uid_1000/job_42/step_x/task_0", "42", "1000"),  # a step name Slurm never writes
        (f"{SCOPE}/job_42/step_/user", "42", ""),
    ],
)
def test_a_job_directory_is_walked_through(path: str, job: str, uid: str) -> None:
    ident = identify(path)
    assert (ident.slurm_job_id, ident.slurm_step, ident.slurm_uid) == (job, "", uid)
    assert not ident.is_workload


@pytest.mark.parametrize(
    ("path", "unit", "workload"),
    [
        (SCOPE, "", False),  # a .scope everywhere else is a workload: this one holds the jobs
        ("system.slice/n1_slurmstepd.scope", "", False),
        (f"{SCOPE}/system", "slurmstepd.scope", True),  # "slurmstepd infinity", steps not placed yet
        (f"{SCOPE}/slurmd", "slurmstepd.scope", True),  # slurmd started outside systemd
        (f"{SCOPE}/job_abc", "slurmstepd.scope", True),  # not a job: counted as Slurm's own
        ("system.slice/slurmd.service", "slurmd.service", True),
        ("slurm", "", False),
        ("slurm/uid_1000", "", False),
        ("slurm/system", "", False),
        ("slurm/uid_x/job_1/step_0", "", False),
        ("slurmx/uid_1/job_1/step_0", "", False),
        ("system.slice/slurm_exporter.service", "slurm_exporter.service", True),  # merely named slurm_...
        ("system.slice/slurmstepd.scope.d/job_1/step_0", "", False),
        ("user.slice/job_1/step_0", "", False),  # job and step names outside Slurm's tree
    ],
)
def test_slurm_daemons_and_look_alikes(path: str, unit: str, workload: bool) -> None:
    ident = identify(path)
    assert ident.slurm_job_id == ""
    assert ident.slurm_step == ""
    assert ident.unit == unit
    assert ident.is_workload is workload


@pytest.mark.parametrize(
    ("path", "job"),
    [
        ("slurm/uid_1000/job_42/step_0/task_1", "slurm/uid_1000/job_42"),
        (f"{SCOPE}/job_42/step_batch/user/task_0", f"{SCOPE}/job_42"),
        (f"{SCOPE}/job_42", f"{SCOPE}/job_42"),
        ("system.slice/ssh.service", "system.slice/ssh.service"),
    ],
)
def test_job_cgroup(path: str, job: str) -> None:
    assert job_cgroup(identify(path)) == job


def test_job_cgroup_of_an_identity_built_by_hand() -> None:
    ident = Identity("a/job_5/b/job_5/step_0", slurm_job_id="5", slurm_step="0")
    assert job_cgroup(ident) == "a/job_5"


@given(st.lists(st.sampled_from(["slurm", "uid_1", "job_2", "step_3", "task_0", "user", SCOPE, "x", ""]), max_size=7))
def test_any_arrangement_of_slurm_names_gives_an_identity(parts: list[str]) -> None:
    ident = identify("/".join(parts))
    assert ident.slurm_step == "" or (ident.slurm_job_id and ident.is_workload)
    assert ident.slurm_uid == "" or ident.slurm_job_id


@pytest.mark.parametrize("version", ["v1", "v2", "hybrid"])
def test_the_walk_stops_at_each_step(tmp_path: Path, version: str) -> None:
    """The reader finds the steps (not their tasks, not the job) on a tree laid out as Slurm does, beside a unit."""
    tree = CgroupTree(tmp_path, version)
    tree.add("system.slice/ssh.service", 0.1)
    a = add_slurm_step(tree, 42, 0, cpus=2.0, tasks=2, uid=1000)
    b = add_slurm_step(tree, 42, "batch", cpus=0.5)
    c = add_slurm_step(tree, 43, "extern", uid=1001)
    if version == "v2":
        tree.add(f"{SCOPE}/system", 0.01)
    tree.advance(10)
    reader = CgroupReader(tmp_path)
    found = {i.cgroup: i for i in reader.workloads()}
    expected = {"system.slice/ssh.service", a, b, c} | ({f"{SCOPE}/system"} if version == "v2" else set())
    assert set(found) == expected
    assert (found[a].slurm_job_id, found[a].slurm_step) == ("42", "0")
    assert found[c].slurm_uid == ("1001" if version != "v2" else "")
    cpu, _ = reader.read_all()
    assert cpu[a] == pytest.approx(20e6)  # the step's counter includes its tasks'
    assert a == f"{slurm_job_cgroup('v2' if version == 'v2' else 'v1', 42)}/step_0"
    reader.close()
