"""``carbond zones [--provider aws|gcp|azure] [--top N]``: the lowest-carbon zones or cloud regions.

Reads only the shipped static tables (see :mod:`carbond.intensity.static`): no network. Without ``--provider`` it
ranks countries and sub-national zones (US states, Canadian provinces, Nordic bidding zones); with one, that
cloud's regions. Factor types differ between sources (``direct`` counts combustion only, ``lifecycle`` also the
building and fuel chain), so the column is shown: compare like with like.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal, cast

from carbond.intensity.static import ZoneRow, rows

HEADER = ("rank", "zone", "g/kWh", "factor", "source", "year", "name")


def ranked(provider: str | None, top: int) -> list[ZoneRow]:
    table = cast(Literal["zones", "aws", "gcp", "azure"], provider or "zones")
    found = sorted(rows(table), key=lambda r: (r.intensity.g_per_kwh, r.intensity.zone))
    return found[:top] if top > 0 else found


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


def render_json(found: list[ZoneRow]) -> str:
    return json.dumps(
        [
            {
                "zone": r.intensity.zone,
                "g_per_kwh": r.intensity.g_per_kwh,
                "factor_type": r.intensity.factor_type,
                "source": r.intensity.source,
                "year": r.intensity.year,
                "name": r.name,
            }
            for r in found
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


def run_cli(args: Any) -> int:
    if args.top < 0:
        print("carbond: --top must be 0 or more", file=sys.stderr)
        return 2
    found = ranked(args.provider, args.top)
    if args.zones_format == "json":
        print(render_json(found))
    else:
        print(render_table(found), end="")
    return 0
