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
CLOUD_CUSTOM = re.compile(r"\bEPYC \d+R\d+", re.IGNORECASE)
CCF_GPU_KG = 150.0  # Cloud Carbon Footprint's embodied kg per GPU
#: GCP shared-core machine types and their vCPUs (Google Cloud, "General-purpose machine family", shared-core
#: E2 and N1 types: e2-micro, e2-small, e2-medium 2 vCPUs time-shared; f1-micro, g1-small 1 vCPU).
GCP_SHARED_CORE = {"e2-micro": 2, "e2-small": 2, "e2-medium": 2, "f1-micro": 1, "g1-small": 1}
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


def build_subdivisions() -> int:
    """subdivisions.csv (code): every ISO 3166-2 subdivision code (``DE-BY``) from Debian's iso-codes, so a
    sub-zone the tables lack is accepted (as its country) only when it names a real subdivision."""
    codes = sorted(e["code"] for e in json.loads(ISO_CODES.with_name("iso_3166-2.json").read_text())["3166-2"])
    (HERE / "subdivisions.csv").write_text("code\n" + "".join(f"{c}\n" for c in codes), encoding="utf-8")
    return len(codes)


def build_cpus(shared: Path) -> tuple[int, list[str]]:
    """cpu_power.csv (Name, TDP, Threads): the reference table without its malformed rows, then the rows of
    ``upstream/cpu_power_extra.csv`` it lacks (Apple M1 Pro to M4 Max, each with its source there), then those of
    ``upstream/boavizta_cpu_specs.csv`` whose normalised name it lacks (desktop parts such as the i7-12700, the
    F/T/E variants, server parts). Threads come from Boavizta where it lists the part (empty otherwise), so a VM
    can be charged its share of a named part; Boavizta's ARM rows are left out (``arm_chips.csv`` holds them,
    without its SMT thread counts: those parts have one thread per core), and so are AWS's custom EPYC parts
    (7R13, 7R32 ...: AMD publishes no specification for them; a VM on one is modelled by its microarchitecture)."""
    from carbond.cpu_models import normalise

    fixed: list[str] = []
    out: list[list[str]] = []
    with (shared / "cpu_power.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            name, tdp = row["Name"].strip(), row["TDP"].strip()
            if not re.fullmatch(r"\d+(\.\d+)?", tdp):
                fixed.append(f"{name}: {tdp!r} dropped")
                continue
            out.append([name, tdp, ""])
    known = {name for name, _, _ in out}
    with (HERE / "upstream" / "cpu_power_extra.csv").open(newline="", encoding="utf-8") as fh:
        out.extend([row["Name"], row["TDP"], ""] for row in csv.DictReader(fh) if row["Name"] not in known)
    index = {normalise(name): i for i, (name, _, _) in enumerate(out)}
    with (HERE / "upstream" / "boavizta_cpu_specs.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["manufacturer"] not in ("Intel", "AMD") or CLOUD_CUSTOM.search(row["name"]):
                continue
            threads = row["threads"] if row["threads"] and float(row["threads"]) >= 1 else ""
            threads = str(int(float(threads))) if threads else ""
            norm = normalise(row["name"])
            if norm in index:
                if not out[index[norm]][2]:
                    out[index[norm]][2] = threads
                continue
            index[norm] = len(out)
            out.append([row["name"], row["tdp"], threads])
    with (HERE / "cpu_power.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Name", "TDP", "Threads"])
        w.writerows(out)
    return len(out), fixed


def build_embodied(shared: Path) -> int:
    """embodied_instances.csv (cloud, type, total_kg, gpu_kg) from Cloud Carbon Footprint's embodied tables, then
    the AWS and Azure types they lack from CCF's npm packages (``upstream/ccf_instance_embodied.json``: the host's
    tonnes, e.g. c6i, c6a, m6a, Dsv5), whose GPUs are CCF's 150 kg each (its per-GPU figure).

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
    npm = json.loads((HERE / "upstream" / "ccf_instance_embodied.json").read_text(encoding="utf-8"))
    known = {(c, _key(t)) for c, t in best}
    for cloud in ("aws", "azure"):
        gpus = {_key(t): n for t, n in npm[cloud]["gpus"].items()}
        for name, tonnes in npm[cloud]["embodied_t"].items():
            if (cloud, _key(name)) not in known:
                best[(cloud, name.strip())] = (tonnes * 1000.0, CCF_GPU_KG * gpus.get(_key(name), 0))
    with (HERE / "embodied_instances.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cloud", "type", "total_kg", "gpu_kg"])
        w.writerows([c, t, f"{total:.2f}", f"{gpu:.2f}"] for (c, t), (total, gpu) in sorted(best.items()))
    return len(best)


def _key(name: str) -> str:
    """An instance type as the tables are matched (``carbond.sensors.cpuhost.normalise_instance_type``)."""
    return re.sub(r"[\s_]+", "", name.strip().lower().removeprefix("standard_"))


def gcp_instances(shared: Path) -> list[list[object]]:
    """GCP rows for instance_vcpus.csv from CCF's GCP embodied table, which names each machine type with the
    microarchitectures it runs on but not its vCPUs: those are the type's trailing number (``n2-standard-8``), its
    host the largest of its series (n2: 128), as CCF sizes hosts. Shared-core types take their vCPUs from
    ``GCP_SHARED_CORE`` (f1 and g1 the N1 host); GPU types (no trailing vCPU count) are left out."""
    archs: dict[str, set[str]] = {}
    with (shared / "ccf_embodied_gcp.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            t = row["type"].strip()
            if re.fullmatch(r"[a-z0-9]+-[a-z0-9]+-\d+", t) or t in GCP_SHARED_CORE:
                a = row["microarchitecture"].strip()
                archs.setdefault(t, set()).add(f"AMD {a}" if a.startswith("EPYC") else a)
    vcpus = {t: GCP_SHARED_CORE.get(t) or int(t.rsplit("-", 1)[1]) for t in archs}
    host: dict[str, int] = {}
    for t, n in vcpus.items():
        host[t.split("-")[0]] = max(host.get(t.split("-")[0], 0), n)
    # f1/g1 are N1's shared-core types: N1's host
    series = {t: "n1" if t in ("f1-micro", "g1-small") else t.split("-")[0] for t in archs}
    return [
        ["gcp", t, vcpus[t], host.get(series[t], vcpus[t]), "|".join(sorted(a for a in archs[t] if a))] for t in archs
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
            rows.append([cloud, name.strip(), int(vcpus), int(host), "|".join(archs)])
    rows += gcp_instances(shared)
    with (HERE / "instance_vcpus.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cloud", "type", "vcpus", "host_vcpus", "microarchitectures"])
        w.writerows(sorted(rows))
    return len(rows)


def main(argv: list[str]) -> int:
    shared = Path(argv[0] if argv else "../shared/data")
    print(f"countries: {build_countries(shared)}")
    print(f"subdivisions: {build_subdivisions()}")
    counts, fixes = build_regions(shared, HERE / "region_intensity.csv")
    print(f"regions: {counts}; fixes: {fixes}")
    print(f"embodied instance types: {build_embodied(shared)}")
    print(f"instance vCPU counts: {build_instances(shared)}")
    count, fixed = build_cpus(shared)
    print(f"cpus: {count}; malformed rows: {fixed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
