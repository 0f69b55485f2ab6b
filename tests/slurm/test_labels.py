"""Slurm labels on the cgroup series: only when ``attribution.slurm.enabled``, the same names on every series of the
daemon (pseudo-cgroups, units, pods), values from the spool's metadata, the user falling back to the uid's name,
then the uid; and the ``attribution.slurm`` config section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from carbond import config
from carbond.attribution.labels import DEFAULT_POLICY, LabelPolicy, LabelsConfig, SlurmLabel
from carbond.attribution.paths import identify
from carbond.errors import ConfigError
from carbond.slurm.spool import SPOOL_DIR, JobMeta

V1 = "slurm/uid_1000/job_42/step_0"
V2 = "system.slice/slurmstepd.scope/job_42/step_batch"
META = JobMeta("42", "ada", "1000", "physics", "gpu", "train", "n1", 1.0)
ALL = ("slurm_account", "slurm_job_id", "slurm_partition", "slurm_step", "slurm_user")


def fake_users(uid: str) -> str:
    return {"1000": "ada", "1001": "grace"}.get(uid, uid)


def test_off_by_default_so_default_series_do_not_change() -> None:
    assert DEFAULT_POLICY.extra_names == ()
    assert DEFAULT_POLICY.labels(identify(V1), META).extra == ()
    assert config.Config().attribution.slurm.enabled is False


@pytest.mark.parametrize(
    ("optional", "names"),
    [
        ((), ("slurm_job_id", "slurm_step", "slurm_user")),
        (("partition",), ("slurm_job_id", "slurm_partition", "slurm_step", "slurm_user")),
        (("partition", "account"), ALL),
    ],
)
def test_names_are_sorted_and_fixed(optional: tuple[SlurmLabel, ...], names: tuple[str, ...]) -> None:
    policy = LabelPolicy(slurm=optional, users=fake_users)
    assert policy.extra_names == names
    for ident in (identify(V1), identify(V2), identify("system.slice/ssh.service"), identify("x")):
        for job in (None, META):
            assert tuple(n for n, _ in policy.labels(ident, job).extra) == names
    assert tuple(n for n, _ in policy.empty().extra) == names


def test_values_from_the_spool() -> None:
    policy = LabelPolicy(slurm=("account", "partition"), users=fake_users)
    got = dict(policy.labels(identify(V2), META).extra)
    assert got == {
        "slurm_account": "physics",
        "slurm_job_id": "42",
        "slurm_partition": "gpu",
        "slurm_step": "batch",
        "slurm_user": "ada",
    }
    unit = policy.labels(identify("system.slice/ssh.service"))
    assert dict(unit.extra) == dict.fromkeys(ALL, "")
    assert unit.unit == "ssh.service"


@pytest.mark.parametrize(
    ("path", "job", "user"),
    [
        (V1, None, "ada"),  # no metadata yet: the uid in the v1 path, named
        ("slurm/uid_1001/job_42/step_0", JobMeta("42", uid="1001"), "grace"),  # the Prolog gave a uid only
        ("slurm/uid_7777/job_42/step_0", None, "7777"),  # an uid without a name: the uid
        (V2, None, ""),  # v2 paths carry no uid: empty until the metadata comes
        (V2, JobMeta("42", uid="1001"), "grace"),
        (V2, JobMeta("42", user="bob", uid="1001"), "bob"),  # the Prolog's name wins
    ],
)
def test_the_user_falls_back_to_the_uid(path: str, job: JobMeta | None, user: str) -> None:
    policy = LabelPolicy(slurm=(), users=fake_users)
    assert dict(policy.labels(identify(path), job).extra)["slurm_user"] == user


def test_pods_and_copied_kubernetes_labels_keep_one_name_set() -> None:
    policy = LabelPolicy(pod_keys=("team", "app.kubernetes.io/name"), slurm=("account",), users=fake_users)
    names = ("label_app_kubernetes_io_name", "slurm_account", "slurm_job_id", "slurm_step", "slurm_user")
    assert policy.extra_names == names
    _, _, extra = policy.for_pod({"app.kubernetes.io/name": "web"}, {})
    assert extra == (("label_app_kubernetes_io_name", "web"), *((n, "") for n in names[1:]))
    step = policy.labels(identify(V1), META).extra
    assert step[0] == ("label_app_kubernetes_io_name", "")
    assert dict(step)["slurm_account"] == "physics"
    assert tuple(n for n, _ in step) == names


def test_policy_from_config() -> None:
    cfg = config.parse({"attribution": {"slurm": {"enabled": True, "labels": ["partition"]}}})
    s = cfg.attribution.slurm
    policy = LabelPolicy.of(cfg.attribution.labels, cfg.attribution.units, s.labels if s.enabled else None)
    assert policy.extra_names == ("slurm_job_id", "slurm_partition", "slurm_step", "slurm_user")
    assert LabelPolicy.of(LabelsConfig()).extra_names == ()


def test_config_defaults() -> None:
    s = config.Config().attribution.slurm
    assert (s.enabled, s.spool_dir, s.labels) == (False, SPOOL_DIR, [])
    assert s.spool_dir == Path("/run/carbond/slurm")
    assert s.ledger.dir is None
    assert s.ledger.max_bytes >= 4096
    assert s.ledger.keep >= 1


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"labels": ["qos"]}, "attribution.slurm.labels.0"),
        ({"labels": ["account", "account"]}, "attribution.slurm.labels"),
        ({"labels": "account"}, "attribution.slurm.labels"),
        ({"enabled": "maybe"}, "attribution.slurm.enabled"),
        ({"spool_dir": 3}, "attribution.slurm.spool_dir"),
        ({"ledger": {"keep": 0}}, "attribution.slurm.ledger.keep"),
        ({"ledger": {"max_bytes": 10}}, "attribution.slurm.ledger.max_bytes"),
        ({"ledger": {"rotate": 1}}, "attribution.slurm.ledger.rotate"),
        ({"spool": "/x"}, "attribution.slurm.spool"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, section: dict[str, object], key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"attribution": {"slurm": section}}))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert [k for k, _ in info.value.problems] == [key]
    assert str(path) in str(info.value)
