"""A metric family declared once: name, type, unit, help, labels, and where its values come from.

Every family carbond serves is one :class:`Family` in :data:`carbond.exporter.families.FAMILIES`. The exposition
(prometheus_client's families, :func:`collect`; the cgroup samples of the scrape path,
:mod:`carbond.exporter.cgroup_lines`), the README's metric table (:func:`markdown_rows`) and the golden test's
family coverage are all derived from that table, so a family's name, help, type and labels are spelt in one place.

``host`` is the first label of every family and is not declared: the renderers put it first. Label order only
matters to the README (the exposition formats sort label names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from carbond.model import CgroupLabels, CgroupState, HistogramState, Snapshot

#: The labels of a device's series.
DEVICE = ("device", "kind", "sensor")
#: One series: its label values besides host, in the family's label order, and its value.
Sample = tuple[Sequence[str], float]
Type = Literal["gauge", "counter", "histogram"]
#: The base units names end in ("" for counts, states, ratios of like quantities and info series).
UNITS = frozenset({"", "watts", "joules", "grams", "seconds", "grams_per_kwh", "ratio"})


@dataclass(frozen=True, slots=True)
class FromSnapshot:
    """The series are read off the snapshot by ``samples``."""

    samples: Callable[[Snapshot], Iterable[Sample]]


@dataclass(frozen=True, slots=True)
class FromHistogram:
    """One histogram series, the snapshot's ``state``."""

    state: Callable[[Snapshot], HistogramState]


#: Where a cgroup family's value is: ``power_w`` or ``energy_j`` of each ``(kind, power_w, energy_j)`` entry of
#: :attr:`CgroupState.kinds` (one series per cgroup and kind; a power of None has no series), or a field of the
#: :class:`CgroupState` itself (one series per cgroup).
CgroupField = Literal["power_w", "energy_j", "emissions_g_total"]
#: The labels a cgroup family may declare: ``cgroup``, ``kind`` (per-kind fields only) and the fields of
#: :class:`CgroupLabels`; its copied labels (``CgroupLabels.extra``, such as ``label_*``) always follow them.
CGROUP_LABEL_NAMES = frozenset({"cgroup", "kind", *CgroupLabels._fields}) - {"extra"}


@dataclass(frozen=True, slots=True)
class FromCgroups:
    """One series per cgroup (and kind) of :attr:`Snapshot.cgroups`, the value in ``field``."""

    field: CgroupField

    @property
    def per_kind(self) -> bool:
        return self.field != "emissions_g_total"


@dataclass(frozen=True, slots=True)
class FromOwner:
    """Values that another part of carbond holds and renders with :func:`to_metric` (``owner`` names it)."""

    owner: str


Source = FromSnapshot | FromHistogram | FromCgroups | FromOwner


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family. ``name`` is the name queried (counters end in ``_total``); ``unit`` the base unit it ends
    in; ``help`` the exposition's ``# HELP``; ``labels`` the label names besides host; ``doc`` the README's meaning
    column; ``when``: the family is served only for snapshots where it holds (else always, possibly without a
    series); ``same_row``: the README lists it in the row of the family before it, whose ``doc`` describes the row."""

    name: str
    type: Type
    unit: str
    help: str
    labels: tuple[str, ...]
    source: Source
    doc: str
    when: Callable[[Snapshot], bool] | None = None
    same_row: bool = False

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"family {self.name}: " + "; ".join(problems))

    def served(self, snap: Snapshot) -> bool:
        return self.when is None or self.when(snap)


def _problems(f: Family) -> list[str]:
    out = []
    base = f.name.removesuffix("_total") if f.type == "counter" else f.name
    if not f.name.startswith("carbond_") or (f.type == "counter") != f.name.endswith("_total"):
        out.append("names start with carbond_, and end in _total exactly for counters")
    if f.unit not in UNITS or (f.unit and not base.endswith("_" + f.unit)):
        out.append(f"unit {f.unit!r}: one of {sorted(UNITS)}, and the name ends in it")
    if "host" in f.labels or len(set(f.labels)) != len(f.labels):
        out.append("labels are distinct, host is implied")
    if (f.type == "histogram") != isinstance(f.source, FromHistogram):
        out.append("a histogram, and only a histogram, comes from a FromHistogram")
    if not f.help or not (f.doc or f.same_row):
        out.append("help is required, and doc unless the README row of the family before describes it")
    if isinstance(f.source, FromCgroups):
        per_kind = f.source.per_kind
        if not set(f.labels) <= CGROUP_LABEL_NAMES or ("kind" in f.labels) != per_kind or "cgroup" not in f.labels:
            out.append(f"cgroup labels: cgroup, kind for per-kind values only, and {sorted(CGROUP_LABEL_NAMES)}")
    return out


def to_metric(fam: Family, host: str, samples: Iterable[Sample], extra: Sequence[str] = ()) -> Metric:
    """A gauge or counter family through prometheus_client; ``extra``: label names after the declared ones."""
    names = ["host", *fam.labels, *extra]
    metric = (GaugeMetricFamily if fam.type == "gauge" else CounterMetricFamily)(fam.name, fam.help, labels=names)
    for values, value in samples:
        metric.add_metric([host, *values], value)
    return metric


def _bound(value: float) -> str:
    return repr(float(value))


def histogram_metric(fam: Family, host: str, h: HistogramState) -> Metric:
    metric = HistogramMetricFamily(fam.name, fam.help, labels=["host", *fam.labels])
    buckets = [(_bound(b), float(c)) for b, c in zip(h.bounds, h.counts, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    metric.add_metric([host], buckets, h.total)
    return metric


def cgroup_extra(snap: Snapshot) -> list[str]:
    """The copied label names of the snapshot's cgroups (every cgroup carries the same names)."""
    return [name for name, _ in snap.cgroups[0].labels.extra] if snap.cgroups else []


def cgroup_samples(fam: Family, source: FromCgroups, cgroups: Sequence[CgroupState]) -> Iterator[Sample]:
    """The series of a cgroup family: label values in the declared order, then the copied ones."""
    power = source.field == "power_w"
    for cg in cgroups:
        known = {"cgroup": cg.cgroup, **cg.labels._asdict()}
        copied = [v for _, v in cg.labels.extra]
        if not source.per_kind:
            value: float = getattr(cg, source.field)
            yield [known[name] for name in fam.labels] + copied, value
            continue
        for kind, watts, joules in cg.kinds:
            v = watts if power else joules
            if v is not None:
                known["kind"] = kind
                yield [known[name] for name in fam.labels] + copied, v


def collect(fam: Family, snap: Snapshot) -> Metric | None:
    """The family of one snapshot through prometheus_client; None where it is not served."""
    if not fam.served(snap):
        return None
    source = fam.source
    if isinstance(source, FromSnapshot):
        return to_metric(fam, snap.host, source.samples(snap))
    if isinstance(source, FromHistogram):
        return histogram_metric(fam, snap.host, source.state(snap))
    if isinstance(source, FromCgroups):
        return to_metric(fam, snap.host, cgroup_samples(fam, source, snap.cgroups), cgroup_extra(snap))
    raise TypeError(f"{fam.name} is rendered by {source.owner}, not from a snapshot")


def collect_all(fams: Iterable[Family], snap: Snapshot) -> Iterator[Metric]:
    for fam in fams:
        metric = collect(fam, snap)
        if metric is not None:
            yield metric


def finite(value: float) -> bool:
    return not math.isnan(value)


# ---- the README's metric table ---------------------------------------------------------------------------------

#: A label list longer than this, repeated from the row above, is written "the same", or "the same without X" when
#: it lacks one of them.
_SPELL_OUT = 4


def markdown_rows(fams: Sequence[Family]) -> list[str]:
    """The README's Metrics table: ``| metric | type | labels | meaning |`` (labels besides host), one row per family or
    per run of families with ``same_row`` (names and, where they differ, types joined with " / ")."""
    rows: list[list[Family]] = []
    for fam in fams:
        if fam.same_row and rows:
            if fam.labels != rows[-1][0].labels:
                raise ValueError(f"{fam.name} shares a README row with different labels")
            rows[-1].append(fam)
        else:
            rows.append([fam])
    out = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    previous: tuple[str, ...] = ()
    for row in rows:
        types = [f.type for f in row]
        cells = [
            " / ".join(f"`{f.name}`" for f in row),
            types[0] if len(set(types)) == 1 else " / ".join(types),
            _label_cell(row[0].labels, previous),
            row[0].doc,
        ]
        previous = row[0].labels
        out.append("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    return out


def _label_cell(labels: tuple[str, ...], previous: tuple[str, ...]) -> str:
    if len(previous) > _SPELL_OUT:
        if labels == previous:
            return "the same"
        dropped = [name for name in previous if name not in labels]
        if len(dropped) == 1 and tuple(name for name in previous if name in labels) == labels:
            return f"the same without {dropped[0]}"
    return ", ".join(labels)
