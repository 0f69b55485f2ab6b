"""CPU model name -> TDP, from the shipped table (``carbond/data/cpu_power.csv``).

``/proc/cpuinfo`` prints vendor strings ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", "AMD EPYC 7763 64-Core
Processor") while the table holds marketing names ("Intel Xeon Gold 6248R"). Both sides are normalised the same way
(lower case; any Unicode space, e.g. a non-breaking one, as a space; trademarks, frequency, generation prefix, core
counts, the integrated graphics of AMD APUs ("with Radeon Graphics", "w/ Radeon 780M Graphics") and filler words
removed), then matched exactly; failing that, on the exact set of model-number tokens of the same vendor ("6248r"
never matches "6248"), and only when every table row with those tokens agrees on the TDP. Apple's tier words are
model tokens too: "Apple M1 Max" never takes the plain M1's figure.

Failing those, by suffix and family (:func:`lookup_part`): Intel's ``F`` suffix only removes the integrated graphics
(i7-12700F is an i7-12700 for power, i5-13600KF an i5-13600K), so the part without it is tried; then the part's
family: same vendor and brand, same generation (the model number's digits before its last three: Core i7-12700 is
generation 12, Ryzen 7 7700 generation 7), same suffix letters (none, K, T, H, U ...), any tier (i3/i5/i7/i9,
Ryzen 3-9): their median TDP where every one of them is within 25 % of it (else unknown).

ARM CPUs print no model name: :func:`arm_part` names the core from ``CPU implementer`` and ``CPU part`` (the
MIDR_EL1 fields, ``arm_parts.csv``) and :func:`arm_power` gives its power from ``arm_chips.csv``: the chip of
that core with this many cores (an 80-core Neoverse-N1 is an Ampere Altra Q80-30, 210 W), else the median watts per
core of the chips with that core x the cores, else, for a server core, the median over every listed chip.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from dataclasses import dataclass
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


def _read(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(resources.files("carbond.data").joinpath(name).read_text(encoding="utf-8"))))


@cache
def _rows() -> tuple[tuple[str, str, float], ...]:
    """(name, lower-cased name, TDP) of every table row."""
    return tuple((row["Name"], row["Name"].lower(), float(row["TDP"])) for row in _read("cpu_power.csv"))


@cache
def _threads() -> dict[str, int]:
    """Table name -> threads, where the table knows them."""
    return {row["Name"]: int(row["Threads"]) for row in _read("cpu_power.csv") if (row.get("Threads") or "").strip()}


@dataclass(frozen=True, slots=True)
class Part:
    """A CPU part as the tables know it: its TDP (W per socket), the name it was found under, its threads (None
    when unknown) and how it was found (``table``, ``suffix``, ``family``, ``arm``)."""

    tdp: float
    name: str
    threads: int | None = None
    how: str = "table"


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


_MODEL = re.compile(r"^([a-z]*\d?-)?(\d{3,5})([a-z]*)$")


def _family(norm: str) -> tuple[str, ...] | None:
    """(vendor, brand words, tier-free prefix, digits, generation, suffix) of a name with one model number."""
    words = norm.split()
    found = [(i, m) for i, w in enumerate(words) if (m := _MODEL.match(w))]
    if len(found) != 1:
        return None
    i, m = found[0]
    prefix, digits, suffix = m.group(1) or "", m.group(2), m.group(3)
    # the tier: Intel's i3-i9 prefix digit, Ryzen's 3-9 word; not Xeon's, EPYC's or Threadripper's series words
    brand = [w for w in words[:i] if not (w.isdigit() and len(w) == 1)]
    return (_vendor(norm), " ".join(brand), re.sub(r"\d", "", prefix), str(len(digits)), digits[:-3], suffix)


def _family_tdp(norm: str) -> tuple[float, str] | None:
    key = _family(norm)
    if key is None or not key[4]:
        return None
    members = [(tdp, name) for name, _, tdp in _rows() if _family(normalise(name)) == key]
    if not members:
        return None
    median = statistics.median(t for t, _ in members)
    if any(abs(t - median) > 0.25 * median for t, _ in members):
        return None
    names = ", ".join(sorted(n for _, n in members)[:4]) + (" ..." if len(members) > 4 else "")
    return median, f"family of {len(members)} ({names})"


def lookup_part(model_name: str) -> Part | None:
    """The part a model name names: the table's row (:func:`lookup_tdp`), else the part without Intel's ``F``
    suffix, else its family's median TDP; None if none is confidently known."""
    found = lookup_tdp(model_name)
    if found is not None:
        return Part(found[0], found[1], _threads().get(found[1]))
    norm = normalise(model_name)
    if _vendor(norm) == "intel":
        stripped = re.sub(r"\b((?:i\d-)?\d{3,5}[a-z]*?)f\b", r"\1", norm)
        if stripped != norm and (found := lookup_tdp(stripped)) is not None:
            return Part(found[0], found[1], _threads().get(found[1]), "suffix")
        norm = stripped
    if (fam := _family_tdp(norm)) is not None:
        return Part(fam[0], fam[1], None, "family")
    return None


@dataclass(frozen=True, slots=True)
class ArmCore:
    name: str  # "Neoverse-N1"
    server: bool
    cores: int  # logical CPUs cpuinfo lists (ARM server cores have one thread each)


def arm_part(cpuinfo: str) -> ArmCore | None:
    """The ARM core of the first CPU ``/proc/cpuinfo`` lists, from its implementer and part; None if not ARM or
    not in ``arm_parts.csv``."""
    fields: dict[str, str] = {}
    cores = 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cores += 1
        elif key in ("CPU implementer", "CPU part") and key not in fields:
            fields[key] = value.strip().lower()
    if len(fields) != 2:
        return None
    try:
        ids = (int(fields["CPU implementer"], 16), int(fields["CPU part"], 16))
    except ValueError:
        return None
    for row in _read("arm_parts.csv"):
        if (int(row["implementer"], 16), int(row["part"], 16)) == ids:
            return ArmCore(row["core"], row["server"] == "1", max(cores, 1))
    return None


def arm_power(core: ArmCore, vm: bool) -> Part | None:
    """Power of ``core.cores`` cores of this kind (see the module docstring); a VM's vCPUs never match a chip."""
    chips = [(r["chip"], r["core"], int(r["cores"]), float(r["tdp_w"])) for r in _read("arm_chips.csv")]
    if not vm:
        for chip, kind, cores, tdp in chips:
            if kind == core.name and cores == core.cores:
                return Part(tdp, f"{chip} ({core.name}, {cores} cores)", cores, "arm")
    same = [(chip, tdp / cores) for chip, kind, cores, tdp in chips if kind == core.name]
    if not same and core.server:
        same = [(chip, tdp / cores) for chip, _, cores, tdp in chips]
        basis = "every listed ARM server chip"
    else:
        basis = f"the {core.name} chips"
    if not same:
        return None
    per_core = statistics.median(w for _, w in same)
    names = ", ".join(chip for chip, _ in same)
    return Part(
        per_core * core.cores,
        f"ARM {core.name} x {core.cores} cores at {per_core:.2f} W per core (median of {basis}: {names})",
        core.cores,
        "arm",
    )
