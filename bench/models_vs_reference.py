"""carbond's CPU power models against published, measurement-derived reference power at several loads.

For every server CPU (Intel Xeon, AMD EPYC) of Boavizta's CPU table that carbond's TDP table also knows, carbond's
figure is computed through its own code (``lookup_part``, ``choose``, ``load_factor``, ``CpuModel.power``) for four
of its methods and compared with two references:

- **CCF** (``bench/reference/ccf_watts_per_vcpu.csv``): Cloud Carbon Footprint's average minimum and maximum watts
  per hardware thread of each microarchitecture, averages of SPECpower_ssj2008 results (whole-server wall power
  over hardware threads). Compared at 0 % and 100 % load only: those are the two averaged measurements, the points
  between are CCF's own linear interpolation.
- **Boavizta** (read at run time from the ``boaviztapi`` wheel, AGPL-3.0, not copied here): the CPU consumption
  profile ``a ln(b (load + c)) + d`` fitted per Xeon model range, at 0, 10, 50 and 100 % load (the load levels of
  the fit's source). The "Xeon E3" profile is left out: its parameters are those of another range (517 W at full
  load for parts of 25-95 W TDP), a placeholder rather than a fit.

Methods, each as :func:`carbond.sensors.cpuhost.choose` picks it for the situation built here:

- ``tdp``: bare metal, one socket of the part, its TDP from carbond's table along the load curve;
- ``tdp-vcpu-share``: a VM of 8 vCPUs (fewer when the part has fewer threads) whose cpuinfo names the part's core
  count, reference scaled by vCPUs / the part's threads;
- ``ccf-vcpu``: the same VM on AWS with a part carbond's table does not know, so the microarchitecture comes from
  the model name; its CCF comparison uses the same coefficients and only checks that inference;
- ``per-thread-default``: bare metal with a CPU not in the table, 4 W per thread x the part's threads.

Error ``e = carbond / reference - 1``. A point is covered by k bands when ``|carbond - reference| <= k x band x
carbond``: the band is stated relative to the figure carbond reports (:data:`carbond.uncertainty.METHODS`).

Run: ``.venv/bin/python -m bench.models_vs_reference`` (downloads the pinned wheel once into ``bench/out/wheels``
with pip; ``BOAVIZTAPI_WHEEL`` names another copy). Deterministic; a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from carbond.cpu_models import lookup_part, lookup_tdp
from carbond.sensors.cpuhost import CpuModel, Virtualisation, choose
from carbond.sensors.tdp import load_factor
from carbond.uncertainty import METHODS

ROOT = Path(__file__).parent.parent
REFERENCE = Path(__file__).parent / "reference"
OUT = Path(__file__).parent / "out"
BOAVIZTAPI = "2.5.0"
WHEEL = f"boaviztapi-{BOAVIZTAPI}-py3-none-any.whl"
WHEEL_SHA256 = "1f0a3b677a247cd9e0f11cb68c87661c4a18285c6754c71c96c0987b7f083cff"
CCF_LOADS = (0.0, 1.0)
BOAVIZTA_LOADS = (0.0, 0.10, 0.50, 1.00)
VM_VCPUS = 8
METHOD_NAMES = ("tdp", "tdp-vcpu-share", "ccf-vcpu", "per-thread-default")
#: Boavizta's code names (suffix after "-" dropped) -> CCF's microarchitecture names.
CODE_NAMES = {
    "Sandy Bridge": "Sandy Bridge",
    "Ivy Bridge": "Ivy Bridge",
    "Haswell": "Haswell",
    "Broadwell": "Broadwell",
    "Skylake": "Skylake",
    "Cascade Lake": "Cascade Lake",
    "Coffee Lake": "Coffee Lake",
    "Naples": "AMD EPYC 1st Gen",
    "Rome": "AMD EPYC 2nd Gen",
    "Milan": "AMD EPYC 3rd Gen",
}
PLACEHOLDER_PROFILES = frozenset({"Xeon E3"})
BARE = Virtualisation(False, "", "bench: bare metal")
VM = Virtualisation(True, "", "bench: VM")
AWS_VM = Virtualisation(True, "aws", "bench: AWS VM")


@dataclass(frozen=True, slots=True)
class RefCpu:
    name: str
    tdp: float  # Boavizta's (TechPowerUp's) TDP
    cores: int
    threads: int
    model_range: str
    microarchitecture: str | None  # CCF's name, where Boavizta's code name maps to one


@dataclass(frozen=True, slots=True)
class Point:
    reference: str
    method: str
    part: str
    load: float
    model_w: float
    ref_w: float

    @property
    def error(self) -> float:
        return self.model_w / self.ref_w - 1.0

    def covered(self, k: float) -> bool:
        return abs(self.model_w - self.ref_w) <= k * METHODS[f"tdp:{self.method}"].rel * self.model_w


def boavizta_wheel() -> Path:
    """The pinned boaviztapi wheel: ``BOAVIZTAPI_WHEEL``, else ``bench/out/wheels``, downloaded there by pip once."""
    if named := os.environ.get("BOAVIZTAPI_WHEEL"):
        return Path(named)
    wheel = OUT / "wheels" / WHEEL
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
        subprocess.run([*cmd, f"boaviztapi=={BOAVIZTAPI}", "-d", str(wheel.parent)], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def _csv(wheel: zipfile.ZipFile, member: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(wheel.read(f"boaviztapi/data/{member}").decode("utf-8"))))


def read_boavizta(path: Path) -> tuple[list[RefCpu], dict[str, Callable[[float], float]]]:
    """Boavizta's server CPUs (deduplicated, sorted by name) and its CPU consumption profiles by model range."""
    with zipfile.ZipFile(path) as wheel:
        specs = _csv(wheel, "crowdsourcing/cpu_specs.csv")
        profile_rows = _csv(wheel, "consumption_profile/cpu/cpu_profile.csv")
    parts: dict[str, RefCpu] = {}
    for row in sorted(specs, key=lambda r: r["name"]):
        if not row["model_range"].startswith(("Xeon", "EPYC")) or row["name"] in parts:
            continue
        try:
            tdp, cores, threads = float(row["tdp"]), int(float(row["cores"])), int(float(row["threads"]))
        except ValueError:
            continue
        arch = CODE_NAMES.get(row["code_name"].split("-")[0].strip())
        parts[row["name"]] = RefCpu(row["name"], tdp, cores, threads, row["model_range"], arch)
    profiles = {
        row["model_range"]: _log_profile(*(float(row[k]) for k in "abcd"))
        for row in profile_rows
        if row["model_range"] not in PLACEHOLDER_PROFILES
    }
    return list(parts.values()), profiles


def _log_profile(a: float, b: float, c: float, d: float) -> Callable[[float], float]:
    """Boavizta's profile: watts at a load in [0, 1] (its fit takes percent), at least 1 W as Boavizta clamps it."""
    return lambda u: max(a * math.log(b * (100.0 * u + c)) + d, 1.0)


def read_ccf() -> dict[str, tuple[float, float]]:
    with (REFERENCE / "ccf_watts_per_vcpu.csv").open(encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return {r["microarchitecture"]: (float(r["min_watts_per_vcpu"]), float(r["max_watts_per_vcpu"])) for r in rows}


def carbond_model(method: str, cpu: RefCpu) -> tuple[CpuModel, float] | None:
    """carbond's model of ``cpu`` by ``method`` and the share of one socket it covers; None when carbond's own
    choice for that situation is another method (the part is not in its table, no microarchitecture is inferred)."""
    vcpus = min(VM_VCPUS, cpu.threads)
    if method == "tdp":
        model = choose(model=cpu.name, table=lookup_part(cpu.name), override_w=None, virt=BARE, cpus=cpu.threads)
        share = 1.0
    elif method == "tdp-vcpu-share":
        name = f"{cpu.name} {cpu.cores}-Core Processor"  # as an AMD part's cpuinfo names it
        model = choose(model=name, table=lookup_part(name), override_w=None, virt=VM, cpus=vcpus)
        share = vcpus / cpu.threads
    elif method == "ccf-vcpu":  # a part the table does not know: the microarchitecture from the model name
        model = choose(model=cpu.name, table=None, override_w=None, virt=AWS_VM, cpus=vcpus)
        if model.detail.startswith("aws "):  # the cloud's average: no microarchitecture inferred
            return None
        share = vcpus / cpu.threads
    else:
        model = choose(model=cpu.name, table=None, override_w=None, virt=BARE, cpus=cpu.threads)
        share = 1.0
    return (model, share) if model.method == method else None


def points(parts: Sequence[RefCpu], profiles: dict[str, Callable[[float], float]]) -> list[Point]:
    ccf = read_ccf()
    out: list[Point] = []
    for part in parts:
        if lookup_part(part.name) is None:  # every method is compared on the same parts: those carbond's table knows
            continue
        for method in METHOD_NAMES:
            chosen = carbond_model(method, part)
            if chosen is None:
                continue
            model, share = chosen
            if part.microarchitecture in ccf:
                lo, hi = ccf[part.microarchitecture]
                for u in CCF_LOADS:
                    ref = share * part.threads * (lo + (hi - lo) * u)
                    out.append(Point("CCF", method, part.name, u, model.power(u, load_factor(u)), ref))
            if (profile := profiles.get(part.model_range)) is not None:
                for u in BOAVIZTA_LOADS:
                    ref = share * profile(u)
                    out.append(Point("Boavizta", method, part.name, u, model.power(u, load_factor(u)), ref))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pct(x: float) -> str:
    return f"{100.0 * x:+.0f} %"


def summary_row(label: str, pts: Sequence[Point]) -> str:
    errors = [p.error for p in pts]
    spread = [abs(p.model_w - p.ref_w) / p.model_w for p in pts]
    band = METHODS[f"tdp:{pts[0].method}"].rel
    cells = [
        label,
        f"{len(pts)} ({len({p.part for p in pts})})",
        pct(percentile(errors, 0.10)),
        pct(percentile(errors, 0.50)),
        pct(percentile(errors, 0.90)),
        f"{100.0 * sum(abs(e) for e in errors) / len(errors):.0f} %",
        pct(sum(errors) / len(errors)),
        f"{100.0 * band:.0f} %",
        f"{100.0 * sum(p.covered(1.0) for p in pts) / len(pts):.0f} %",
        f"{100.0 * sum(p.covered(2.0) for p in pts) / len(pts):.0f} %",
        f"{100.0 * percentile(spread, 0.68):.0f} % / {100.0 * percentile(spread, 0.95):.0f} %",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = [
    "| reference, method | points (parts) | p10 | p50 | p90 | mean abs | bias (mean) | stated band | within 1 band "
    "| within 2 bands | band covering 68 % / 95 % |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def groups(
    pts: Iterable[Point], key: Callable[[Point], tuple[str | float, ...]]
) -> dict[tuple[str | float, ...], list[Point]]:
    out: dict[tuple[str | float, ...], list[Point]] = {}
    for p in pts:
        out.setdefault(key(p), []).append(p)
    return out


def shape_table(pts: Sequence[Point]) -> list[str]:
    """The load curve alone: each side over its own figure at 100 % load, so the TDP's scale cancels out."""
    full = {(p.reference, p.method, p.part): p for p in pts if p.load == 1.0}
    rows = ["Load-curve shape alone (each side divided by its own 100 % figure; p50 error, p10 to p90):", ""]
    rows += ["| reference, curve | " + " | ".join(f"{100 * u:.0f} %" for u in BOAVIZTA_LOADS[:-1]) + " |"]
    rows += ["| --- |" + " ---: |" * (len(BOAVIZTA_LOADS) - 1)]
    for ref in ("CCF", "Boavizta"):
        for method, curve in (("tdp", "carbond load curve"), ("ccf-vcpu", "CCF linear"))[: 1 if ref == "CCF" else 2]:
            cells = []
            for u in BOAVIZTA_LOADS[:-1]:
                errs = [
                    (p.model_w / f.model_w) / (p.ref_w / f.ref_w) - 1.0
                    for p in pts
                    if (p.reference, p.method, p.load) == (ref, method, u)
                    and (f := full.get((p.reference, p.method, p.part))) is not None
                ]
                q = [pct(percentile(errs, x)) for x in (0.5, 0.1, 0.9)] if errs else []
                cells.append(f"{q[0]} ({q[1]} to {q[2]})" if q else "")
            rows.append(f"| {ref}, {curve} | " + " | ".join(cells) + " |")
    return rows


def tdp_agreement(parts: Sequence[RefCpu]) -> str:
    known = [(p, t[0]) for p in parts if (t := lookup_tdp(p.name)) is not None]
    same = sum(1 for p, tdp in known if abs(tdp - p.tdp) < 0.5)
    diffs = [abs(tdp / p.tdp - 1.0) for p, tdp in known if p.tdp > 0]
    return (
        f"carbond's TDP table names {len(known)} of Boavizta's {len(parts)} server CPUs; it agrees with Boavizta's "
        f"TDP (TechPowerUp) to 0.5 W for {same} of them ({100.0 * same / max(len(known), 1):.0f} %), median "
        f"relative difference {100.0 * percentile(diffs, 0.5):.1f} %, 90th percentile "
        f"{100.0 * percentile(diffs, 0.9):.1f} % (where the table took a part from Boavizta's list, agreement is by "
        "construction; the errors above are those of the models given a TDP, not of the table)."
    )


def report() -> str:
    wheel = boavizta_wheel()
    parts, profiles = read_boavizta(wheel)
    pts = points(parts, profiles)
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    by_model = groups(pts, lambda p: (p.reference, p.method))
    lines = [
        f"References: Cloud Carbon Footprint's SPECpower averages per microarchitecture (npm "
        f"@cloud-carbon-footprint/aws 0.15.0 and /azure 1.8.0, Apache-2.0; `bench/reference/`) at 0 and 100 % load; "
        f"Boavizta's CPU consumption profiles per Xeon model range (PyPI boaviztapi {BOAVIZTAPI}, AGPL-3.0, read "
        f"from the wheel, not copied) at 0, 10, 50, 100 % load. Parts: Boavizta's server CPUs that carbond's TDP "
        f"table knows; VMs of {VM_VCPUS} vCPUs. Error = carbond / reference - 1; a band covers a point when "
        f"|carbond - reference| <= k x band x carbond. Last column: the relative band that would cover 68 % / 95 % "
        f"of the points.",
        "",
        *HEADER,
    ]
    for key in sorted(by_model, key=lambda k: (k[0] != "CCF", order[str(k[1])])):
        ref, method = key
        label = f"{ref}, {method}" + (
            " (same coefficients: checks the microarchitecture inference only)"
            if (ref, method) == ("CCF", "ccf-vcpu")
            else ""
        )
        lines.append(summary_row(label, by_model[key]))
    lines += [
        "",
        "By load (p50 error, share within 1 band):",
        "",
        "| reference, method | " + " | ".join(f"{100 * u:.0f} %" for u in BOAVIZTA_LOADS) + " |",
        "| --- |" + " ---: |" * len(BOAVIZTA_LOADS),
    ]
    for key in sorted(by_model, key=lambda k: (k[0] != "CCF", order[str(k[1])])):
        per_load = groups(by_model[key], lambda p: (p.load,))
        cells = []
        for u in BOAVIZTA_LOADS:
            g = per_load.get((u,))
            cells.append(
                f"{pct(percentile([p.error for p in g], 0.5))}, {100.0 * sum(p.covered(1.0) for p in g) / len(g):.0f} %"
                if g
                else ""
            )
        lines.append(f"| {key[0]}, {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", *shape_table(pts)]
    by_range = groups((p for p in pts if p.reference == "Boavizta" and p.method == "tdp"), lambda p: (p.part,))
    ranges = {p.name: p.model_range for p in parts}
    per_range = groups((g[0] for g in by_range.values()), lambda p: (ranges[p.part],))
    lines += [
        "",
        "Parts per Boavizta model range: " + ", ".join(f"{k[0]} {len(v)}" for k, v in sorted(per_range.items())) + ".",
        "",
        tdp_agreement(parts),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    text = report()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "models_vs_reference.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
