"""``carbond slurm report JOBID [--ledger-dir DIR ... | --nodes-dir SHARED | --prometheus URL] [--oneline | --json]``.

Exit codes: 0 the report is printed, 1 no figures for the job (or the source could not be read), 2 usage or config
error (:mod:`carbond.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from carbond import budgets, config
from carbond.errors import ConfigError
from carbond.slurm.report import (
    JobReport,
    NoSuchJob,
    SourceError,
    from_ledgers,
    from_prometheus,
    job_lines,
    ledger_dirs,
    oneline,
    summary,
)

#: How often ``--wait`` looks for the job's ledger line.
WAIT_POLL_S = 1.0


def ledger_dir(cfg: config.Config) -> Path:
    """This node's ledger directory: ``attribution.slurm.ledger.dir`` (``{host}`` replaced by the node's name), else
    ``<state_dir>/slurm``."""
    configured = cfg.attribution.slurm.ledger.dir
    if configured is None:
        return cfg.resolved_state_dir() / "slurm"
    return Path(str(configured).replace("{host}", cfg.resolved_host()))


def add_cli(subparsers: Any) -> None:
    slurm = subparsers.add_parser("slurm", help="Slurm jobs: energy and carbon per job")
    sub = slurm.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")
    r = sub.add_parser("report", help="a job's energy and carbon, summed over its nodes")
    r.add_argument("job_id", metavar="JOBID")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--ledger-dir", action="append", type=Path, metavar="DIR", help="a node's ledger (repeatable)")
    src.add_argument("--nodes-dir", type=Path, metavar="SHARED", help="a shared directory of per-node ledgers")
    src.add_argument("--prometheus", metavar="URL", help="sum the job's series in this Prometheus instead")
    r.add_argument("--window", default="7d", metavar="DURATION", help="--prometheus: how far back (default 7d)")
    r.add_argument("--config", metavar="FILE", help="the daemon's config, for this node's ledger (default)")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--oneline", action="store_true", help="one line, for the job's AdminComment")
    out.add_argument("--json", action="store_true", help="the report as JSON")
    r.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for the job's ledger line"
    )


def _report(args: argparse.Namespace) -> JobReport:
    if args.prometheus:
        try:
            window_s = budgets.duration_seconds(args.window)
        except ValueError as exc:
            raise ConfigError("--window", [("window", str(exc))]) from None
        return from_prometheus(args.job_id, args.prometheus, window_s=window_s)
    if args.nodes_dir is not None:
        if not args.nodes_dir.is_dir():
            raise ConfigError("--nodes-dir", [("nodes-dir", f"{args.nodes_dir}: not a directory")])
        dirs = ledger_dirs(args.nodes_dir)
    else:
        dirs = args.ledger_dir or [ledger_dir(config.load(args.config))]
    return from_ledgers(args.job_id, job_lines(args.job_id, dirs))


def run_cli(args: argparse.Namespace) -> int:
    if not args.job_id.replace("_", "").isdigit():
        raise ConfigError("JOBID", [("job_id", f"{args.job_id!r} is not a Slurm job ID")])
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        try:
            report = _report(args)
            break
        except NoSuchJob as exc:
            if time.monotonic() >= deadline:
                print(f"carbond: {exc}", file=sys.stderr)
                return 1
        except SourceError as exc:
            print(f"carbond: cannot read {exc}", file=sys.stderr)
            return 1
        time.sleep(WAIT_POLL_S)  # the daemon writes the line a tick or two after the Epilog
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    elif args.oneline:
        print(oneline(report))
    else:
        print(summary(report))
    return 0
