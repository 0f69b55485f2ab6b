"""The cgroup families rendered for a scrape: the same bytes prometheus_client writes, without its per-sample work.

At 1,000 cgroups a snapshot holds about 5,000 cgroup samples with nine labels each. prometheus_client builds a
``Sample`` and a label dict per sample, and sorts and escapes the nine labels again for every sample, on every
render; the render is paid by the first scrape after each tick, while every other scrape waits on the event loop.
Here a cgroup's labels are escaped and joined once, when it first appears, and kept while it is published; a tick
only formats the values (with prometheus_client's own ``floatToGoString``). bench/optimisations.md has the figures.

The family headers (``# HELP``/``# TYPE``) are rendered by prometheus_client itself from the family definitions in
:mod:`carbond.exporter.collector`, and the sample lines of these families are the same in both formats. Tests
compare the whole body with prometheus_client's rendering of :func:`carbond.exporter.collector.cgroup_families`,
byte for byte, in both formats, with labels that need escaping and values that need Go's float spelling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import exposition as text_format
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from carbond.exporter.collector import empty_cgroup_families
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


class _Labels:
    """One cgroup's labels, escaped and joined in name order (cgroup, container_id, container_name, host, kind,
    the copied label_* ones, pod_name, pod_namespace, pod_uid, project, team, unit), with and without each kind met
    so far."""

    __slots__ = ("after", "before", "by_kind", "no_kind")

    def __init__(self, host: str, cgroup: str, labels: CgroupLabels) -> None:
        self.before = (
            f'{{cgroup="{escape(cgroup)}",container_id="{escape(labels.container_id)}",'
            f'container_name="{escape(labels.container_name)}",host="{escape(host)}",'
        )
        copied = "".join(f'{name}="{escape(v)}",' for name, v in labels.extra)  # label_* sort before pod_*
        self.after = (
            f'{copied}pod_name="{escape(labels.pod_name)}",pod_namespace="{escape(labels.pod_namespace)}",'
            f'pod_uid="{escape(labels.pod_uid)}",project="{escape(labels.project)}",team="{escape(labels.team)}",'
            f'unit="{escape(labels.unit)}"}} '
        )
        self.no_kind = self.before + self.after
        self.by_kind: dict[str, str] = {}

    def kind(self, kind: str) -> str:
        labels = self.by_kind[kind] = f'{self.before}kind="{escape(kind)}",{self.after}'
        return labels


class _One(Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family


def _headers(openmetrics: bool) -> tuple[str, str, str]:
    """``# HELP``/``# TYPE`` of the power, energy and emissions families, as prometheus_client writes them."""
    out = []
    for family in empty_cgroup_families():
        body = (render_om if openmetrics else render_text)(_One(family))
        out.append(body.decode().removesuffix("# EOF\n"))
    return out[0], out[1], out[2]


HEADERS = {False: _headers(False), True: _headers(True)}


class CgroupLines:
    """Renders a snapshot's cgroup families; keeps each published cgroup's escaped labels between renders."""

    def __init__(self) -> None:
        self._labels: dict[tuple[str, str, CgroupLabels], _Labels] = {}
        self._last: tuple[Snapshot, tuple[str, str, str]] | None = None  # both formats share one snapshot's lines

    def render(self, snap: Snapshot, openmetrics: bool) -> str:
        """The three families, headers and samples, in the text format or OpenMetrics (without ``# EOF``)."""
        power, energy, em = self.samples(snap)
        h_power, h_energy, h_em = HEADERS[openmetrics]
        return "".join((h_power, power, h_energy, energy, h_em, em))

    def samples(self, snap: Snapshot) -> tuple[str, str, str]:
        """The sample lines of the three families (identical in both formats), made once per snapshot."""
        if self._last is not None and self._last[0] is snap:
            return self._last[1]
        host = snap.host
        old = self._labels
        kept: dict[tuple[str, str, CgroupLabels], _Labels] = {}
        power: list[str] = []
        energy: list[str] = []
        em: list[str] = []
        for cg in snap.cgroups:
            key = (host, cg.cgroup, cg.labels)  # everything but the values
            labels = old.get(key)
            if labels is None:
                labels = _Labels(host, cg.cgroup, cg.labels)
            kept[key] = labels
            by_kind = labels.by_kind
            for kind, watts, joules in cg.kinds:
                mid = by_kind.get(kind) or labels.kind(kind)
                if watts is not None:
                    power.append(f"carbond_cgroup_power_watts{mid}{value(watts)}\n")
                energy.append(f"carbond_cgroup_energy_joules_total{mid}{value(joules)}\n")
            em.append(f"carbond_cgroup_emissions_grams_total{labels.no_kind}{value(cg.emissions_g_total)}\n")
        self._labels = kept
        lines = "".join(power), "".join(energy), "".join(em)
        self._last = snap, lines
        return lines
