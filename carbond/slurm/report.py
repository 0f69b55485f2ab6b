"""``carbond slurm report JOBID``: a Slurm job's energy and carbon, summed over every node it ran on.

Two sources:

- the node ledgers (:mod:`carbond.slurm.ledger`): ``--ledger-dir DIR`` (repeatable) or ``--nodes-dir SHARED``, a
  shared directory holding one ledger directory per node (``attribution.slurm.ledger.dir:
  /shared/carbond/{host}``) or the ledgers themselves; without either, this node's ledger from the config. Every
  line of the job counts (a job requeued, or written in two parts, has several); embodied emissions, the marginal
  signal and the uncertainties come with them;
- Prometheus (``--prometheus URL``): the raw samples of ``carbond_cgroup_energy_joules_total`` and
  ``carbond_cgroup_emissions_grams_total`` with ``slurm_job_id`` over ``--window`` (default 7d). Each series counts
  from zero (a job's series is born with the job, and starts over when carbond restarts), as the ledger does:
  both agree with /metrics. Energy, emissions and where they went; no embodied share or uncertainty.

The summary gives J and kWh, g CO2e with the effective intensity, everyday equivalents (the constants of the job
reports and the dashboards, :mod:`carbond.job.report`), and the energy by kind, node and step.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carbond.exporter.families import BY_NAME
from carbond.job.report import CAR_G_PER_KM, EQUIVALENT_SOURCES, HOUSEHOLD_G_PER_DAY, TV_G_PER_HOUR
from carbond.job.text import duration, energy, mass
from carbond.slurm.ledgerfile import ledger_files
from carbond.units import JOULES_PER_KWH

SCHEMA = "carbond.slurm.report/1"
# The series read from Prometheus, taken from their declarations: a renamed family fails here, at import.
ENERGY_METRIC = BY_NAME["carbond_cgroup_energy_joules_total"].name
EMISSIONS_METRIC = BY_NAME["carbond_cgroup_emissions_grams_total"].name
_OPTIONAL = ("marginal_g", "embodied_g", "energy_u_j", "emissions_u_g")


class NoSuchJob(LookupError):
    """No ledger line or series of the job was found."""


class SourceError(RuntimeError):
    """The source could not be read (Prometheus down, an error answer)."""


@dataclass(slots=True)
class Part:
    """What one node (or one step) used: energy by kind, emissions, and what only the ledger knows (None else)."""

    energy_by_kind_j: dict[str, float] = field(default_factory=dict)
    emissions_g: float = 0.0
    marginal_g: float | None = None
    embodied_g: float | None = None
    energy_u_j: float | None = None
    emissions_u_g: float | None = None

    @property
    def energy_j(self) -> float:
        return math.fsum(self.energy_by_kind_j.values())

    def add(self, other: Part) -> None:
        for kind, j in other.energy_by_kind_j.items():
            self.energy_by_kind_j[kind] = self.energy_by_kind_j.get(kind, 0.0) + j
        self.emissions_g += other.emissions_g
        for name in _OPTIONAL:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs + (mine or 0.0))

    def doc(self) -> dict[str, Any]:
        return {
            "energy_j": self.energy_j,
            "energy_kwh": self.energy_j / JOULES_PER_KWH,
            "energy_by_kind_j": dict(sorted(self.energy_by_kind_j.items())),
            "emissions_g": self.emissions_g,
            **{name: getattr(self, name) for name in _OPTIONAL},
        }


@dataclass(slots=True)
class JobReport:
    job_id: str
    source: str
    user: str = ""
    account: str = ""
    partition: str = ""
    name: str = ""
    start: float | None = None
    end: float | None = None
    partial: bool = False
    total: Part = field(default_factory=Part)
    by_node: dict[str, Part] = field(default_factory=dict)
    by_step: dict[str, Part] = field(default_factory=dict)

    def add(self, host: str, step: str, part: Part) -> None:
        for whole, key in ((self.by_node, host), (self.by_step, step)):
            whole.setdefault(key, Part()).add(part)
        self.total.add(part)

    def span(self, start: float | None, end: float | None) -> None:
        if start is not None:
            self.start = start if self.start is None else min(self.start, start)
        if end is not None:
            self.end = end if self.end is None else max(self.end, end)

    @property
    def g_per_kwh(self) -> float | None:
        """Emissions per kWh of IT energy (the intensity times the PUE in force, averaged over the job)."""
        kwh = self.total.energy_j / JOULES_PER_KWH
        return self.total.emissions_g / kwh if kwh > 0 else None

    def equivalents(self) -> dict[str, float]:
        g = self.total.emissions_g
        return {"car_km": g / CAR_G_PER_KM, "tv_hours": g / TV_G_PER_HOUR, "household_days": g / HOUSEHOLD_G_PER_DAY}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "job_id": self.job_id,
            "source": self.source,
            "user": self.user,
            "account": self.account,
            "partition": self.partition,
            "name": self.name,
            "start": self.start,
            "end": self.end,
            "partial": self.partial,
            **self.total.doc(),
            "g_per_kwh_it": self.g_per_kwh,
            "equivalents": {**self.equivalents(), "sources": EQUIVALENT_SOURCES},
            "nodes": {h: p.doc() for h, p in sorted(self.by_node.items())},
            "steps": {s: p.doc() for s, p in sorted(self.by_step.items())},
        }


def _part(doc: Mapping[str, Any]) -> Part:
    kinds = {str(k): float(v) for k, v in dict(doc.get("energy_by_kind_j") or {}).items()}
    optional = {
        "marginal_g": doc.get("emissions_marginal_g"),
        "embodied_g": doc.get("embodied_g"),
        "energy_u_j": doc.get("energy_u_j"),
        "emissions_u_g": doc.get("emissions_u_g"),
    }
    part = Part(kinds, float(doc.get("emissions_g") or 0.0))
    for name, value in optional.items():
        setattr(part, name, float(value) if isinstance(value, int | float) else None)
    return part


def ledger_dirs(shared: Path) -> list[Path]:
    """A shared directory's ledgers: its own, and one level of per-node directories."""
    return [shared, *sorted(p for p in shared.iterdir() if p.is_dir())]


def job_lines(job_id: str, dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Every ledger line of ``job_id`` in ``dirs`` (their rotated files too); unreadable lines are skipped."""
    out = []
    needle = f'"job_id":"{job_id}"'
    for directory in dirs:
        for path in ledger_files(directory):
            with path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if needle not in line.replace(" ", ""):
                        continue
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and str(doc.get("job_id")) == job_id:
                        out.append(doc)
    return out


def from_ledgers(job_id: str, lines: Sequence[Mapping[str, Any]]) -> JobReport:
    if not lines:
        raise NoSuchJob(f"no ledger line for job {job_id}")
    r = JobReport(job_id, "ledger")
    for line in lines:
        host = str(line.get("host", ""))
        for step in line.get("steps") or []:
            r.add(host, str(step.get("step", "")), _part(step))
        r.span(line.get("start") or line.get("first_seen"), line.get("end") or line.get("last_seen"))
        r.partial = r.partial or bool(line.get("partial"))
        for key in ("user", "account", "partition", "name"):
            setattr(r, key, getattr(r, key) or str(line.get(key) or ""))
    return r


def _growth(values: Sequence[Sequence[Any]]) -> float:
    """A counter's growth from zero over its samples, across resets (carbond restarts)."""
    total, prev = 0.0, 0.0
    for _ts, text in values:
        v = float(text)
        total += v - prev if v >= prev else v
        prev = v
    return total


def _query(base: str, expr: str, at: float, timeout: float) -> list[dict[str, Any]]:
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
        except ValueError:
            raise SourceError(f"{base}: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{base}: {exc}") from None
    if doc.get("status") != "success":
        raise SourceError(f"{base}: {doc.get('errorType', 'error')}: {doc.get('error', 'no detail')}")
    data = doc.get("data") or {}
    if data.get("resultType") != "matrix":
        raise SourceError(f"{base}: expected a matrix answer, got {data.get('resultType')!r}")
    return list(data.get("result") or [])


def from_prometheus(
    job_id: str, base: str, *, window_s: float, at: float | None = None, timeout: float = 30.0
) -> JobReport:
    """The job's figures from the raw samples of its series (``window_s`` before ``at``, default now)."""
    at = time.time() if at is None else at
    selector = f'{{slurm_job_id="{job_id}"}}[{int(window_s)}s]'
    r = JobReport(job_id, f"prometheus {base}")
    energy_rows = _query(base, ENERGY_METRIC + selector, at, timeout)
    emissions_rows = _query(base, EMISSIONS_METRIC + selector, at, timeout)
    if not energy_rows and not emissions_rows:
        raise NoSuchJob(f"no series with slurm_job_id={job_id} in the last {duration(window_s)} at {base}")
    for row in energy_rows:
        m = row.get("metric", {})
        r.add(m.get("host", ""), m.get("slurm_step", ""), Part({m.get("kind", ""): _growth(row.get("values", []))}))
        stamps = [float(ts) for ts, _ in row.get("values", [])]
        r.span(min(stamps, default=None), max(stamps, default=None))
        for key in ("user", "account", "partition"):
            setattr(r, key, getattr(r, key) or m.get(f"slurm_{key}", ""))
    for row in emissions_rows:
        m = row.get("metric", {})
        r.add(m.get("host", ""), m.get("slurm_step", ""), Part({}, _growth(row.get("values", []))))
    return r


def _kinds(p: Part) -> str:
    return ", ".join(f"{k} {energy(j)}" for k, j in sorted(p.energy_by_kind_j.items(), key=lambda kv: -kv[1]) if j)


def _share(p: Part, whole: Part) -> str:
    return f"{p.energy_j / whole.energy_j:.0%}" if whole.energy_j > 0 else "-"


def summary(r: JobReport) -> str:
    t = r.total
    who = ", ".join(
        x
        for x in (
            r.user,
            f"account {r.account}" if r.account else "",
            f"partition {r.partition}" if r.partition else "",
            r.name,
        )
        if x
    )
    span = f", {duration(r.end - r.start)}" if r.start is not None and r.end is not None else ""
    lines = [f"Slurm job {r.job_id}" + (f" ({who})" if who else "") + f": {len(r.by_node)} node(s){span}"]
    lines.append(
        f"  energy        {energy(t.energy_j)} ({t.energy_j:,.0f} J, {t.energy_j / JOULES_PER_KWH:.4g} kWh) IT"
    )
    u = f" +- {mass(t.emissions_u_g)}" if t.emissions_u_g else ""
    per = f" ({r.g_per_kwh:.4g} g per IT kWh, PUE included)" if r.g_per_kwh is not None else ""
    lines.append(f"  emissions     {mass(t.emissions_g)}{u} CO2e{per}")
    if t.marginal_g is not None:
        lines.append(f"  marginal      {mass(t.marginal_g)} CO2e at the marginal signal (what the grid added)")
    if t.embodied_g:
        lines.append(
            f"  embodied      {mass(t.embodied_g)} CO2e, the job's share of the hardware's, not included above"
        )
    eq = r.equivalents()
    lines.append(f"  equivalents   {eq['car_km']:.3g} km by car, {eq['tv_hours']:.3g} h of TV")
    lines.append(f"  by kind       {_kinds(t)}")
    for title, parts in (("by node", r.by_node), ("by step", r.by_step)):
        lines.append(f"  {title}")
        for key, p in sorted(parts.items(), key=lambda kv: -kv[1].energy_j):
            lines.append(
                f"    {key or '(job)':<16} {energy(p.energy_j):>12} {_share(p, t):>5}  {mass(p.emissions_g)} CO2e"
            )
    if r.partial:
        lines.append("  partial       carbond did not count the whole job on every node (down, or started later)")
    lines.append(f"  source        {r.source}")
    return "\n".join(lines)


def oneline(r: JobReport) -> str:
    """One line for the job's AdminComment: no quotes or newlines."""
    t = r.total
    gpu = t.energy_by_kind_j.get("gpu", 0.0)
    gpu_text = f", GPU {_share(Part({'gpu': gpu}), t)}" if gpu else ""
    partial = ", partial" if r.partial else ""
    return (
        f"carbond: {t.energy_j / JOULES_PER_KWH:.3g} kWh, {mass(t.emissions_g)} CO2e"
        f" (~{r.equivalents()['car_km']:.2g} km by car), {len(r.by_node)} node(s){gpu_text}{partial}"
    )
