"""Every carbond metric name spelled in carbond/ is a declared family or one of its samples' names.

The consumers of carbond's own series (the ``measure --daemon`` sampler, the budgets' rules, the Slurm report) look
their names up in :data:`carbond.exporter.families.BY_NAME`, so a renamed family fails at import; this test covers
the rest: a docstring, a comment or a string naming a series that no longer exists fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import carbond
from carbond.exporter.families import FAMILIES
from carbond.exporter.family import Family

PACKAGE = Path(carbond.__file__).parent
#: Where the families are declared: the names there are the declarations themselves.
DECLARING = {"exporter/families.py", "exporter/uncertainty.py"}
#: ``carbond_*`` words that are no metric's name.
NOT_METRICS = {
    "carbond_version": "the job reports' field and CSV column",
    "carbond_codecarbon": "the CodeCarbon drop-in's lock file",
}
_NAME = re.compile(r"\bcarbond_[a-z0-9_]*[a-z0-9]")
_HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum")


def sample_names(f: Family) -> set[str]:
    """The names a family's series go by: the family's, a histogram's samples', and a counter's without ``_total``
    (the family's name as prometheus_client's parser and OpenMetrics give it)."""
    if f.type == "histogram":
        return {f.name, *(f.name + suffix for suffix in _HISTOGRAM_SAMPLES)}
    if f.type == "counter":
        return {f.name, f.name.removesuffix("_total")}
    return {f.name}


DECLARED = frozenset(name for f in FAMILIES for name in sample_names(f))


def spelled(text: str) -> set[str]:
    return set(_NAME.findall(text))


def undeclared(names: Iterable[str]) -> set[str]:
    return {n for n in names if n not in DECLARED and n not in NOT_METRICS}


def names_in_package() -> dict[str, list[str]]:
    """Each ``carbond_*`` name spelled in carbond/ outside the declarations, with the files that spell it."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in DECLARING:
            for name in spelled(path.read_text(encoding="utf-8")):
                found.setdefault(name, []).append(rel)
    return found


def test_the_scan_finds_spelled_names_and_flags_undeclared_ones() -> None:
    text = (
        'if s.name == "carbond_pue": ...\n'
        'TICKS = re.compile(rb"^carbond_tick_duration_seconds_count")\n'
        "exported on ``carbond_pue_watts``; names start with carbond_ (a prefix, no name)\n"
        "family.name == 'carbond_emissions_grams'  # a counter's family name from the parser\n"
    )
    names = spelled(text)
    assert names == {
        "carbond_pue",
        "carbond_tick_duration_seconds_count",
        "carbond_pue_watts",
        "carbond_emissions_grams",
    }
    assert undeclared(names) == {"carbond_pue_watts"}
    assert undeclared(["carbond_pue_count", "carbond_tick_duration_seconds_total"]) == {
        "carbond_pue_count",
        "carbond_tick_duration_seconds_total",
    }


def test_every_carbond_name_spelled_in_the_package_is_declared() -> None:
    found = names_in_package()
    wrong = {name: files for name, files in found.items() if name in undeclared([name])}
    assert wrong == {}, "not a declared family (carbond/exporter/families.py) nor one of its samples"
    # the consumers that read carbond's own series are among what was scanned
    assert "job/daemon.py" in found["carbond_tick_duration_seconds_count"]
    assert "slurm/report.py" in found["carbond_cgroup_energy_joules_total"]
    assert "budgets.py" in found["carbond_cgroup_emissions_grams_total"]
    assert NOT_METRICS.keys() <= found.keys(), "an exception no file needs any more"
