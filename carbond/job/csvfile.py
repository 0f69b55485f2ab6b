"""The CSV a job appends to: CodeCarbon 3.3's ``emissions.csv`` columns first, in its order, units and meanings,
then carbond's own (``docs/csv-schema.md`` is the reference for every column).

As CodeCarbon computes them, the energy and power columns include the PUE (``energy_consumed`` is IT energy x PUE,
``cpu_power`` the mean IT power x PUE), ``water_consumed`` is ``wue x energy_consumed`` in litres and
``ram_total_size``/``ram_used_gb`` are GiB; carbond's IT-only figures are in its own ``it_*`` columns.
Tasks (CodeCarbon's ``start_task``) and phases (``track``'s ``phase``) are rows of a second file, named and laid out
as CodeCarbon's task mode writes them: ``emissions_<experiment_name>_<run_id>.csv`` beside the first.

A file is only appended to, under an exclusive ``flock``; an existing header is kept and the row follows it
(CodeCarbon's file gets CodeCarbon's columns). ``update`` (CodeCarbon's ``on_csv_write="update"``) replaces the
rows of the same run instead of adding one. A file whose header lacks any of CodeCarbon 3.3's columns (an older
CodeCarbon's, or another program's) is moved aside as CodeCarbon does (``emissions.csv.bak``, then
``emissions.csv_0.bak`` ...) and a new file started; carbond's own supersets are appended to.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import IO, Any, Literal

from carbond.job.report import CPU_KINDS, GPU_KINDS, RAM_KINDS, PhaseReport, Report, location
from carbond.units import JOULES_PER_KWH

#: CodeCarbon 3.3's EmissionsData fields, in its order
CODECARBON_COLUMNS = (  # noqa: SIM905 (a list literal would take 40 lines)
    "timestamp project_name run_id experiment_id duration emissions emissions_rate cpu_power gpu_power ram_power "
    "cpu_energy gpu_energy ram_energy energy_consumed water_consumed country_name country_iso_code region "
    "cloud_provider cloud_region os python_version codecarbon_version cpu_count cpu_model gpu_count gpu_model "
    "longitude latitude ram_total_size tracking_mode cpu_utilization_percent gpu_utilization_percent "
    "ram_utilization_percent ram_used_gb on_cloud pue wue"
).split()
#: CodeCarbon 3.3's TaskEmissionsData fields (its task file), in its order
CODECARBON_TASK_COLUMNS = [
    "task_name",
    *(c for c in CODECARBON_COLUMNS if c not in ("experiment_id", "pue", "wue")),
]
CARBOND_COLUMNS = (  # noqa: SIM905
    "carbond_version host scope attribution_method energy_source intensity_g_per_kwh intensity_zone "
    "intensity_provider intensity_age_s emissions_g it_energy_consumed it_cpu_energy it_gpu_energy it_ram_energy "
    "machine_energy_consumed machine_it_energy_consumed machine_emissions embodied_emissions exit_code command error "
    "emissions_uncertainty it_energy_uncertainty uncertainty_dominant"
).split()
COLUMNS = (*CODECARBON_COLUMNS, *CARBOND_COLUMNS)
TASK_COLUMNS = (*CODECARBON_TASK_COLUMNS, *CARBOND_COLUMNS)
Columns = Literal["all", "codecarbon"]


@dataclass(frozen=True, slots=True)
class _Span:
    """The figures of a run or of one of its phases (IT joules, grams)."""

    end_wall: float
    duration_s: float
    by_kind_j: dict[str, float]
    energy_j: float
    emissions_g: float
    machine_energy_j: float
    machine_emissions_g: float
    embodied_g: float
    energy_u_j: float | None = None  # standard uncertainties, where known
    emissions_u_g: float | None = None


def _scaled_u(u: float | None, whole: float, part: float) -> float | None:
    """A part's uncertainty: the whole run's relative uncertainty applied to the part (same methods, same bands)."""
    return None if u is None or whole <= 0 else u * part / whole


@cache
def _state_names() -> dict[str, str]:
    from carbond.intensity.static import rows

    zones = {r.intensity.zone.upper(): r.name for r in rows("zones")}
    return {zone: name for zone, name in zones.items() if zone.startswith(("US-", "CA-"))}


def _location(zone: str) -> dict[str, str]:
    """CodeCarbon's location columns of a zone; ``region`` as CodeCarbon writes it where it has regions (US states,
    Canadian provinces: the name, lowercased, ``california``), else carbond's sub-zone."""
    loc = location(zone)
    name = _state_names().get(zone.upper())
    if name is not None:
        loc["region"] = name.lower()
    return loc


def _kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


def _row(r: Report, s: _Span) -> dict[str, Any]:
    dur, pue = s.duration_s, r.pue
    groups = (CPU_KINDS, GPU_KINDS, RAM_KINDS)
    cpu, gpu, ram = (sum(j for k, j in s.by_kind_j.items() if k in kinds) for kinds in groups)
    i = r.intensity or {}
    loc = _location(str(i.get("zone", "")))
    h, u = r.host, r.utilization
    measured = r.scope != "none"

    def num(x: float) -> float | str:
        return x if measured else ""

    def power(j: float) -> float | str:
        return num(j * pue / dur if dur > 0 else 0.0)

    counted = [d for d in r.devices if d.in_node_total]
    models = sum(1 for d in counted if not d.measured)
    source = "" if not counted else "measured" if not models else "estimated" if models == len(counted) else "mixed"
    return {
        # CodeCarbon's timestamp: local time, seconds, no offset (a file mixing both tools parses as one column)
        "timestamp": datetime.fromtimestamp(s.end_wall).strftime("%Y-%m-%dT%H:%M:%S"),
        "project_name": r.project,
        "run_id": r.run_id,
        "experiment_id": r.experiment_id,
        "duration": dur,
        "emissions": num(s.emissions_g / 1000.0),
        "emissions_rate": num(s.emissions_g / 1000.0 / dur if dur > 0 else 0.0),
        "cpu_power": power(cpu),
        "gpu_power": power(gpu),
        "ram_power": power(ram),
        "cpu_energy": num(_kwh(cpu) * pue),
        "gpu_energy": num(_kwh(gpu) * pue),
        "ram_energy": num(_kwh(ram) * pue),
        "energy_consumed": num(_kwh(s.energy_j) * pue),
        "water_consumed": num(_kwh(s.energy_j) * pue * r.wue),
        **loc,
        "os": h.get("os", ""),
        "python_version": h.get("python_version", ""),
        "codecarbon_version": "",
        "cpu_count": h.get("cpu_count", ""),
        "cpu_model": h.get("cpu_model", ""),
        "gpu_count": h.get("gpu_count", 0),
        "gpu_model": h.get("gpu_model", ""),
        "longitude": "",
        "latitude": "",
        "ram_total_size": h.get("ram_total_gib", ""),
        "tracking_mode": "process" if (r.scope if measured else r.asked_scope) == "job" else "machine",
        "cpu_utilization_percent": u.get("cpu_percent", ""),
        "gpu_utilization_percent": u.get("gpu_percent", 0.0 if not h.get("gpu_count") else ""),
        "ram_utilization_percent": u.get("ram_percent", ""),
        "ram_used_gb": u.get("ram_used_gib", ""),
        "on_cloud": "Y" if loc["cloud_provider"] else "N",
        "pue": pue,
        "wue": r.wue,
        "carbond_version": r.carbond_version,
        "host": h.get("name", ""),
        "scope": r.scope,
        "attribution_method": r.method,
        "energy_source": source,
        "intensity_g_per_kwh": i.get("g_per_kwh", ""),
        "intensity_zone": i.get("zone", ""),
        "intensity_provider": i.get("provider", ""),
        "intensity_age_s": i.get("age_s", ""),
        "emissions_g": num(s.emissions_g),
        "it_energy_consumed": num(_kwh(s.energy_j)),
        "it_cpu_energy": num(_kwh(cpu)),
        "it_gpu_energy": num(_kwh(gpu)),
        "it_ram_energy": num(_kwh(ram)),
        "machine_energy_consumed": num(_kwh(s.machine_energy_j) * pue),
        "machine_it_energy_consumed": num(_kwh(s.machine_energy_j)),
        "machine_emissions": num(s.machine_emissions_g / 1000.0),
        "embodied_emissions": num(s.embodied_g / 1000.0),
        "exit_code": "" if r.exit_code is None else r.exit_code,
        "command": "" if r.command is None else shlex.join(r.command),
        "error": r.error,
        "emissions_uncertainty": "" if s.emissions_u_g is None else num(s.emissions_u_g / 1000.0),
        "it_energy_uncertainty": "" if s.energy_u_j is None else num(_kwh(s.energy_u_j)),
        "uncertainty_dominant": r.uncertainty_dominant,
    }


def csv_row(r: Report) -> dict[str, Any]:
    """The run's row (every column of :data:`COLUMNS`)."""
    span = _Span(
        r.started_at + r.duration_s,
        r.duration_s,
        r.energy_by_kind_j,
        r.energy_j,
        r.emissions_g,
        r.machine_energy_j,
        r.machine_emissions_g,
        r.embodied_g,
        r.energy_u_j,
        r.emissions_u_g,
    )
    return _row(r, span)


def task_row(r: Report, p: PhaseReport) -> dict[str, Any]:
    """A task's (phase's) row, as CodeCarbon's task file has it (every column of :data:`TASK_COLUMNS`)."""
    span = _Span(
        r.started_at + p.started_s + p.duration_s,
        p.duration_s,
        p.energy_by_kind_j,
        p.energy_j,
        p.emissions_g,
        p.machine_energy_j,
        p.machine_emissions_g,
        p.embodied_g,
        _scaled_u(r.energy_u_j, r.energy_j, p.energy_j),
        _scaled_u(r.emissions_u_g, r.emissions_g, p.emissions_g),
    )
    return {"task_name": p.name, **_row(r, span)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    with path.open("ab+") as f:
        with contextlib.suppress(ImportError, OSError):  # concurrent runs writing to one file
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        yield f


def _render(header: list[str], rows: list[dict[str, Any]], with_header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", extrasaction="ignore", lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def backup(path: Path) -> Path:
    """Move ``path`` aside as CodeCarbon does: ``<name>.bak``, else ``<name>_0.bak``, ``<name>_1.bak`` ..."""
    aside, n = path.with_name(path.name + ".bak"), 0
    while aside.exists():
        aside, n = path.with_name(f"{path.name}_{n}.bak"), n + 1
    path.rename(aside)
    return aside


def append_csv(
    path: str | Path,
    r: Report,
    *,
    mode: Literal["append", "update"] = "append",
    columns: Columns = "all",
    notes: list[str] | None = None,
) -> list[str]:
    """Write the run's row (header first if the file is new or empty); returns our columns the header lacks.

    ``update`` removes the rows of the same ``run_id`` first (CodeCarbon's ``on_csv_write="update"``).
    ``columns="codecarbon"`` gives a new file exactly CodeCarbon 3.3's header, which CodeCarbon itself appends to.
    A header without all of CodeCarbon's columns: the file is moved aside (:func:`backup`, said in ``notes``).
    """
    row, target = csv_row(r), Path(path)
    for _ in range(3):  # a file moved aside is replaced by a new one, opened (and locked) afresh
        with _locked(target) as f:
            text = f.read().decode("utf-8", "replace")
            first = text.partition("\n")[0]
            header = next(csv.reader([first])) if first.strip() else []
            if header and not set(CODECARBON_COLUMNS) <= set(header):
                aside = backup(target)  # under the lock: a concurrent writer waits, then sees the new file
                if notes is not None:
                    notes.append(f"carbond: {path} is not in CodeCarbon 3.3's layout: moved to {aside.name}")
                continue
            header = header or list(COLUMNS if columns == "all" else CODECARBON_COLUMNS)
            if mode == "update" and first.strip():
                kept = [x for x in csv.DictReader(io.StringIO(text)) if x.get("run_id") != r.run_id]
                f.truncate(0)
                f.write(_render(header, [*kept, row], True))
            else:
                sep = b"\n" if text and not text.endswith("\n") else b""
                f.write(sep + _render(header, [row], not first.strip()))
            return [c for c in COLUMNS if c not in header]
    raise OSError(f"{path}: replaced by another program while writing")


def task_file(csv_path: str | Path, experiment_name: str, run_id: str) -> Path:
    """Where CodeCarbon's task mode writes a run's tasks: ``emissions_<experiment>_<run_id>.csv`` beside the CSV."""
    return Path(csv_path).parent / f"emissions_{experiment_name}_{run_id}.csv"


def write_tasks(path: str | Path, r: Report) -> None:
    """The run's phases as rows (the whole file rewritten, as CodeCarbon rewrites its task file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(_render(list(TASK_COLUMNS), [task_row(r, p) for p in r.phases], True))
    tmp.replace(target)


def write_outputs(
    r: Report,
    csv_path: str | Path | None,
    json_path: str | Path | None,
    mode: Literal["append", "update"],
    columns: Columns,
    experiment_name: str,
) -> list[str]:
    """The run's JSON report, CSV row and task file, where asked for; what went wrong, as warnings to show."""
    problems: list[str] = []
    try:
        if json_path is not None:
            r.write_json(json_path)
        if csv_path is not None:
            missing = append_csv(csv_path, r, mode=mode, columns=columns, notes=problems)
            if missing and columns == "all" and set(missing) != set(CARBOND_COLUMNS):  # CodeCarbon's own: expected
                problems.append(f"carbond: {csv_path} has an older header; columns left out: {', '.join(missing)}")
            if r.phases:
                write_tasks(task_file(csv_path, experiment_name, r.run_id), r)
    except OSError as exc:
        problems.append(f"carbond: cannot write the report: {exc}")
    return problems
