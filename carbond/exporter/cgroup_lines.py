"""The cgroup families rendered for a scrape: the same bytes prometheus_client writes, without its per-sample work.

At 1,000 cgroups a snapshot holds about 5,000 cgroup samples with a dozen labels each. prometheus_client builds a
``Sample`` and a label dict per sample, and sorts and escapes the labels again for every sample, on every render;
the render is paid by the first scrape after each tick, while every other scrape waits on the event loop. Here a
cgroup's labels are escaped, sorted and joined once, when it first appears, and kept while it is published; a tick
only formats the values (with prometheus_client's own ``floatToGoString``). bench/optimisations.md has the figures.

What is rendered comes from the declarations of :data:`carbond.exporter.families.CGROUP`: the sample names, the
``# HELP``/``# TYPE`` headers (rendered by prometheus_client itself from an empty family), the label names (sorted
as the exposition formats sort them, so copied labels such as ``label_*`` land wherever their names fall) and where
each value is (:class:`carbond.exporter.family.FromCgroups`). The sample lines are the same in both formats. Tests
compare the whole body with prometheus_client's rendering of the same declarations, byte for byte, in both
formats, with labels that need escaping and values that need Go's float spelling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import attrgetter

from prometheus_client import exposition as text_format
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from carbond.exporter.families import CGROUP
from carbond.exporter.family import Family, FromCgroups, to_metric
from carbond.model import CgroupLabels, Snapshot

# prometheus_client's functions are untyped: typed once here
go_float: Callable[[float], str] = floatToGoString
render_text: Callable[[Collector], bytes] = text_format.generate_latest
render_om: Callable[[Collector], bytes] = om_format.generate_latest


def escape(value: str) -> str:
    """A label value as the exposition formats write it: backslash, line feed and double quote escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def value(v: float) -> str:
    """``floatToGoString(v)``: plain ``repr`` where that is what it returns (most values), else the function."""
    s = repr(float(v))  # an int among the values is written as prometheus_client writes it: 3 -> 3.0
    if s[-1] in "fn" or s.find(".") > 6:  # inf, nan; a large number, which Go writes with an exponent
        return go_float(v)
    return s


def _plan(families: tuple[Family, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, FromCgroups], ...]]:
    """The :class:`CgroupLabels` fields the families label with (the same for all: they share each cgroup's
    escaped labels), and each family's sample name and source."""
    fields: tuple[str, ...] | None = None
    plan = []
    for fam in families:
        if not isinstance(fam.source, FromCgroups):
            raise TypeError(f"{fam.name}: a cgroup family's values come from the cgroups")
        own = tuple(name for name in fam.labels if name not in ("cgroup", "kind"))
        if fields is not None and sorted(own) != sorted(fields):
            raise ValueError(f"{fam.name}: the cgroup families label with the same fields (kind aside)")
        fields = own
        plan.append((fam.name, fam.source))
    return fields or (), tuple(plan)


FIELDS, PLAN = _plan(CGROUP)
#: The values of :data:`FIELDS` of a cgroup's labels, as a tuple (attrgetter of one name returns the value alone).
_fields: Callable[[CgroupLabels], tuple[str, ...]] = (
    attrgetter(*FIELDS) if len(FIELDS) > 1 else lambda labels: tuple(getattr(labels, name) for name in FIELDS)
)


class _Layout:
    """Where each label goes for one set of copied label names: ``str.format`` templates of the labels sorted by
    name before and after kind, taking the escaped values in the order host, cgroup, :data:`FIELDS`, the
    copied ones."""

    __slots__ = ("after", "before")

    def __init__(self, copied: tuple[str, ...]) -> None:
        names = ["host", "cgroup", *FIELDS, *copied]
        parts = sorted((name, f'{name}="{{{i}}}"') for i, name in enumerate(names))
        self.before = "{{" + "".join(part + "," for name, part in parts if name < "kind")
        self.after = "".join("," + part for name, part in parts if name > "kind") + "}} "


class _Labels:
    """One cgroup's labels, escaped and joined: without a kind, and with each kind met so far."""

    __slots__ = ("after", "before", "by_kind", "no_kind")

    def __init__(self, layout: _Layout, host: str, cgroup: str, labels: CgroupLabels) -> None:
        values = [escape(host), escape(cgroup), *map(escape, _fields(labels)), *(escape(v) for _, v in labels.extra)]
        # before: "{" and each label sorting before kind followed by a comma; after: each one sorting after kind
        # preceded by a comma, and "} "
        self.before = before = layout.before.format(*values)
        self.after = after = layout.after.format(*values)
        self.no_kind = before[:-1] + after if len(before) > 1 else before + after[1:]
        self.by_kind: dict[str, str] = {}

    def kind(self, kind: str) -> str:
        labels = self.by_kind[kind] = f'{self.before}kind="{escape(kind)}"{self.after}'
        return labels


class _One(Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family


def _headers(openmetrics: bool) -> tuple[str, ...]:
    """``# HELP``/``# TYPE`` of each cgroup family, as prometheus_client writes them."""
    out = []
    for fam in CGROUP:
        body = (render_om if openmetrics else render_text)(_One(to_metric(fam, "", ())))
        out.append(body.decode().removesuffix("# EOF\n"))
    return tuple(out)


HEADERS = {False: _headers(False), True: _headers(True)}


class CgroupLines:
    """Renders a snapshot's cgroup families; keeps each published cgroup's escaped labels between renders."""

    def __init__(self) -> None:
        self._labels: dict[tuple[str, str, CgroupLabels], _Labels] = {}
        self._layouts: dict[tuple[str, ...], _Layout] = {}  # by the copied label names
        self._last: tuple[Snapshot, tuple[str, ...]] | None = None  # both formats share one snapshot's lines

    def render(self, snap: Snapshot, openmetrics: bool) -> str:
        """The cgroup families, headers and samples, in the text format or OpenMetrics (without ``# EOF``)."""
        samples = self.samples(snap)
        return "".join(header + lines for header, lines in zip(HEADERS[openmetrics], samples, strict=True))

    def samples(self, snap: Snapshot) -> tuple[str, ...]:
        """The sample lines of each cgroup family (identical in both formats), made once per snapshot."""
        if self._last is not None and self._last[0] is snap:
            return self._last[1]
        host = snap.host
        old = self._labels
        kept: dict[tuple[str, str, CgroupLabels], _Labels] = {}
        cgroups = snap.cgroups
        found: list[_Labels] = []
        for cg in cgroups:
            key = (host, cg.cgroup, cg.labels)  # everything but the values
            labels = old.get(key)
            if labels is None:
                copied = tuple(name for name, _ in cg.labels.extra)
                layout = self._layouts.get(copied) or self._layouts.setdefault(copied, _Layout(copied))
                labels = _Labels(layout, host, cg.cgroup, cg.labels)
            kept[key] = labels
            found.append(labels)
        self._labels = kept
        out: list[str] = []
        for name, source in PLAN:
            lines: list[str] = []
            if not source.per_kind:
                field = source.field
                for cg, labels in zip(cgroups, found, strict=True):
                    lines.append(f"{name}{labels.no_kind}{value(getattr(cg, field))}\n")
            else:
                power = source.field == "power_w"
                for cg, labels in zip(cgroups, found, strict=True):
                    by_kind = labels.by_kind
                    for kind, watts, joules in cg.kinds:
                        v = watts if power else joules
                        if v is not None:
                            lines.append(f"{name}{by_kind.get(kind) or labels.kind(kind)}{value(v)}\n")
            out.append("".join(lines))
        result = tuple(out)
        self._last = snap, result
        return result
