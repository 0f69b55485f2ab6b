"""``carbond zones [--provider aws|gcp|azure] [--top N]``: the lowest-carbon zones or cloud regions.

Reads only the shipped static tables (see :mod:`carbond.intensity.static`): no network. Without ``--provider`` it
ranks countries and sub-national zones (US states, Canadian provinces, Nordic bidding zones); with one, that
cloud's regions. Factor types differ between sources (``direct`` counts combustion only, ``lifecycle`` also the
building and fuel chain, typically 10-20 % more for fossil power and far more for hydro, wind and nuclear): a
direct figure is not lower than a lifecycle one because the grid is cleaner. So zones are ranked only against zones
of the same factor type: one table per type (``--factor`` keeps one). A reader that closes the pipe early
(``carbond zones | head``) ends the listing quietly.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Literal, cast

from carbond.intensity.static import ZoneRow, rows

HEADER = ("rank", "zone", "g/kWh", "factor", "source", "year", "name")


FACTORS = {
    "lifecycle": "lifecycle factors (generation, building and fuel chain)",
    "direct": "direct factors (combustion only)",
}


def ranked(provider: str | None, top: int, factor: str | None = None) -> dict[str, list[ZoneRow]]:
    """The zones of each factor type, lowest first (``top`` of each; 0: all)."""
    table = cast(Literal["zones", "aws", "gcp", "azure"], provider or "zones")
    found = sorted(rows(table), key=lambda r: (r.intensity.g_per_kwh, r.intensity.zone))
    out: dict[str, list[ZoneRow]] = {}
    for kind in FACTORS:
        group = [r for r in found if r.intensity.factor_type == kind and factor in (None, kind)]
        if group:
            out[kind] = group[:top] if top > 0 else group
    return out


def render_table(found: list[ZoneRow]) -> str:
    lines = [
        (
            str(i),
            r.intensity.zone,
            f"{r.intensity.g_per_kwh:.1f}",
            r.intensity.factor_type,
            r.intensity.source,
            str(r.intensity.year or ""),
            r.name,
        )
        for i, r in enumerate(found, 1)
    ]
    widths = [max(len(c) for c in col) for col in zip(HEADER, *lines, strict=False)]
    right = {0, 2}
    out = []
    for cells in [HEADER, *lines]:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out) + "\n"


def render_tables(groups: dict[str, list[ZoneRow]]) -> str:
    return "\n".join(f"{FACTORS[kind]}:\n{render_table(found)}" for kind, found in groups.items())


def render_json(groups: dict[str, list[ZoneRow]]) -> str:
    return json.dumps(
        [
            {
                "rank": rank,
                "zone": r.intensity.zone,
                "g_per_kwh": r.intensity.g_per_kwh,
                "factor_type": r.intensity.factor_type,
                "source": r.intensity.source,
                "year": r.intensity.year,
                "name": r.name,
            }
            for found in groups.values()
            for rank, r in enumerate(found, 1)
        ],
        indent=2,
        ensure_ascii=False,
    )


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "zones",
        help="list the lowest-carbon zones or cloud regions (where should I run this?)",
        description="Ranks the shipped static intensity tables, lowest first. Use a zone as intensity.zone.",
    )
    p.add_argument("--provider", choices=["aws", "gcp", "azure"], help="rank this cloud's regions instead of zones")
    p.add_argument("--top", type=int, default=10, metavar="N", help="how many to list (default 10; 0: all)")
    p.add_argument("--format", choices=["table", "json"], default="table", dest="zones_format")
    p.add_argument(
        "--factor",
        choices=list(FACTORS),
        dest="zones_factor",
        help="only zones of this factor type (default: one ranking per type; never compare across types)",
    )


def run_cli(args: Any) -> int:
    if args.top < 0:
        print("carbond: --top must be 0 or more", file=sys.stderr)
        return 2
    groups = ranked(args.provider, args.top, args.zones_factor)
    text = render_json(groups) + "\n" if args.zones_format == "json" else render_tables(groups)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader has seen enough (carbond zones | head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        os.close(devnull)
    return 0
