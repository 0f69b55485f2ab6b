"""A ledger of Slurm jobs on this node: each job's energy, emissions and embodied share, one JSON line per job.

:class:`JobBooks` (pure) is fed every tick's snapshot. Every cgroup series carrying a ``slurm_job_id`` label
(:mod:`carbond.attribution`, ``attribution.slurm``) adds the growth of its counters since the previous tick to its
job and step (``slurm_step``): energy by kind, operational emissions (energy x PUE x the intensity in force), and
beside them what the marginal signal would have given (where the provider has one), the job's share of the
hardware's amortised embodied emissions (each GPU's by the job's share of the GPU energy, the server's by its share
of the rest of the node's energy), and the standard uncertainties, the node's relative band carried over (a
cgroup's share of the node has the node's relative uncertainty; over time the bands of the ticks add, as in
:mod:`carbond.uncertainty`).

A cgroup's counters start at zero when carbond starts attributing to it, so the first sight of a series counts its
whole value: the ledger is the sum of each series' growth from zero to its last value, across restarts too (the
counters start over after a restart; what was summed before it is kept in ``open.json`` beside the ledger). The
rule is honest about what it cannot see: a job that started before carbond first looked, or that ran while carbond
was down (the span between the last save of ``open.json`` and the first tick after the restart), is written
``"partial": true`` with the seconds missed.

:class:`SlurmLedger` (IO) ties the books to the spool the Prolog/Epilog scripts write (:mod:`carbond.slurm.spool`):
once the Epilog says a job ended and a tick that began after the end is in, the job's line is appended to
``<ledger.dir>/ledger.jsonl`` (fsynced, rotated at ``max_bytes`` into ``ledger.jsonl.1`` ... ``.<keep>``) in a
worker thread, and the spool forgets the job. The tick itself only adds numbers and lists the spool directory.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from carbond.logs import get_logger
from carbond.model import Snapshot
from carbond.slurm.ledgerfile import LedgerFile, load_open, save_open
from carbond.units import JOULES_PER_KWH

log = get_logger("carbond.slurm.ledger")

SCHEMA = "carbond.slurm.ledger/1"
#: The jobs in progress are saved this often (and at every job's end, and on the way out): what a crash can lose.
SAVE_EVERY_S = 60.0
META_FIELDS = ("user", "uid", "account", "partition", "name", "nodes", "start")
#: A job whose series have all been gone this long without an end from the Epilog is written anyway (no Epilog
#: installed, or its record lost), so open jobs never pile up.
ORPHAN_S = 3600.0


@dataclass(slots=True)
class Figures:
    """What one step (or a whole job) used: IT energy by kind (J), grams of CO2e, their standard uncertainties."""

    energy_by_kind_j: dict[str, float] = field(default_factory=dict)
    emissions_g: float = 0.0
    #: Emissions at the marginal signal over the ticks where one was known, and the energy x PUE (kWh) of those ticks.
    marginal_g: float = 0.0
    marginal_pue_kwh: float = 0.0
    embodied_g: float = 0.0
    energy_u_j: float = 0.0
    emissions_u_g: float = 0.0
    #: Energy x PUE in kWh: the effective intensity is ``emissions_g / pue_kwh``.
    pue_kwh: float = 0.0

    @property
    def energy_j(self) -> float:
        return math.fsum(self.energy_by_kind_j.values())

    def add(self, other: Figures) -> None:
        for kind, j in other.energy_by_kind_j.items():
            self.energy_by_kind_j[kind] = self.energy_by_kind_j.get(kind, 0.0) + j
        self.emissions_g += other.emissions_g
        self.marginal_g += other.marginal_g
        self.marginal_pue_kwh += other.marginal_pue_kwh
        self.embodied_g += other.embodied_g
        self.energy_u_j += other.energy_u_j
        self.emissions_u_g += other.emissions_u_g
        self.pue_kwh += other.pue_kwh


@dataclass(slots=True)
class Job:
    job_id: str
    steps: dict[str, Figures] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # slurm_user, slurm_account ... as the series carry them
    first_seen: float = math.nan  # wall-clock epoch seconds of its first series (a job idle at first has none)
    last_seen: float = math.nan
    watched_from: float = math.nan  # since when carbond was counting when the job was first seen (its run's start)
    ticks: int = 0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # spans carbond was not counting (restarts)
    counters: dict[str, tuple[dict[str, float], float]] = field(default_factory=dict)  # per cgroup, this run only

    def total(self) -> Figures:
        out = Figures()
        for f in self.steps.values():
            out.add(f)
        return out

    def to_state(self) -> dict[str, Any]:
        """What survives a restart: everything but this run's counters (which start over)."""
        state = asdict(self)
        del state["counters"]
        return state

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> Job:
        job = cls(str(data["job_id"]))
        job.steps = {str(k): Figures(**v) for k, v in data.get("steps", {}).items()}
        job.labels = {str(k): str(v) for k, v in data.get("labels", {}).items()}
        job.first_seen, job.last_seen = float(data["first_seen"]), float(data["last_seen"])
        job.watched_from = float(data.get("watched_from", job.first_seen))
        job.ticks = int(data.get("ticks", 0))
        job.gaps = [(float(a), float(b)) for a, b in data.get("gaps", [])]
        return job


@dataclass(slots=True)
class _Node:
    """The node's cumulative figures at the previous tick: the denominators of the job's shares."""

    energy_j: float
    gpu_j: float
    energy_u_j: float
    emissions_g: float
    emissions_u_g: float
    embodied_g: dict[str, float]


def _node(snap: Snapshot) -> _Node:
    n = snap.node
    gpu = math.fsum(d.energy_j_total for d in snap.devices.states if d.kind == "gpu" and d.in_node_total)
    embodied = dict(n.embodied_g_total)
    return _Node(n.energy_j_total, gpu, n.energy_u_j_total, n.emissions_g_total, n.emissions_u_g_total, embodied)


def _marginal(snap: Snapshot) -> float | None:
    """The marginal intensity (g/kWh) known this tick, whether in force or beside the average one."""
    value = snap.intensity.value
    if value is not None and value.signal == "marginal":
        return value.g_per_kwh
    for other, _age in snap.intensity.other:
        if other.signal == "marginal":
            return other.g_per_kwh
    return None


class JobBooks:
    """Per Slurm job and step, the sums of the cgroup counters' growth, tick by tick (pure: no IO)."""

    def __init__(self, jobs: Iterable[Job] = (), saved_at: float | None = None) -> None:
        self.jobs: dict[str, Job] = {j.job_id: j for j in jobs}
        self._saved_at = saved_at  # when the restored jobs were last saved: the start of the gap to the next tick
        self._prev: _Node | None = None
        self.first_tick: float | None = None  # wall time of the first tick this run

    def observe(self, snap: Snapshot) -> None:
        """Add one tick: every job-labelled series' growth since the previous tick."""
        if self.first_tick is None:
            self.first_tick = snap.wall_time - snap.interval_s
            if self._saved_at is not None:  # the restored jobs were not counted from the save to this tick
                for restored in self.jobs.values():
                    restored.gaps.append((self._saved_at, self.first_tick))
        node, prev = _node(snap), self._prev
        self._prev = node
        d_energy = node.energy_j - prev.energy_j if prev else node.energy_j
        d_gpu = node.gpu_j - prev.gpu_j if prev else node.gpu_j
        d_g = node.emissions_g - prev.emissions_g if prev else node.emissions_g
        rel_u_j = _ratio(node.energy_u_j - (prev.energy_u_j if prev else 0.0), d_energy)
        rel_u_g = _ratio(node.emissions_u_g - (prev.emissions_u_g if prev else 0.0), d_g)
        d_embodied = {d: g - (prev.embodied_g.get(d, g) if prev else g) for d, g in node.embodied_g.items()}
        marginal, pue = _marginal(snap), snap.node.pue
        for cg in snap.cgroups:
            labels = dict(cg.labels.extra)
            job_id = labels.get("slurm_job_id", "")
            if not job_id:
                continue
            job = self.jobs.get(job_id)
            if job is None:
                job = self.jobs[job_id] = Job(job_id, first_seen=snap.wall_time, watched_from=self.first_tick)
            if job.last_seen != snap.wall_time:
                job.ticks += 1
            job.last_seen = snap.wall_time
            job.labels.update((k, v) for k, v in labels.items() if k.startswith("slurm_") and v)
            kinds = {kind: j for kind, _power, j in cg.kinds}
            before_kinds, before_g = job.counters.get(cg.cgroup, ({}, 0.0))
            job.counters[cg.cgroup] = (kinds, cg.emissions_g_total)
            grown = {k: _growth(before_kinds.get(k, 0.0), j) for k, j in kinds.items()}
            joules = math.fsum(grown.values())
            f = Figures(grown, _growth(before_g, cg.emissions_g_total))
            f.pue_kwh = joules / JOULES_PER_KWH * pue
            if marginal is not None:
                f.marginal_g, f.marginal_pue_kwh = f.pue_kwh * marginal, f.pue_kwh
            gpu_j = grown.get("gpu", 0.0)
            share, gpu_share = _ratio(joules - gpu_j, d_energy - d_gpu), _ratio(gpu_j, d_gpu)
            f.embodied_g = math.fsum(g * (gpu_share if d.startswith("gpu") else share) for d, g in d_embodied.items())
            f.energy_u_j, f.emissions_u_g = joules * rel_u_j, f.emissions_g * rel_u_g
            job.steps.setdefault(labels.get("slurm_step", ""), Figures()).add(f)

    @property
    def watching_since(self) -> float:
        """Since when this run has been counting (NaN before its first tick)."""
        return self.first_tick if self.first_tick is not None else math.nan

    def close_job(self, job_id: str) -> Job | None:
        return self.jobs.pop(job_id, None)

    def absent_since(self, now: float, seconds: float) -> list[str]:
        """Jobs none of whose series have been seen for ``seconds``."""
        return [j.job_id for j in self.jobs.values() if now - j.last_seen > seconds]


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (an unknown figure) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def _growth(before: float, now: float) -> float:
    """A counter's growth; a counter that fell (it started over) grew by its whole new value."""
    return now - before if now >= before else now


def _figures_doc(f: Figures) -> dict[str, Any]:
    return {
        "energy_j": f.energy_j,
        "energy_kwh": f.energy_j / JOULES_PER_KWH,
        "energy_by_kind_j": dict(sorted(f.energy_by_kind_j.items())),
        "emissions_g": f.emissions_g,
        "emissions_marginal_g": f.marginal_g if f.marginal_pue_kwh else None,
        "marginal_share": f.marginal_pue_kwh / f.pue_kwh if f.pue_kwh > 0 else 0.0,
        "embodied_g": f.embodied_g,
        "energy_u_j": f.energy_u_j,
        "emissions_u_g": f.emissions_u_g,
        "pue_kwh": f.pue_kwh,
    }


def record(
    job: Job | None, job_id: str, host: str, meta: Mapping[str, Any], end: float | None, snap: Snapshot | None
) -> dict[str, Any]:
    """The ledger line of one job: what the spool says of it, its steps and totals, and whether it is whole."""
    if job is None:
        job = Job(job_id)
    start = meta.get("start")
    start = float(start) if isinstance(start, int | float) else None
    tolerance = 2.5 * snap.interval_s + 1.0 if snap is not None else 1.0
    missed = _missed(job, start, end)
    labels = job.labels
    total = job.total()
    intensity: dict[str, Any] = {}
    value = snap.intensity.value if snap is not None else None
    if value is not None:
        intensity = {
            "provider": value.provider,
            "zone": value.zone,
            "signal": value.signal,
            "factor_type": value.factor_type,
            "estimated": value.estimated,
        }
    intensity["g_per_kwh"] = total.emissions_g / total.pue_kwh if total.pue_kwh > 0 else None
    intensity["marginal_g_per_kwh"] = total.marginal_g / total.marginal_pue_kwh if total.marginal_pue_kwh > 0 else None
    intensity["pue"] = snap.node.pue if snap is not None else None
    return {
        "schema": SCHEMA,
        "job_id": job_id,
        "host": host,
        "user": str(meta.get("user") or labels.get("slurm_user", "")),
        "uid": meta.get("uid"),
        "account": str(meta.get("account") or labels.get("slurm_account", "")),
        "partition": str(meta.get("partition") or labels.get("slurm_partition", "")),
        "name": str(meta.get("name") or ""),
        "nodes": str(meta.get("nodes") or ""),
        "start": start,
        "end": end,
        "first_seen": job.first_seen if math.isfinite(job.first_seen) else None,
        "watched_from": job.watched_from if math.isfinite(job.watched_from) else None,
        "last_seen": job.last_seen if math.isfinite(job.last_seen) else None,
        "ticks": job.ticks,
        "partial": missed > tolerance,
        "missed_s": missed,
        **_figures_doc(total),
        "intensity": intensity,
        "steps": [{"step": s, **_figures_doc(f)} for s, f in sorted(job.steps.items())],
    }


def _missed(job: Job, start: float | None, end: float | None) -> float:
    """Seconds of the job carbond did not count: before it was watching (a job that started before carbond did; not
    a job idle at first, whose series appear with its first energy), and while it was down."""
    first = job.watched_from if math.isfinite(job.watched_from) else end
    lo = start if start is not None else first
    hi = end if end is not None else job.last_seen
    if lo is None or hi is None or not math.isfinite(hi):
        return 0.0
    spans = list(job.gaps)
    if start is not None and first is not None:
        spans.append((start, first))  # before carbond was watching
    return math.fsum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans)


class Spool(Protocol):
    """What the ledger needs of the spool the Prolog/Epilog write (:class:`carbond.slurm.spool.SlurmSpool`)."""

    def meta(self, job_id: str) -> object | None: ...
    def ended(self) -> list[tuple[str, float]]: ...
    def forget(self, job_id: str) -> None: ...


def meta_doc(meta: object | None) -> dict[str, Any]:
    """The Prolog's fields of a job, whatever type the spool gives them in."""
    if meta is None:
        return {}
    return {name: getattr(meta, name, None) for name in META_FIELDS}


class SlurmLedger:
    """The books, the spool and the files: :meth:`on_tick` runs on the tick path (sums and a directory listing);
    lines and saves go to one worker thread, in order."""

    def __init__(self, spool: Spool, directory: Path, *, host: str, max_bytes: int, keep: int) -> None:
        self._spool = spool
        self._host = host
        self.directory = directory
        self._file = LedgerFile(directory, max_bytes, keep)
        saved = load_open(directory, host)
        jobs = [Job.from_state(j) for j in saved["jobs"]] if saved else []
        self.books = JobBooks(jobs, float(saved["saved_at"]) if saved else None)
        self._ending: dict[str, float] = {str(k): float(v) for k, v in (saved or {}).get("ending", {}).items()}
        self._pending: list[tuple[str, str]] = []  # (job id, line) not yet written: retried at the next write
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="carbond-slurm-ledger")
        self._lock = threading.Lock()  # guards _pending: the worker puts back what it could not write
        self._last_save = -math.inf
        self._last_tick = saved["saved_at"] if saved else 0.0  # wall time of the last tick seen
        self._failing = False
        self._spool_failing = False
        self.errors_total = 0
        self.written_total = 0

    def on_tick(self, snap: Snapshot) -> None:
        self.books.observe(snap)
        self._last_tick = snap.wall_time
        try:
            ended = self._spool.ended()
        except OSError as exc:
            if not self._spool_failing:
                log.warning("slurm_spool_unreadable", error=str(exc))
            self._spool_failing = True
            ended = []
        else:
            if self._spool_failing:
                log.info("slurm_spool_readable")
            self._spool_failing = False
        for job_id, end in ended:
            self._ending.setdefault(job_id, end)
        begun = snap.wall_time - snap.interval_s  # this tick's interval began here
        due = [j for j, end in self._ending.items() if begun >= end + 1.0]  # the Epilog's seconds are truncated
        due += [j for j in self.books.absent_since(snap.wall_time, ORPHAN_S) if j not in self._ending]
        for job_id in due:
            ended_at = self._ending.pop(job_id, None)
            try:
                meta = meta_doc(self._spool.meta(job_id))
            except (OSError, ValueError) as exc:
                log.warning("slurm_job_meta_unreadable", job_id=job_id, error=str(exc))
                meta = {}
            job = self.books.close_job(job_id) or Job(job_id, watched_from=self.books.watching_since)
            doc = record(job, job_id, self._host, meta, ended_at, snap)
            line = json.dumps(_finite(doc), allow_nan=False, separators=(",", ":"))
            with self._lock:
                self._pending.append((job_id, line))
        if due or snap.wall_time - self._last_save >= SAVE_EVERY_S:
            self._last_save = snap.wall_time
            self._submit(snap.wall_time)

    def _submit(self, now: float) -> Future[None]:
        state = self._open_state(now)
        with self._lock:
            lines, self._pending = self._pending, []
        return self._executor.submit(self._write, lines, state)

    def _open_state(self, now: float) -> dict[str, Any]:
        return {
            "host": self._host,
            "saved_at": now,
            "jobs": [j.to_state() for j in self.books.jobs.values()],
            "ending": dict(self._ending),
        }

    def _write(self, lines: list[tuple[str, str]], state: dict[str, Any]) -> None:
        """In the worker thread: the lines (durable) first, then the spool forgets their jobs, then the open jobs."""
        try:
            self._file.append([line for _, line in lines])
            for job_id, _ in lines:
                self._spool.forget(job_id)
            save_open(self.directory, state)
        except OSError as exc:
            self.errors_total += 1
            with self._lock:
                self._pending[:0] = lines
            if not self._failing:
                log.error("slurm_ledger_write_failed", directory=str(self.directory), error=str(exc))
            self._failing = True
            return
        self.written_total += len(lines)
        if lines:
            log.info("slurm_jobs_written", jobs=[j for j, _ in lines], path=str(self._file.path))
        if self._failing:
            log.info("slurm_ledger_write_recovered")
        self._failing = False

    def flush(self) -> None:
        """Write what is pending and save the jobs in progress; blocks until done (tests, and close)."""
        self._submit(self._last_tick).result()

    def close(self) -> None:
        """Save the jobs in progress for the next run, and stop the worker."""
        self.flush()
        self._executor.shutdown(wait=True)
