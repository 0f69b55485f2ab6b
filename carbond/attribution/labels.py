"""Team, project and copied Kubernetes labels on the cgroup series; the granularity the series are kept at.

Kubernetes: an allowlist of pod labels and of namespace labels is copied onto each pod's cgroup series, as
kube-state-metrics does with ``--metric-labels-allowlist``: a label ``app.kubernetes.io/part-of`` becomes
``label_app_kubernetes_io_part_of`` (every character outside ``[a-zA-Z0-9_]`` turned into ``_``). A pod's own label
wins over its namespace's. The two allowlisted labels named by ``labels.team`` and ``labels.project`` fill the
fixed ``team`` and ``project`` labels instead (so dashboards, rules and budgets need not know which label a fleet
uses). systemd hosts: ``units`` maps unit-name patterns (shell globs, first match wins) to a team and a project.

Granularity (``attribution.granularity``), the series kept per node:

- ``container`` (default): one series set per workload cgroup (container, systemd unit, docker scope);
- ``pod``: a pod's containers add up into one series set per pod (its cgroup is the pod's); other workloads stay;
- ``namespace``: pods add up per namespace and copied labels (``cgroup="namespace/<ns>"``, or ``kubepods`` while a
  pod's namespace is unknown); other workloads per top-level slice and team/project (``cgroup="system.slice"``).

Aggregates are summed as energy is attributed, tick by tick, so their counters never go backwards when a member
comes or goes. Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carbond.attribution.paths import Identity
from carbond.model import NO_LABELS, CgroupLabels

Granularity = Literal["container", "pod", "namespace"]
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
    extra_names: tuple[str, ...] = field(init=False)  # the label_* names, sorted
    _names: dict[str, str] = field(init=False)  # copied key -> its label_* name

    def __post_init__(self) -> None:
        names = {
            k: sanitise(k)
            for k in dict.fromkeys([*self.pod_keys, *self.namespace_keys])
            if k not in (self.team_key, self.project_key)
        }
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "extra_names", tuple(sorted(names.values())))

    @classmethod
    def of(cls, cfg: LabelsConfig, units: list[UnitRule] | tuple[UnitRule, ...] = ()) -> LabelPolicy:
        return cls(tuple(cfg.pods), tuple(cfg.namespaces), cfg.team, cfg.project, tuple(units))

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
        return merged.get(self.team_key, ""), merged.get(self.project_key, ""), tuple(extra)

    def labels(self, ident: Identity) -> CgroupLabels:
        """The labels a workload's identity gives before any Kubernetes lookup."""
        team, project = self.for_unit(ident.unit)
        base = self.empty()
        return base._replace(unit=ident.unit, pod_uid=ident.pod_uid, container_id=ident.container_id, team=team,
                             project=project)  # fmt: skip


DEFAULT_POLICY = LabelPolicy()


def pod_cgroup(path: str, ident: Identity) -> str:
    """The pod's own cgroup of a container's path (containers are the pod cgroup's children)."""
    return path.rpartition("/")[0] if ident.container_id else path


def top_slice(path: str) -> str:
    """The first component of a cgroup path ("system.slice"), where non-Kubernetes workloads add up by namespace."""
    return path.partition("/")[0]
