"""CPU model name -> TDP, from the shipped table (``carbond/data/cpu_power.csv``).

``/proc/cpuinfo`` prints vendor strings ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", "AMD EPYC 7763 64-Core
Processor") while the table holds marketing names ("Intel Xeon Gold 6248R"). Both sides are normalised the same way
(lower case; any Unicode space, e.g. a non-breaking one, as a space; trademarks, frequency, generation prefix, core
counts, the integrated graphics of AMD APUs ("with Radeon Graphics", "w/ Radeon 780M Graphics") and filler words
removed), then matched exactly; failing that, on the exact set of model-number tokens of the same vendor ("6248r"
never matches "6248"), and only when every table row with those tokens agrees on the TDP. Apple's tier words are
model tokens too: "Apple M1 Max" never takes the plain M1's figure.
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
        r"(\bwith|\bw/)\s*radeon( \w+)? graphics\b",
        r"\b(processor|cpu|apu)\b",
    )
]


def normalise(name: str) -> str:
    text = " ".join(name.lower().split())  # any Unicode space (no-break, thin) is a space before the patterns
    for pattern in _DROP:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


_APPLE_TIERS = frozenset({"pro", "max", "ultra"})


def _vendor(norm: str) -> str:
    if norm.startswith("apple"):
        return "apple"
    return "amd" if norm.startswith("amd") or " ryzen" in f" {norm}" or "epyc" in norm else "intel"


def _model_tokens(norm: str) -> frozenset[str]:
    words = norm.split()
    tiers = _APPLE_TIERS if words[:1] == ["apple"] else frozenset()
    return frozenset(t for t in words if any(c.isdigit() for c in t) or t in tiers)


@cache
def _rows() -> tuple[tuple[str, str, float], ...]:
    """(name, lower-cased name, TDP) of every table row."""
    text = resources.files("carbond.data").joinpath("cpu_power.csv").read_text(encoding="utf-8")
    return tuple((row["Name"], row["Name"].lower(), float(row["TDP"])) for row in csv.DictReader(io.StringIO(text)))


def lookup_tdp(model_name: str) -> tuple[float, str] | None:
    """(TDP in watts, the table's name) for a ``/proc/cpuinfo`` model name, or None if not confidently known.

    Only rows containing every model-number token of the query are normalised: normalising removes text and never
    creates it, so no other row can match (this keeps start-up fast: the table has thousands of rows).
    """
    norm = normalise(model_name)
    tokens = _model_tokens(norm)
    needles = tokens or frozenset(norm.split())  # without model numbers only an exact match counts: every word
    candidates = [r for r in _rows() if all(t in r[1] for t in needles)]
    by_tokens: list[tuple[float, str]] = []
    vendor = _vendor(norm)
    for name, _, tdp in candidates:
        row_norm = normalise(name)
        if row_norm == norm:
            return tdp, name
        if tokens and _model_tokens(row_norm) == tokens and _vendor(row_norm) == vendor:
            by_tokens.append((tdp, name))
    if by_tokens and len({tdp for tdp, _ in by_tokens}) == 1:
        return by_tokens[0]
    return None
