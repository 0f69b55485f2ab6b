from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carbond.cli import main
from carbond.job.cgroup import place
from carbond.job.csvfile import COLUMNS, append_csv
from carbond.job.daemon import parse_scrape
from carbond.job.ledger import Ledger, Shares, shares
from carbond.job.modelcard import model_card
from carbond.job.report import Report, load_json, location
from carbond.job.text import summary
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from tests.harness.monitors import build_monitor
from tests.harness.snapshots import FR

from .conftest import burn

#: CodeCarbon 3.3.2's EmissionsData fields in its order (codecarbon/output_methods/emissions_data.py)
CODECARBON = [
    "timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions", "emissions_rate", "cpu_power",
    "gpu_power", "ram_power", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed", "water_consumed",
    "country_name", "country_iso_code", "region", "cloud_provider", "cloud_region", "os", "python_version",
    "codecarbon_version", "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude", "latitude",
    "ram_total_size", "tracking_mode", "cpu_utilization_percent", "gpu_utilization_percent",
    "ram_utilization_percent", "ram_used_gb", "on_cloud", "pue", "wue",
]  # fmt: skip


@pytest.fixture
def report(fake_config: Path, tmp_path: Path) -> Report:
    out = tmp_path / "r.json"
    args = ["--config", str(fake_config), "-q", "--attribution", "proctree", "--json", str(out), "--project", "cards"]
    rc = main(["measure", *args, "--", sys.executable, "-c", burn(0.3)])
    assert rc == 0
    return load_json(out)


def test_csv_is_a_codecarbon_superset_and_appends(report: Report, tmp_path: Path) -> None:
    path = tmp_path / "emissions.csv"
    assert append_csv(path, report) == []
    assert append_csv(path, report) == []
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[: len(CODECARBON)] == CODECARBON
    assert lines.count(lines[0]) == 1
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(rows) == 2
    assert list(rows[0]) == list(COLUMNS)
    row = rows[0]
    pue = 1.5
    # CodeCarbon's units and meanings: kg, kWh and W with the PUE applied; carbond's IT-only figures beside
    assert float(row["emissions"]) == pytest.approx(report.emissions_g / 1000)
    assert float(row["energy_consumed"]) == pytest.approx(report.energy_kwh * pue)
    assert float(row["it_energy_consumed"]) == pytest.approx(report.energy_kwh)
    parts = float(row["cpu_energy"]) + float(row["gpu_energy"]) + float(row["ram_energy"])
    assert parts == pytest.approx(float(row["energy_consumed"]))
    it_parts = float(row["it_cpu_energy"]) + float(row["it_gpu_energy"]) + float(row["it_ram_energy"])
    assert it_parts == pytest.approx(float(row["it_energy_consumed"]))
    assert float(row["cpu_power"]) == pytest.approx(float(row["cpu_energy"]) * 3.6e6 / float(row["duration"]))
    assert float(row["emissions_rate"]) == pytest.approx(float(row["emissions"]) / float(row["duration"]))
    assert float(row["machine_energy_consumed"]) == pytest.approx(float(row["machine_it_energy_consumed"]) * pue)
    assert (row["country_name"], row["country_iso_code"], row["tracking_mode"], row["on_cloud"]) == (
        "France", "FRA", "process", "N",
    )  # fmt: skip
    assert float(row["pue"]) == 1.5
    assert row["project_name"] == "cards"
    assert row["exit_code"] == "0"
    assert float(row["water_consumed"]) == 0.0
    assert float(row["wue"]) == 0.0
    assert 0 <= float(row["cpu_utilization_percent"]) <= 100
    assert float(row["ram_used_gb"]) > 0
    # GiB, as CodeCarbon: the fixture host's MemTotal in KiB / 1024**2
    mem_kib = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemT"))
    assert float(row["ram_total_size"]) == pytest.approx(mem_kib / 1024**2, abs=1e-3)
    assert row["energy_source"] == "estimated"  # the fake sensor's devices are models
    assert float(row["embodied_emissions"]) > 0
    ratio = float(row["emissions"]) * 1000 / float(row["it_energy_consumed"])
    assert math.isclose(ratio, float(row["intensity_g_per_kwh"]) * 1.5, rel_tol=1e-3)


def test_csv_keeps_an_existing_header_and_never_rewrites(report: Report, tmp_path: Path) -> None:
    path = tmp_path / "emissions.csv"
    old = ",".join(CODECARBON) + "\n" + ",".join(["x"] * len(CODECARBON))  # no final newline
    path.write_text(old)
    missing = append_csv(path, report)
    assert "carbond_version" in missing
    assert "timestamp" not in missing
    text = path.read_text()
    assert text.startswith(old + "\n")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(rows) == 2
    assert rows[1]["run_id"] == report.run_id
    assert None not in rows[1]


def test_json_round_trip_and_summary(report: Report, tmp_path: Path) -> None:
    path = tmp_path / "again.json"
    report.write_json(path)
    again = load_json(path)
    assert again == report
    text = summary(report)
    for word in (" J IT", "CO2e", "zone FR", "provider static", "PUE", "by car", "of TV", "proctree", "embodied"):
        assert word in text
    assert "e-0" not in text  # no exponents


def test_model_card_block(report: Report, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = model_card(report, "fine-tuning")["co2_eq_emissions"]
    assert list(card) == ["emissions", "source", "training_type", "geographical_location", "hardware_used"]
    assert card["emissions"] == pytest.approx(report.emissions_g, abs=1e-6)
    assert card["training_type"] == "fine-tuning"
    assert card["geographical_location"] == "France"
    assert "carbond" in card["source"]
    assert "PUE 1.5" in card["source"]
    # the fake sensor's figures are modelled: never called measured
    assert "estimated energy (power models)" in card["source"]
    assert "measured" not in card["source"]
    gpu = dataclasses.replace(report.devices[0], device="gpu-9", kind="gpu", measured=True, in_node_total=True)
    mixed = dataclasses.replace(report, devices=[*report.devices, gpu])
    source = model_card(mixed, "fine-tuning")["co2_eq_emissions"]["source"]
    assert "energy measured, with" in source
    assert "estimated by a power model" in source
    assert "gpu-9" not in source.partition("estimated")[0].partition("with")[2]
    path = tmp_path / "r.json"
    report.write_json(path)
    assert main(["report", "--model-card", str(path)]) == 0
    block = yaml.safe_load(capsys.readouterr().out)
    assert block["co2_eq_emissions"]["emissions"] == card["emissions"]
    assert main(["report", "--model-card", str(path), "--format", "json", "--location", "Paris, France"]) == 0
    assert json.loads(capsys.readouterr().out)["co2_eq_emissions"]["geographical_location"] == "Paris, France"
    assert main(["report", str(path)]) == 0
    assert "equivalents" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope.json")]) == 2


def test_location() -> None:
    assert location("FR")["country_iso_code"] == "FRA"
    assert location("US-CA")["region"] == "CA"
    assert location("US-CA")["country_name"]
    assert location("aws:eu-west-3")["cloud_provider"] == "aws"
    assert location("world")["country_name"] == ""


def test_ledger_shares_conserve_the_ratio() -> None:
    asyncio.run(_ledger_shares_conserve_the_ratio())


async def _ledger_shares_conserve_the_ratio() -> None:
    clock = ManualClock()
    devices = [FakeDevice("package-0", "cpu", 40.0), FakeDevice("dram-0", "dram", 6.0), FakeDevice("gpu-0", "gpu", 100)]
    sensor = FakeSensor(devices, clock)
    await sensor.start()
    mon = build_monitor(sensor, interval_s=1, pue=1.25, intensity=FR, clock=clock)  # fmt: skip
    await mon.prime()
    ledger = Ledger(0.0, 0.0)
    clock.advance(10)
    ledger.add(await mon.tick(), Shares(cpu=0.5, mem=0.25, gpu={"gpu-0": 0.1}))
    clock.advance(10)
    cp = ledger.add(await mon.tick(), None)  # whole machine
    job_j, job_g, machine_j, machine_g = cp.node_totals()
    assert machine_j == pytest.approx(146.0 * 20)
    assert job_j == pytest.approx(40 * 10 * 0.5 + 6 * 10 * 0.25 + 100 * 10 * 0.1 + 146.0 * 10)
    for j, g in ((job_j, job_g), (machine_j, machine_g)):
        assert g / (j / 3.6e6) == pytest.approx(56.0 * 1.25, rel=1e-9)


def test_daemon_scrape_parses_the_golden_exposition() -> None:
    text = (Path(__file__).parents[1] / "golden" / "metrics.txt").read_text()
    cp = parse_scrape(text, 0.0, 0.0)
    assert cp.node_totals()[0] == 2760.0
    assert cp.pue == 1.25
    assert cp.intensity is not None
    assert cp.intensity.zone == "FR"
    by_device = {d.device: d for d in cp.devices}
    assert not by_device["core-0"].in_node_total
    assert by_device["package-0"].in_node_total


def test_own_cgroup_placement_on_a_fixture_tree(tmp_path: Path) -> None:
    cgroupfs, procfs = tmp_path / "cgroup", tmp_path / "proc"
    own = cgroupfs / "user.slice" / "me.scope"
    own.mkdir(parents=True)
    (cgroupfs / "cgroup.controllers").write_text("cpu memory\n")
    (own / "cgroup.procs").write_text("")
    (procfs / "self").mkdir(parents=True)
    (procfs / "self" / "cgroup").write_text("0::/user.slice/me.scope\n")
    placement = place("cgroup", cgroupfs, procfs, "abc")
    assert placement.method == "cgroup", placement.notes
    job = own / "carbond-job-abc"
    proc = subprocess.Popen([*placement.prefix, sys.executable, "-c", "pass"], pass_fds=placement.pass_fds)
    probe = placement.spawned(proc.pid)
    assert proc.wait(timeout=10) == 0  # released once moved
    assert (job / "cgroup.procs").read_text().split() == [str(proc.pid)]
    assert probe is not None
    assert probe.method == "cgroup"
    (job / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (job / "memory.current").write_text("4096\n")
    usage = probe.sample()
    assert (usage.cpu_usec, usage.rss_bytes) == (1500.0, 4096.0)
    probe.finish(2000.0)
    assert probe.sample().cpu_usec == 2000.0
    placement.cleanup()


def test_placement_falls_back_to_the_process_tree_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    placement = place("cgroup", tmp_path / "cgroup", tmp_path / "proc", "abc")
    assert placement.method == "proctree"
    assert placement.notes == ["cgroup: no cgroup v2 hierarchy"]
    assert place("machine", tmp_path, tmp_path, "abc").spawned(1) is None


def test_shares_split_as_the_daemon_does() -> None:
    # half the machine busy; the job used 1 of the 2 busy CPU-seconds; 1 GB of 4 GB used; pid 7 has 60 % of gpu-0
    s = shares(1e6, 2e6, 4e6, 1e9, 4e9, {"gpu-0": {7: 0.6, 8: 0.4}, "gpu-1": {8: 1.0}}, frozenset({7, 9}))
    assert (s.cpu, s.mem) == (pytest.approx(0.25), pytest.approx(0.25))
    assert s.gpu == {"gpu-0": pytest.approx(0.6), "gpu-1": 0.0}
    assert s.of("psys", "psys") == s.cpu
    assert s.of("ram", "ram") == s.mem
    assert s.of("gpu", "gpu-0") == s.gpu["gpu-0"]
    # counters read at slightly different times: the job never gets more than the whole
    assert shares(5e6, 2e6, 4e6, 8e9, 4e9, {}, frozenset()).cpu == pytest.approx(0.5)
