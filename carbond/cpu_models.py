"""CPU model name -> TDP, from the shipped table (``carbond/data/cpu_power.csv``).

``/proc/cpuinfo`` prints vendor strings ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", "AMD EPYC 7763 64-Core
Processor") while the table holds marketing names ("Intel Xeon Gold 6248R"). Both sides are normalised the same way
(lower case; trademarks, frequency, generation prefix, core counts and filler words removed), then matched exactly;
failing that, on the exact set of model-number tokens of the same vendor ("6248r" never matches "6248"), and only
when every table row with those tokens agrees on the TDP.
"""

from __future__ import annotations

import csv
import io
import re
from functools import cache
from importlib import resources

_DROP = [
    re.compile(p)
    for p in (
        r"\((r|tm)\)|®|™",
        r"\bcpu\b\s*@\s*[\d.]+\s*ghz|@\s*[\d.]+\s*ghz",
        r"\b\d+(st|nd|rd|th) gen\b",
        r"\b\d+-cores?\b(\s+processor)?",
        r"\bwith radeon( \w+)? graphics\b",
        r"\b(processor|cpu|apu)\b",
    )
]


def normalise(name: str) -> str:
    text = name.lower()
    for pattern in _DROP:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


def _vendor(norm: str) -> str:
    return "amd" if norm.startswith("amd") or " ryzen" in f" {norm}" or "epyc" in norm else "intel"


def _model_tokens(norm: str) -> frozenset[str]:
    return frozenset(t for t in norm.split() if any(c.isdigit() for c in t))


@cache
def _table() -> tuple[dict[str, tuple[float, str]], dict[tuple[str, frozenset[str]], list[tuple[float, str]]]]:
    text = resources.files("carbond.data").joinpath("cpu_power.csv").read_text(encoding="utf-8")
    exact: dict[str, tuple[float, str]] = {}
    by_tokens: dict[tuple[str, frozenset[str]], list[tuple[float, str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        name, tdp = row["Name"], float(row["TDP"])
        norm = normalise(name)
        exact.setdefault(norm, (tdp, name))
        tokens = _model_tokens(norm)
        if tokens:
            by_tokens.setdefault((_vendor(norm), tokens), []).append((tdp, name))
    return exact, by_tokens


def lookup_tdp(model_name: str) -> tuple[float, str] | None:
    """(TDP in watts, the table's name) for a ``/proc/cpuinfo`` model name, or None if not confidently known."""
    exact, by_tokens = _table()
    norm = normalise(model_name)
    if norm in exact:
        return exact[norm]
    tokens = _model_tokens(norm)
    if not tokens:
        return None
    candidates = by_tokens.get((_vendor(norm), tokens), [])
    if candidates and len({tdp for tdp, _ in candidates}) == 1:
        return candidates[0]
    return None
