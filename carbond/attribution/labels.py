"""Team, project and copied Kubernetes labels on the cgroup series; the granularity the series are kept at.

Kubernetes: an allowlist of pod labels and of namespace labels is copied onto each pod's cgroup series, as
kube-state-metrics does with ``--metric-labels-allowlist``: a label ``app.kubernetes.io/part-of`` becomes
``label_app_kubernetes_io_part_of`` (every character outside ``[a-zA-Z0-9_]`` turned into ``_``). A pod's own label
wins over its namespace's. The two allowlisted labels named by ``labels.team`` and ``labels.project`` fill the
fixed ``team`` and ``project`` labels instead (so dashboards, rules and budgets need not know which label a fleet
uses). systemd hosts: ``units`` maps unit-name patterns (shell globs, first match wins) to a team and a project.

Slurm (``attribution.slurm.enabled``): every cgroup series carries ``slurm_job_id``, ``slurm_step`` and
``slurm_user``, and those of ``attribution.slurm.labels`` (``slurm_account``, ``slurm_partition``), empty where the
cgroup is no Slurm job's. The user is the Prolog's (:mod:`carbond.slurm.spool`), else the name of the uid in the
cgroup path (v1), else that uid. The extra labels of a series (copied ``label_*`` ones, then ``slurm_*``) are one
sorted tuple with the same names on every series of a daemon: :attr:`LabelPolicy.extra_names`.

Granularity (``attribution.granularity``), the series kept per node:

- ``container`` (default): one series set per workload cgroup (container, systemd unit, docker scope);
- ``pod``: a pod's containers add up into one series set per pod (its cgroup is the pod's), a Slurm job's steps into
  one per job (its cgroup is the job's, ``slurm_step=""``); other workloads stay;
- ``namespace``: pods add up per namespace and copied labels (``cgroup="namespace/<ns>"``, or ``kubepods`` while a
  pod's namespace is unknown); other workloads per top-level slice and team/project (``cgroup="system.slice"``).

Aggregates are summed as energy is attributed, tick by tick, so their counters never go backwards when a member
comes or goes. Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carbond.attribution.paths import Identity
from carbond.model import NO_LABELS, CgroupLabels
from carbond.slurm.spool import JobMeta, user_name

Granularity = Literal["container", "pod", "namespace"]
SlurmLabel = Literal["account", "partition"]  # the optional Slurm labels (attribution.slurm.labels)
SLURM_LABELS = ("slurm_job_id", "slurm_step", "slurm_user")  # always there when Slurm labels are on
_KEY = re.compile(r"^(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
Pairs = tuple[tuple[str, str], ...]


def sanitise(key: str) -> str:
    """The label name kube-state-metrics gives a copied Kubernetes label: ``label_`` + key with ``[^a-zA-Z0-9_]``
    turned into ``_``."""
    return "label_" + _UNSAFE.sub("_", key)


class UnitRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    match: Annotated[str, Field(min_length=1)]  # a shell glob on the unit name, e.g. "postgresql*.service"
    team: str = ""
    project: str = ""


class LabelsConfig(BaseModel):
    """``attribution.labels``: the Kubernetes labels copied onto the cgroup series."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pods: list[str] = Field(default_factory=lambda: ["team", "project"])
    namespaces: list[str] = Field(default_factory=list)  # needs RBAC list on namespaces (API server)
    team: str = "team"  # the allowlisted label whose value fills `team`
    project: str = "project"

    @field_validator("pods", "namespaces")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not _KEY.match(key):
                raise ValueError(f"{key!r} is not a Kubernetes label key")
        if len(set(value)) != len(value):
            raise ValueError("a label is listed twice")
        return value

    @model_validator(mode="after")
    def _distinct_names(self) -> LabelsConfig:
        listed = {*self.pods, *self.namespaces}
        for key in ("team", "project"):
            value = getattr(self, key)
            if key in self.model_fields_set and value and value not in listed:
                raise ValueError(f"{key}: {value!r} is not in labels.pods or labels.namespaces")
        seen: dict[str, str] = {}
        for key in dict.fromkeys([*self.pods, *self.namespaces]):
            if key in (self.team, self.project):
                continue
            name = sanitise(key)
            if name in seen:
                raise ValueError(f"labels {seen[name]!r} and {key!r} would both be exported as {name}")
            seen[name] = key
        return self


@dataclass(frozen=True, slots=True)
class LabelPolicy:
    """Which labels the cgroup series carry beyond their identity, and where their values come from."""

    pod_keys: tuple[str, ...] = ("team", "project")
    namespace_keys: tuple[str, ...] = ()
    team_key: str = "team"
    project_key: str = "project"
    units: tuple[UnitRule, ...] = ()
    slurm: tuple[SlurmLabel, ...] | None = None  # None: no Slurm labels; else the optional ones beside the three
    users: Callable[[str], str] = user_name  # uid -> user name, where the Prolog gave none
    extra_names: tuple[str, ...] = field(init=False)  # the label_* names, then the slurm_* ones; sorted
    _names: dict[str, str] = field(init=False)  # copied key -> its label_* name
    _slurm_names: tuple[str, ...] = field(init=False)  # sorted
    _slurm_blank: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        names = {
            k: sanitise(k)
            for k in dict.fromkeys([*self.pod_keys, *self.namespace_keys])
            if k not in (self.team_key, self.project_key)
        }
        slurm = () if self.slurm is None else tuple(sorted({*SLURM_LABELS, *(f"slurm_{n}" for n in self.slurm)}))
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_slurm_names", slurm)
        object.__setattr__(self, "_slurm_blank", tuple((n, "") for n in slurm))
        object.__setattr__(self, "extra_names", tuple(sorted(names.values())) + slurm)  # label_* < slurm_*

    @classmethod
    def of(
        cls,
        cfg: LabelsConfig,
        units: list[UnitRule] | tuple[UnitRule, ...] = (),
        slurm: list[SlurmLabel] | tuple[SlurmLabel, ...] | None = None,
    ) -> LabelPolicy:
        """``slurm``: None without Slurm labels, else ``attribution.slurm.labels``."""
        return cls(tuple(cfg.pods), tuple(cfg.namespaces), cfg.team, cfg.project, tuple(units),
                   None if slurm is None else tuple(slurm))  # fmt: skip

    @property
    def wants_namespaces(self) -> bool:
        return bool(self.namespace_keys)

    def empty(self) -> CgroupLabels:
        """The labels of a cgroup with nothing copied (pseudo-cgroups): every extra name with an empty value."""
        return NO_LABELS._replace(extra=tuple((n, "") for n in self.extra_names)) if self.extra_names else NO_LABELS

    def for_unit(self, unit: str) -> tuple[str, str]:
        """(team, project) of a systemd unit or scope: the first rule whose glob matches."""
        if unit:
            for rule in self.units:
                if fnmatchcase(unit, rule.match):
                    return rule.team, rule.project
        return "", ""

    def for_pod(self, pod: Mapping[str, str], namespace: Mapping[str, str]) -> tuple[str, str, Pairs]:
        """(team, project, label_* pairs sorted by name) from a pod's labels and its namespace's."""
        merged = {k: namespace[k] for k in self.namespace_keys if k in namespace}
        merged.update((k, pod[k]) for k in self.pod_keys if k in pod)
        extra = sorted((n, merged.get(k, "")) for k, n in self._names.items())
        return merged.get(self.team_key, ""), merged.get(self.project_key, ""), tuple(extra) + self._slurm_blank

    def slurm_pairs(self, ident: Identity, job: JobMeta | None) -> Pairs:
        """The slurm_* pairs of a cgroup, sorted by name (none without Slurm labels; empty values off Slurm)."""
        if not ident.slurm_job_id or not self._slurm_names:
            return self._slurm_blank
        user = job.user if job is not None else ""
        if not user:
            uid = (job.uid if job is not None else "") or ident.slurm_uid
            user = self.users(uid) if uid else ""
        values = {
            "slurm_account": job.account if job is not None else "",
            "slurm_job_id": ident.slurm_job_id,
            "slurm_partition": job.partition if job is not None else "",
            "slurm_step": ident.slurm_step,
            "slurm_user": user,
        }
        return tuple((n, values[n]) for n in self._slurm_names)

    def labels(self, ident: Identity, job: JobMeta | None = None) -> CgroupLabels:
        """The labels a workload's identity gives before any Kubernetes lookup; ``job``: the spool's metadata of
        its Slurm job, if any."""
        team, project = self.for_unit(ident.unit)
        base = self.empty()
        if ident.slurm_job_id and self._slurm_names:
            base = base._replace(extra=base.extra[: -len(self._slurm_names)] + self.slurm_pairs(ident, job))
        return base._replace(unit=ident.unit, pod_uid=ident.pod_uid, container_id=ident.container_id, team=team,
                             project=project)  # fmt: skip


DEFAULT_POLICY = LabelPolicy()


def pod_cgroup(path: str, ident: Identity) -> str:
    """The pod's own cgroup of a container's path (containers are the pod cgroup's children)."""
    return path.rpartition("/")[0] if ident.container_id else path


def top_slice(path: str) -> str:
    """The first component of a cgroup path ("system.slice"), where non-Kubernetes workloads add up by namespace."""
    return path.partition("/")[0]
