"""``carbond measure --daemon URL``: a job's figures from a running daemon's counters, prorated to the job's span.

A daemon publishes its cumulative counters once per tick (``measure_power_secs``, 15 s by default), so two reads
at a job's start and end give 0 J or a whole tick for a job shorter than one. Instead, a background thread polls
``/metrics`` (every ``poll_s``, 0.1 s: the daemon serves cached bytes) and notes when each tick lands (the middle
of the last poll before the counters moved and the first after). Between two ticks the daemon's power was the
tick's delta over its length; the job gets each tick interval's delta times the part of that interval it
overlaps. At stop it waits for the first tick after the job's end (up to ``max_wait_s``), so the last partial
interval is prorated rather than guessed; the first interval's length, whose start was never seen, is the
median tick length. A job shorter than one tick therefore waits for at most two ticks after its end. If no tick
comes in time, the missing part is estimated at the mean power of the daemon's intervals, with a note. A daemon
restarted during the job (its counters go back: reset, or restored from an older state file) leaves the interval
across the restart unknown: it is estimated the same way, with a note, never counted negative or twice. Figures are
the whole machine's: a daemon does not know the job's processes.
"""

from __future__ import annotations

import base64
import itertools
import math
import re
import statistics
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from typing import Any

from carbond.job.cgroup import JobProbe
from carbond.job.ledger import Checkpoint, DeviceFigures
from carbond.job.sampler import MeasureFailed
from carbond.model import Intensity

# The daemon's series this module reads. tests/exporter/test_metric_names.py holds them to the declarations
# (importing those here would load prometheus_client into every program that uses carbond.track).
_DEVICE_ENERGY = "carbond_device_energy_joules_total"
_DEVICE_EMISSIONS = "carbond_device_emissions_grams_total"
_NODE_ENERGY = "carbond_node_energy_joules_total"
_NODE_EMISSIONS = "carbond_emissions_grams_total"
_EMBODIED = "carbond_embodied_emissions_grams_total"
_PUE = "carbond_pue"
_INTENSITY = "carbond_grid_intensity_grams_per_kwh"
_INTENSITY_AGE = "carbond_grid_intensity_age_seconds"
_TICK_COUNT = "carbond_tick_duration_seconds_count"  # a histogram's count of observations

_TICKS = re.compile(rb"^" + re.escape(_TICK_COUNT.encode()) + rb"(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


def metrics_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/metrics") else url + "/metrics"


def without_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its ``user:password@`` (what reports and errors may show) and the Basic authorization
    header it gives (the daemon's ``web.config_file`` basic auth), if any."""
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parts.username is None:
        return url, None
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def parse_scrape(text: str, monotonic: float, wall: float) -> Checkpoint:
    """A checkpoint of a daemon's cumulative counters (whole machine: job figures = machine figures)."""
    from prometheus_client.parser import text_string_to_metric_families

    energy: dict[tuple[str, str], tuple[str, float]] = {}
    emissions: dict[tuple[str, str], float] = {}
    node_j = node_g = embodied_g = 0.0
    pue, intensity, age = 1.0, None, math.nan
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            lb: dict[str, Any] = dict(s.labels)
            if s.name == _DEVICE_ENERGY:
                energy[(lb.get("sensor", ""), lb.get("device", ""))] = (lb.get("kind", ""), s.value)
            elif s.name == _DEVICE_EMISSIONS:
                emissions[(lb.get("device", ""), lb.get("kind", ""))] = s.value
            elif s.name == _NODE_ENERGY:
                node_j = s.value
            elif s.name == _NODE_EMISSIONS:
                node_g = s.value
            elif s.name == _EMBODIED:
                embodied_g += s.value
            elif s.name == _PUE:
                pue = s.value
            elif s.name == _INTENSITY and lb.get("signal", "average") == "average":
                direct = lb.get("factor_type") == "direct"
                intensity = Intensity(
                    s.value,
                    lb.get("provider", ""),
                    lb.get("zone", ""),
                    0.0,
                    factor_type="direct" if direct else "lifecycle",
                )
            elif s.name == _INTENSITY_AGE:
                age = s.value
    if not energy and not node_j:
        raise MeasureFailed("no carbond metrics in the daemon's answer")
    has_psys = any(kind == "psys" for kind, _ in energy.values())
    devices = []
    for (sensor, device), (kind, joules) in sorted(energy.items()):
        grams = emissions.get((device, kind), 0.0)
        # the daemon does not export which domains are inside another: a best guess, for the per-kind columns only
        inner = kind in ("core", "uncore", "platform") or "-die-" in device or (has_psys and kind in ("cpu", "dram"))
        devices.append(DeviceFigures(sensor, device, kind, True, not inner, joules, grams, joules, grams))
    node = (node_j, node_g, node_j, node_g)
    return Checkpoint(monotonic, wall, tuple(devices), intensity, age, pue, node, embodied_g=embodied_g)


def _went_back(delta: Checkpoint) -> bool:
    """True when a counter decreased over a span: the daemon restarted (its counters reset or restored from an older
    state file), so the span's delta is unknown (neither the new value nor a negative difference is the energy)."""
    node = delta.node_totals()
    return min(node[0], node[2], *(d.machine_energy_j for d in delta.devices), 0.0) < 0.0


def _count(mark: bytes) -> float:
    """The daemon's tick count from its scrape's mark (NaN, never smaller, when it is not a count)."""
    try:
        return float(mark)
    except ValueError:
        return math.nan


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class DaemonSampler:
    source = "daemon"
    attribution_error = ""

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        *,
        poll_s: float = 0.1,
        max_wait_s: float = 65.0,
        gpus: frozenset[str] | None = None,
    ) -> None:
        bare, self._authorization = without_credentials(url)
        self.url = metrics_url(bare)
        self._timeout, self._poll, self._max_wait = timeout_s, poll_s, max_wait_s
        self._gpus = gpus
        self.sensors: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._ticked = threading.Condition(self._lock)
        self._first: Checkpoint | None = None  # the counters at start: the tick before, whose time is unknown
        self._ticks: list[tuple[float, Checkpoint]] = []  # (estimated tick time, cumulative counters)
        self._restarted: set[int] = set()  # indexes of the ticks seen first after a restart (their count went back)
        self._since = time.monotonic()  # the job's start
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""

    def _scrape(self) -> tuple[Checkpoint, bytes]:
        try:
            headers = {"Authorization": self._authorization} if self._authorization else {}
            request = urllib.request.Request(self.url, headers=headers)
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:
                body: bytes = resp.read()
        except OSError as exc:
            raise MeasureFailed(f"daemon {self.url} unreachable: {exc}") from None
        cp = parse_scrape(body.decode("utf-8", "replace"), time.monotonic(), time.time())
        if self._gpus is not None:  # only the chosen GPUs: node totals from the devices counted
            kept = tuple(d for d in cp.devices if d.kind != "gpu" or d.device in self._gpus)
            cp = replace(cp, devices=kept, node=None)
        found = _TICKS.search(body)
        return cp, found.group(1) if found else str(cp.node_totals()).encode()

    # -- the polling thread --------------------------------------------------------------------------------------
    def _watch(self, mark: bytes) -> None:
        before = time.monotonic()
        while not self._stopping.wait(self._poll):
            try:
                cp, now_mark = self._scrape()
            except Exception as exc:  # noqa: BLE001 - counted as a note; the next poll may work
                self._error = f"{type(exc).__name__}: {exc}"
                before = time.monotonic()  # a daemon that did not answer had not published the next tick yet
                continue
            after = cp.monotonic
            if now_mark != mark:
                went_back = _count(now_mark) < _count(mark)
                mark = now_mark
                with self._ticked:
                    if went_back:
                        self._restarted.add(len(self._ticks))
                    self._ticks.append(((before + after) / 2, cp))
                    self._ticked.notify_all()
            before = after

    def start(self, probe: JobProbe | None = None, whole_machine: bool = False) -> None:
        self._first, mark = self._scrape()
        self.sensors = sorted({d.sensor for d in self._first.devices})
        self._since = time.monotonic()
        self._thread = threading.Thread(target=self._watch, args=(mark,), name="carbond-daemon-poll", daemon=True)
        self._thread.start()

    # -- figures --------------------------------------------------------------------------------------------------
    def _tick_length(self, ticks: list[tuple[float, Checkpoint]]) -> float | None:
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(ticks)]
        return statistics.median(gaps) if gaps else None

    def _prorated(self, start: float, end: float, extrapolate: bool) -> Checkpoint:
        with self._lock:
            ticks, restarted = list(self._ticks), set(self._restarted)
        assert self._first is not None
        out = Checkpoint(end, time.time() - (time.monotonic() - end))
        length = self._tick_length(ticks)
        prev_t = ticks[0][0] - length if ticks and length is not None else None
        prev_cp = self._first
        known: list[tuple[float, Checkpoint]] = []  # (interval length, delta) of the intervals whose delta is known
        gaps = 0.0  # seconds of the job inside intervals the daemon's counters went back in (a restart)
        for n, (t, cp) in enumerate(ticks):
            delta = cp.since(prev_cp)
            if prev_t is not None and t > prev_t:
                part = _overlap(start, end, prev_t, t)
                if n in restarted or _went_back(delta):
                    gaps += part
                else:
                    known.append((t - prev_t, delta))
                    out = out.plus(delta.scaled(part / (t - prev_t)))
            prev_t, prev_cp = t, cp
        tail = end - (ticks[-1][0] if ticks else end)
        if extrapolate and ticks and tail > 0 and length:
            gaps += min(tail, length)
        if gaps > 0 and known:  # the missing part at the mean power of the intervals that are known
            seconds = math.fsum(s for s, _ in known)
            mean = known[0][1]
            for _, d in known[1:]:
                mean = mean.plus(d)
            out = out.plus(replace(mean.scaled(gaps / seconds), intensity=prev_cp.intensity, pue=prev_cp.pue))
        return replace(out, monotonic=end, intensity=prev_cp.intensity, pue=prev_cp.pue)

    def _restarts(self) -> int:
        """How many times the daemon restarted during the job (its tick count or its counters went back)."""
        with self._lock:
            assert self._first is not None
            cps = [self._first, *(cp for _, cp in self._ticks)]
            restarted = set(self._restarted)
        pairs = enumerate(itertools.pairwise(cps))
        return sum(1 for n, (a, b) in pairs if n in restarted or _went_back(b.since(a)))

    @property
    def last(self) -> Checkpoint:
        """The job's figures so far (the part after the last tick extrapolated from its power)."""
        return self._prorated(self._since, time.monotonic(), extrapolate=True)

    def attach(self, probe: JobProbe | None, whole_machine: bool = False, fresh: bool = True) -> Checkpoint:
        """The job starts now (a daemon gives whole-machine figures only)."""
        self._since = time.monotonic()
        return Checkpoint(self._since, time.time())

    def mark(self) -> Checkpoint:
        return self.last

    def stop(self) -> Checkpoint:
        end = time.monotonic()
        deadline = end + self._max_wait
        with self._ticked:
            while time.monotonic() < deadline:
                length = self._tick_length(self._ticks)
                if self._ticks and self._ticks[-1][0] >= end and length is not None:
                    break
                if length is not None:
                    deadline = min(deadline, end + 2.5 * length)
                self._ticked.wait(max(deadline - time.monotonic(), 0.0))
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self._timeout + 1.0)
        complete = bool(self._ticks) and self._ticks[-1][0] >= end and self._tick_length(self._ticks) is not None
        restarts = self._restarts()
        if restarts:
            self.notes.append(
                f"the daemon restarted during the job ({restarts} time(s): its counters went back): the interval(s) "
                "across the restart are estimated at the mean power of the daemon's other intervals"
            )
        if complete:
            self.notes.append(f"prorated over the daemon's ticks (median tick {self._tick_length(self._ticks):.3g} s)")
        else:
            self.notes.append(
                "the daemon did not tick after the job's end in time: the last part is extrapolated from the "
                "mean power of the daemon's intervals" + (f" (polling error: {self._error})" if self._error else "")
            )
        return self._prorated(self._since, end, extrapolate=not complete)
