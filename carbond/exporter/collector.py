"""Snapshot -> Prometheus metric families through prometheus_client, from the declarations in
:mod:`carbond.exporter.families`.

The collector lives in a private registry and only reads the snapshot it is given; rendering happens once per
snapshot (see :mod:`carbond.exporter.server`), never per scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from carbond.exporter.families import CGROUP, HEAD, TAIL
from carbond.exporter.family import collect_all
from carbond.model import Snapshot

#: The labels of the cgroup families (``host`` first), without the copied ``label_*`` ones.
CGROUP_LABELS = ["host", *CGROUP[0].labels]


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric family of one snapshot, through prometheus_client (the reference rendering; the scrape path
    renders the cgroup families' samples itself: :mod:`carbond.exporter.cgroup_lines`)."""
    yield from head_families(snap)
    yield from cgroup_families(snap)
    yield from tail_families(snap)


def head_families(snap: Snapshot) -> Iterator[Metric]:
    """The families before the HTTP server's and the cgroup ones: devices, node, intensity, embodied, uncertainty,
    sensors."""
    return collect_all(HEAD, snap)


def cgroup_families(snap: Snapshot) -> Iterator[Metric]:
    return collect_all(CGROUP, snap)


def tail_families(snap: Snapshot) -> Iterator[Metric]:
    """The families after the cgroup ones: pod-name errors, tick duration, persistence errors, build info."""
    return collect_all(TAIL, snap)


class SnapshotCollector(Collector):
    """Yields the families of whatever snapshot ``latest()`` returns (nothing before the first tick), all through
    prometheus_client: the reference the scrape path (:class:`carbond.exporter.server.MetricsCache`) is tested and
    benchmarked against, and a collector for anyone embedding carbond's families in a registry of their own."""

    def __init__(self, latest: Callable[[], Snapshot | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        if snap is None:
            return
        yield from families(snap)
