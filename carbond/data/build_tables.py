"""Dev tool: rebuild the shipped tables from the project's reference data.

    python -m carbond.data.build_tables ../shared/data

Writes country_intensity.csv (alpha3, alpha2, name, g_per_kwh, year, source) from global_energy_mix.json (Our
World in Data) and Debian's iso-codes for the alpha-2 codes; region_intensity.csv (zone, name, g_per_kwh,
factor_type, source, year) for sub-national zones and cloud regions (see :func:`build_regions`), partly from the
pinned upstream extracts in ``carbond/data/upstream/`` (not shipped in the wheel); embodied_instances.csv (see
:func:`build_embodied`) and instance_vcpus.csv (:func:`build_instances`); copies cpu_power.csv fixing its
malformed rows and adding the rows of ``upstream/cpu_power_extra.csv`` (:func:`build_cpus`).

A country whose OWID intensity is not positive (CAF reports 0 while it generates 0.15 TWh, all hydro) gets its
generation mix x the per-source lifecycle factors instead (source ``owid-mix``); one without generation is left
out and falls back to the world average with a warning.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from carbond.data.regions import build_regions, owid_mix_intensity

HERE = Path(__file__).parent
ISO_CODES = Path("/usr/share/iso-codes/json/iso_3166-1.json")


def build_countries(shared: Path) -> int:
    mix = json.loads((shared / "global_energy_mix.json").read_text())
    factors = json.loads((shared / "carbon_intensity_per_source.json").read_text())
    iso = {c["alpha_3"]: c["alpha_2"] for c in json.loads(ISO_CODES.read_text())["3166-1"]}
    rows = []
    for alpha3, entry in sorted(mix.items()):
        if alpha3 not in iso:
            continue
        value, source = float(entry["carbon_intensity"]), "owid"
        if value <= 0:
            derived = owid_mix_intensity(entry, factors)
            if derived is None:
                continue
            value, source = derived, "owid-mix"
        rows.append([alpha3, iso[alpha3], entry["country_name"], f"{value:.3f}", entry["year"], source])
    with (HERE / "country_intensity.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["alpha3", "alpha2", "name", "g_per_kwh", "year", "source"])
        w.writerows(rows)
    return len(rows)


def build_cpus(shared: Path) -> tuple[int, list[str]]:
    """cpu_power.csv (Name, TDP): the reference table without its malformed rows, then the rows of
    ``upstream/cpu_power_extra.csv`` it lacks (Apple M1 Pro to M4 Max, each with its source there)."""
    fixed: list[str] = []
    out = []
    with (shared / "cpu_power.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            name, tdp = row["Name"].strip(), row["TDP"].strip()
            if not re.fullmatch(r"\d+(\.\d+)?", tdp):
                fixed.append(f"{name}: {tdp!r} dropped")
                continue
            out.append([name, tdp])
    known = {name for name, _ in out}
    with (HERE / "upstream" / "cpu_power_extra.csv").open(newline="", encoding="utf-8") as fh:
        extra = [[row["Name"], row["TDP"]] for row in csv.DictReader(fh) if row["Name"] not in known]
    out.extend(extra)
    with (HERE / "cpu_power.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Name", "TDP"])
        w.writerows(out)
    return len(out), fixed


def build_embodied(shared: Path) -> int:
    """embodied_instances.csv (cloud, type, total_kg, gpu_kg) from Cloud Carbon Footprint's embodied tables.

    GCP lists some types once per CPU microarchitecture with different totals: the largest is kept (conservative).
    """
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for cloud in ("aws", "azure", "gcp"):
        with (shared / f"ccf_embodied_{cloud}.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                key = (cloud, row["type"].strip())
                value = (float(row["total"]), float(row["additional_gpus"]))
                if key not in best or value[0] > best[key][0]:
                    best[key] = value
    with (HERE / "embodied_instances.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cloud", "type", "total_kg", "gpu_kg"])
        w.writerows([c, t, f"{total:.2f}", f"{gpu:.2f}"] for (c, t), (total, gpu) in sorted(best.items()))
    return len(best)


def gcp_instances(shared: Path) -> list[list[object]]:
    """GCP rows for instance_vcpus.csv from CCF's GCP embodied table, which names each machine type with the
    microarchitectures it runs on but not its vCPUs: those are the type's trailing number (``n2-standard-8``), its
    host the largest of its series (n2: 128), as CCF sizes hosts. Shared-core and GPU types (no trailing vCPU count)
    are left out."""
    archs: dict[str, set[str]] = {}
    with (shared / "ccf_embodied_gcp.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            t = row["type"].strip()
            if re.fullmatch(r"[a-z0-9]+-[a-z0-9]+-\d+", t):
                a = row["microarchitecture"].strip()
                archs.setdefault(t, set()).add(f"AMD {a}" if a.startswith("EPYC") else a)
    host: dict[str, int] = {}
    for t in archs:
        series, vcpus = t.split("-")[0], int(t.rsplit("-", 1)[1])
        host[series] = max(host.get(series, 0), vcpus)
    return [
        ["gcp", t, int(t.rsplit("-", 1)[1]), host[t.split("-")[0]], "|".join(sorted(a for a in archs[t] if a))]
        for t in archs
    ]


def build_instances(shared: Path) -> int:
    """instance_vcpus.csv (cloud, type, vcpus, host_vcpus, microarchitectures) from ``upstream/ccf_instances.json``:
    each AWS and Azure instance type's vCPUs, those of the largest size of its family or series (Cloud Carbon
    Footprint's stand-in for the whole host, its embodied ``largestInstancevCpu``) and the CPU microarchitectures
    CCF maps it to ("|"-separated, empty where CCF names none or only "Unknown")."""
    data = json.loads((HERE / "upstream" / "ccf_instances.json").read_text(encoding="utf-8"))
    rows = []
    for cloud in ("aws", "azure"):
        for name, (vcpus, host, archs) in data[cloud]["instances"].items():
            archs = [a for a in archs if a and a != "Unknown"]
            rows.append([cloud, name, int(vcpus), int(host), "|".join(archs)])
    rows += gcp_instances(shared)
    with (HERE / "instance_vcpus.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cloud", "type", "vcpus", "host_vcpus", "microarchitectures"])
        w.writerows(sorted(rows))
    return len(rows)


def main(argv: list[str]) -> int:
    shared = Path(argv[0] if argv else "../shared/data")
    print(f"countries: {build_countries(shared)}")
    counts, fixes = build_regions(shared, HERE / "region_intensity.csv")
    print(f"regions: {counts}; fixes: {fixes}")
    print(f"embodied instance types: {build_embodied(shared)}")
    print(f"instance vCPU counts: {build_instances(shared)}")
    count, fixed = build_cpus(shared)
    print(f"cpus: {count}; malformed rows: {fixed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
