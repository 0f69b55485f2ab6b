"""Dev tool: rebuild the shipped tables from the project's reference data.

    python -m carbond.data.build_tables ../shared/data

Writes country_intensity.csv (alpha3, alpha2, name, g_per_kwh, year) from global_energy_mix.json (Our World in
Data) and Debian's iso-codes for the alpha-2 codes; region_intensity.csv (zone, name, g_per_kwh, factor_type,
source, year) for sub-national zones and cloud regions (see :func:`build_regions`); embodied_instances.csv (see
:func:`build_embodied`); copies cpu_power.csv fixing its
malformed rows. Countries with a non-positive intensity (CAF reports 0) are left out so they fall back to the world
average with a warning instead of claiming zero emissions.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from carbond.data.regions import build_regions

HERE = Path(__file__).parent
ISO_CODES = Path("/usr/share/iso-codes/json/iso_3166-1.json")


def build_countries(shared: Path) -> int:
    mix = json.loads((shared / "global_energy_mix.json").read_text())
    iso = {c["alpha_3"]: c["alpha_2"] for c in json.loads(ISO_CODES.read_text())["3166-1"]}
    rows = []
    for alpha3, entry in sorted(mix.items()):
        value = float(entry["carbon_intensity"])
        if value <= 0 or alpha3 not in iso:
            continue
        rows.append([alpha3, iso[alpha3], entry["country_name"], f"{value:.3f}", entry["year"]])
    with (HERE / "country_intensity.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["alpha3", "alpha2", "name", "g_per_kwh", "year"])
        w.writerows(rows)
    return len(rows)


def build_cpus(shared: Path) -> tuple[int, list[str]]:
    fixed: list[str] = []
    out = []
    with (shared / "cpu_power.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            name, tdp = row["Name"].strip(), row["TDP"].strip()
            if not re.fullmatch(r"\d+(\.\d+)?", tdp):
                fixed.append(f"{name}: {tdp!r} dropped")
                continue
            out.append([name, tdp])
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


def main(argv: list[str]) -> int:
    shared = Path(argv[0] if argv else "../shared/data")
    print(f"countries: {build_countries(shared)}")
    counts, fixes = build_regions(shared, HERE / "region_intensity.csv")
    print(f"regions: {counts}; fixes: {fixes}")
    print(f"embodied instance types: {build_embodied(shared)}")
    count, fixed = build_cpus(shared)
    print(f"cpus: {count}; malformed rows: {fixed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
