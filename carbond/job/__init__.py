"""Job-level measurement: ``carbond measure -- CMD``, ``carbond report`` and the ``track`` Python API.

This module only declares the command line; everything else is imported when a command runs (or ``track`` is
used), so importing carbond stays cheap and free of side effects.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

COMMANDS = ("measure", "report")


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def add_cli(subparsers: Any) -> None:
    m = subparsers.add_parser(
        "measure",
        help="run a command and report its energy and emissions",
        usage="carbond measure [options] -- CMD [ARGS...]",
    )
    m.add_argument("--project", default="carbond", metavar="NAME", help="project name for the report")
    m.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    m.add_argument("--csv", metavar="FILE", help="append a CodeCarbon-compatible row (docs/csv-schema.md)")
    m.add_argument("--config", metavar="FILE", help="YAML config: sensors, PUE, intensity zone")
    m.add_argument("--daemon", metavar="URL", help="read a running carbond daemon instead of sampling again")
    m.add_argument(
        "--interval", type=positive_float, metavar="SECS", help="sampling interval (default: measure_power_secs)"
    )
    m.add_argument(
        "--csv-columns",
        choices=["all", "codecarbon"],
        default="all",
        help="columns of a new CSV: all (CodeCarbon's, then carbond's) or exactly CodeCarbon 3.3's",
    )
    m.add_argument(
        "--attribution",
        choices=["auto", "cgroup", "systemd", "proctree", "machine"],
        default="auto",
        help="how the job's share is found (default auto: cgroup, then systemd, then proctree)",
    )
    m.add_argument("-q", "--quiet", action="store_true", help="errors only: no summary, progress, warnings or logs")
    m.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")

    r = subparsers.add_parser("report", help="show a JSON job report, or its Hugging Face model-card block")
    r.add_argument("file", nargs="?", metavar="REPORT.json", help="a report from measure --json or track(json=...)")
    r.add_argument("--model-card", metavar="REPORT.json", help="print the co2_eq_emissions block for this report")
    r.add_argument("--training-type", choices=["pre-training", "fine-tuning"], default="pre-training")
    r.add_argument("--location", default="", help="geographical_location (default: from the intensity zone)")
    r.add_argument("--hardware", default="", help="hardware_used (default: from the report's host)")
    r.add_argument("--format", choices=["yaml", "json"], default="yaml")
    r.add_argument("-o", "--output", metavar="OUT", help="write here instead of standard output")


def _report(args: Any) -> int:
    import json

    import yaml

    from carbond.job.modelcard import model_card
    from carbond.job.report import NotAReport, load_json
    from carbond.job.text import summary

    path = args.model_card or args.file
    if path is None:
        print("carbond report: give a report file (carbond report [--model-card] REPORT.json)", file=sys.stderr)
        return 2
    try:
        report = load_json(path)
    except NotAReport as exc:
        print(f"carbond report: {exc}; write one with carbond measure --json FILE", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"carbond report: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.model_card:
        block = model_card(report, args.training_type, args.location, args.hardware)
        if args.format == "json":
            text = json.dumps(block, indent=2) + "\n"
        else:
            text = yaml.safe_dump(block, sort_keys=False, allow_unicode=True, width=1000)
    else:
        text = summary(report) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def run_cli(args: Any) -> int:
    if args.command == "measure":
        from carbond.job.measure import run

        return run(args)
    return _report(args)
