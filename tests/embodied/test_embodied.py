"""Embodied emissions: amortisation, the server and GPU figures, the monitor, persistence and the config."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import importlib
import json
import math
import struct
import subprocess
import sys
import zlib
from collections.abc import MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from carbond import app, builder, cli, config, embodied
from carbond.embodied import Cloud, Embodied, EmbodiedConfig, gpu_kg, instance_table, machine_estimate, server_kg
from carbond.exporter.collector import SnapshotCollector, families
from carbond.model import Intensity, Snapshot
from carbond.monitor import Monitor
from carbond.sensors.cpuhost import normalise_instance_type
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.sensors.nvml import NvmlSensor
from carbond.sensors.rapl import MAX_POWER_W
from carbond.state import FORMAT, MAGIC, Persistence, SavedState, StateStore, decode, encode
from carbond.testing.clock import ManualClock
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import parse_metrics
from tests.harness.monitors import build_monitor

CCF = Path(__file__).resolve().parents[1] / "fixtures" / "ccf"  # source tables, see its README.md
YEAR_S = 365.25 * 24 * 3600
FR = Intensity(g_per_kwh=56.0, provider="static", zone="FR", observed_at=0.0)
GIB_KB = 1024 * 1024


def grams(kg: float, seconds: float, *, share: float = 1.0, years: float = 4.0) -> float:
    """SCI's M: kg (in g) x share x the fraction of the life that ``seconds`` is."""
    return kg * 1000.0 * share * seconds / (years * YEAR_S)


def fixture_host(root: Path, packages: list[int], mem_gib: int) -> tuple[Path, Path]:
    """A sysfs with one cpu dir per entry of ``packages`` (its physical_package_id) and a procfs with MemTotal."""
    sysfs, procfs = root / "sys", root / "proc"
    cpus = sysfs / "devices/system/cpu"
    for i, package in enumerate(packages):
        (cpus / f"cpu{i}/topology").mkdir(parents=True)
        (cpus / f"cpu{i}/topology/physical_package_id").write_text(f"{package}\n")
    (cpus / "cpufreq").mkdir(parents=True, exist_ok=True)  # not a cpu: ignored
    (cpus / "cpuidle").mkdir(parents=True, exist_ok=True)
    ProcTree(procfs, mem_kb=mem_gib * GIB_KB)
    return sysfs, procfs


def ccf_rows(cloud: str) -> list[dict[str, str]]:
    with (CCF / f"ccf_embodied_{cloud}.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def monitor(
    sensors: list[Any], clock: ManualClock, embodied: Embodied | None, persistence: Persistence | None = None
) -> Monitor:
    return build_monitor(
        *sensors,
        host="node-a",
        interval_s=15,
        intensity=FR,
        sensor_timeout_s=5,
        clock=clock,
        wall_clock=lambda: 1.7e9,
        persistence=persistence,
        embodied=embodied,
    )


# ---- amortisation ----------------------------------------------------------------------------------------------------


def test_first_call_and_standing_time_accrue_nothing() -> None:
    e = Embodied(EmbodiedConfig(), 1000.0)
    assert e.advance(5000.0, {}) == (("server", 0.0),)
    assert e.advance(5000.0, {}) == (("server", 0.0),)


def test_amortisation_is_linear_in_monotonic_time() -> None:
    e = Embodied(EmbodiedConfig(), 1000.0)
    e.advance(100.0, {})
    assert dict(e.advance(160.0, {}))["server"] == pytest.approx(1e6 * 60 / (4 * 365.25 * 86400), rel=1e-12)
    assert dict(e.advance(160.0, {}))["server"] == pytest.approx(grams(1000, 60), rel=1e-12)  # no time, no charge
    assert dict(e.advance(460.0, {}))["server"] == pytest.approx(grams(1000, 360), rel=1e-12)
    assert dict(e.totals()) == dict(e.advance(460.0, {}))


@pytest.mark.parametrize(("share", "years"), [(1.0, 4.0), (0.25, 4.0), (1.0, 6.0), (0.125, 2.5)])
def test_share_and_lifetime_scale_the_rate(share: float, years: float) -> None:
    e = Embodied(EmbodiedConfig(share=share, lifetime_years=years), 1000.0)
    e.advance(0.0, {})
    assert dict(e.advance(3600.0, {}))["server"] == pytest.approx(grams(1000, 3600, share=share, years=years))
    # a whole life charges the share of the whole server
    assert dict(e.advance(years * YEAR_S, {}))["server"] == pytest.approx(1e6 * share, rel=1e-9)


def test_gpus_accrue_at_their_own_rate_from_their_first_tick() -> None:
    e = Embodied(EmbodiedConfig(), 1000.0)
    e.advance(0.0, {"gpu-0": "NVIDIA H100 80GB HBM3"})
    totals = dict(e.advance(100.0, {"gpu-0": "NVIDIA H100 80GB HBM3", "gpu-1": "NVIDIA A100-SXM4-40GB"}))
    assert totals["server"] == pytest.approx(grams(1000, 100))
    assert totals["gpu-0"] == pytest.approx(grams(575, 100))
    assert "gpu-1" in totals
    totals = dict(e.advance(200.0, {}))  # devices once met keep accruing
    assert totals["gpu-0"] == pytest.approx(grams(575, 200))


def test_restored_totals_continue_and_unmet_devices_are_kept() -> None:
    restored = {"server": 50.0, "gpu-0": 7.0, "gpu-9": 3.0}
    e = Embodied(EmbodiedConfig(), 1000.0, restored)
    assert dict(e.advance(10.0, {"gpu-0": "NVIDIA H100 80GB HBM3"})) == {"server": 50.0, "gpu-0": 7.0}
    totals = dict(e.advance(70.0, {}))
    assert totals["server"] == pytest.approx(50.0 + grams(1000, 60))
    assert totals["gpu-0"] == pytest.approx(7.0 + grams(575, 60))
    assert e.saved()["gpu-9"] == 3.0  # not met in this run, not lost either
    assert restored == {"server": 50.0, "gpu-0": 7.0, "gpu-9": 3.0}  # the caller's dict is untouched


# ---- the server: this machine ----------------------------------------------------------------------------------------


def test_machine_estimate_counts_sockets_and_memory(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0, 0, 1, 1], mem_gib=64)
    kg, how = machine_estimate(sysfs, procfs)
    assert kg == pytest.approx(1000 + 100 * (2 - 1) + 1.39 * (64 - 16))
    assert "2 socket(s)" in how
    assert "64 GB" in how


def test_machine_estimate_small_machine_is_the_base(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0, 0], mem_gib=8)  # below 16 GB: no DRAM surcharge
    assert machine_estimate(sysfs, procfs)[0] == pytest.approx(1000.0)


def test_machine_estimate_without_files_is_one_socket_base(tmp_path: Path) -> None:
    kg, how = machine_estimate(tmp_path / "no-sys", tmp_path / "no-proc")
    assert kg == 1000.0
    assert "1 socket(s)" in how


def test_machine_estimate_malformed_meminfo_is_base_memory(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0, 1, 2], mem_gib=64)
    (procfs / "meminfo").write_text("MemTotal:       lots kB\n")
    assert machine_estimate(sysfs, procfs)[0] == pytest.approx(1000 + 100 * 2)


# ---- the server: cloud instance types ------------------------------------------------------------------------------


def source_host_kg(cloud: str, instance_type: str) -> float:
    """Total minus GPUs of the largest source row of that type (what build_embodied keeps)."""
    rows = [r for r in ccf_rows(cloud) if r["type"].strip() == instance_type]
    assert rows, f"{instance_type} not in the {cloud} source table"
    best = max(rows, key=lambda r: float(r["total"]))
    return float(best["total"]) - float(best["additional_gpus"])


def test_aws_p4d_counts_the_host_without_its_gpus(tmp_path: Path) -> None:
    cfg = EmbodiedConfig(instance_type="p4d.24xlarge", cloud="aws")
    kg, how = server_kg(cfg, "FR", tmp_path, tmp_path)
    row = next(r for r in ccf_rows("aws") if r["type"] == "p4d.24xlarge")
    assert float(row["additional_gpus"]) > 0  # the test would prove nothing otherwise
    assert kg == pytest.approx(float(row["total"]) - float(row["additional_gpus"]))
    assert "p4d.24xlarge" in how


def test_gcp_keeps_the_largest_microarchitecture_row(tmp_path: Path) -> None:
    rows = [r for r in ccf_rows("gcp") if r["type"] == "e2-standard-2"]
    totals = {float(r["total"]) for r in rows}
    assert len(totals) > 1  # the rows differ per microarchitecture
    kg, _ = server_kg(EmbodiedConfig(instance_type="e2-standard-2", cloud="gcp"), "FR", tmp_path, tmp_path)
    assert kg == pytest.approx(source_host_kg("gcp", "e2-standard-2"))
    assert kg == pytest.approx(max(totals))


@pytest.mark.parametrize("cloud", ["aws", "azure", "gcp"])
def test_shipped_table_matches_the_source(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    # server_kg reads the shipped table at each call (once at start-up); read once here for the hundreds of types
    monkeypatch.setattr(embodied, "instance_table", functools.cache(instance_table))
    best: dict[str, tuple[float, float]] = {}
    for r in ccf_rows(cloud):
        value = (float(r["total"]), float(r["additional_gpus"]))
        if r["type"].strip() not in best or value[0] > best[r["type"].strip()][0]:
            best[r["type"].strip()] = value
    shipped = {t: v for (c, t), v in instance_table().items() if c == cloud}
    source_keys = {normalise_instance_type(t) for t in best}  # the table's keys are normalised: "A1 v2" -> "a1v2"
    assert len(source_keys) == len(best)  # no two source types collapse into one lookup key
    # all of them, and for AWS and Azure the types CCF's npm packages add (c6i, Dsv5 ...), which its tables lack
    assert source_keys <= shipped.keys()
    assert (shipped.keys() == source_keys) == (cloud == "gcp")
    for type_, (total, gpus) in best.items():
        found = server_kg(
            EmbodiedConfig(instance_type=type_, cloud=cloud), "FR", Path("/nonexistent"), Path("/nonexistent")
        )
        assert found[0] == pytest.approx(total - gpus, abs=0.006), type_


@pytest.mark.parametrize("spelling", ["Standard_D2_v3", "standard_d2_v3", "D2 v3", "D2_v3", " Standard_D2_v3 "])
def test_azure_imds_spelling_matches_the_table(tmp_path: Path, spelling: str) -> None:
    assert ("azure", "D2 v3") in {(r["cloud"], r["type"]) for r in _shipped_rows()}
    kg, _ = server_kg(EmbodiedConfig(instance_type=spelling, cloud="azure"), "FR", tmp_path, tmp_path)
    assert kg == pytest.approx(source_host_kg("azure", "D2 v3"))
    assert kg != pytest.approx(machine_estimate(tmp_path, tmp_path)[0])


def _shipped_rows() -> list[dict[str, str]]:
    text = (Path(app.__file__).parent / "data/embodied_instances.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def test_cloud_comes_from_the_zone_when_unset(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0], mem_gib=16)
    cfg = EmbodiedConfig(instance_type="p4d.24xlarge")
    kg, _ = server_kg(cfg, "aws:eu-west-3", sysfs, procfs)
    assert kg == pytest.approx(source_host_kg("aws", "p4d.24xlarge"))
    # a zone without a cloud: the type cannot be looked up, the machine estimate stands
    assert server_kg(cfg, "FR", sysfs, procfs) == machine_estimate(sysfs, procfs)
    # embodied.cloud wins over the zone's cloud
    kg, how = server_kg(EmbodiedConfig(instance_type="e2-standard-2", cloud="gcp"), "aws:eu-west-3", sysfs, procfs)
    assert kg == pytest.approx(source_host_kg("gcp", "e2-standard-2"))
    assert "gcp" in how


def test_unknown_instance_type_falls_back_to_the_machine_estimate(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0, 1], mem_gib=64)
    with structlog.testing.capture_logs() as logs:
        kg, how = server_kg(EmbodiedConfig(instance_type="m99.gigantic"), "aws:eu-west-3", sysfs, procfs)
    assert (kg, how) == machine_estimate(sysfs, procfs)
    assert kg == pytest.approx(1000 + 100 + 1.39 * 48)
    assert [e["instance_type"] for e in logs if e["event"] == "embodied_instance_type_unknown"] == ["m99.gigantic"]


def test_server_kg_in_config_wins(tmp_path: Path) -> None:
    sysfs, procfs = fixture_host(tmp_path, packages=[0, 1], mem_gib=64)
    cfg = EmbodiedConfig(server_kg=1234.5, instance_type="p4d.24xlarge", cloud="aws")
    assert server_kg(cfg, "aws:eu-west-3", sysfs, procfs) == (1234.5, "config")
    assert server_kg(EmbodiedConfig(server_kg=0.0), "FR", sysfs, procfs) == (0.0, "config")  # 0 is a value


# ---- GPUs ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kg"),
    [
        ("NVIDIA H100 80GB HBM3", 575.0),
        ("NVIDIA H100 PCIe", 575.0),
        ("NVIDIA A100-SXM4-40GB", 319.0),
        ("nvidia a100-pcie-40gb", 319.0),  # case does not matter
        ("Tesla T4", 150.0),
        ("", 150.0),
    ],
)
def test_gpu_defaults(model: str, kg: float) -> None:
    assert gpu_kg(EmbodiedConfig(), model) == kg


def test_unknown_gpu_takes_the_configured_default() -> None:
    assert gpu_kg(EmbodiedConfig(default_gpu_kg=222.0), "AMD Instinct MI300X (energy counter)") == 222.0


@pytest.mark.parametrize("gpus", [{"A100 80GB": 400.0, "A100": 319.0}, {"A100": 319.0, "A100 80GB": 400.0}])
def test_the_more_specific_user_key_wins_whatever_the_order(gpus: dict[str, float]) -> None:
    cfg = EmbodiedConfig(gpus=gpus)
    assert gpu_kg(cfg, "NVIDIA A100 80GB PCIe") == 400.0
    assert gpu_kg(cfg, "NVIDIA A100-SXM4-40GB") == 319.0
    assert gpu_kg(cfg, "NVIDIA H100 80GB HBM3") == 150.0  # the user's table replaces the defaults


# ---- through the monitor and the exporter ----------------------------------------------------------------------------


def fake_nvml(gpus: list[str]) -> ModuleType:
    mod = importlib.import_module("carbond.testing.nvml_fake.pynvml")
    mod.nvmlShutdown()
    mod.configure(
        {
            "gpus": [
                {"name": name, "uuid": f"GPU-{i:08d}-aaaa-bbbb-cccc-dddddddddddd", "power_w": 100.0 + i}
                for i, name in enumerate(gpus)
            ]
        }
    )
    return mod


@pytest.mark.asyncio
async def test_gpus_are_their_own_embodied_devices_and_are_exported() -> None:
    clock = ManualClock()
    cpu = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    nvml = NvmlSensor(clock, module=fake_nvml(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "Tesla T4"]))
    await cpu.start()
    await nvml.start()
    try:
        mon = monitor([cpu, nvml], clock, Embodied(EmbodiedConfig(default_gpu_kg=222.0), 2000.0))
        first = await mon.tick()
        assert dict(first.node.embodied_g_total) == {"server": 0.0, "gpu-0": 0.0, "gpu-1": 0.0, "gpu-2": 0.0}
        for _ in range(4):
            clock.advance(15)
            snap = await mon.tick()
    finally:
        await nvml.close()
    expected = {"server": 2000.0, "gpu-0": 575.0, "gpu-1": 319.0, "gpu-2": 222.0}
    totals = dict(snap.node.embodied_g_total)
    assert totals.keys() == expected.keys()
    for device, kg in expected.items():
        assert totals[device] == pytest.approx(grams(kg, 60), rel=1e-9), device
    assert {d.device for d in snap.devices.states if d.kind == "gpu"} == {"gpu-0", "gpu-1", "gpu-2"}

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snap))
    metrics = parse_metrics(generate_latest(registry).decode())
    exported = {
        dict(labels)["device"]: value
        for (name, labels), value in metrics.items()
        if name == "carbond_embodied_emissions_grams_total"
    }
    assert exported.keys() == expected.keys()
    for device, kg in expected.items():
        assert exported[device] == pytest.approx(grams(kg, 60), rel=1e-6), device
    assert all(
        dict(labels)["host"] == "node-a"
        for (name, labels), _ in metrics.items()
        if name == "carbond_embodied_emissions_grams_total"
    )


@pytest.mark.asyncio
async def test_gpu_without_device_info_takes_the_default() -> None:
    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0), FakeDevice("gpu-0", "gpu", 250.0)], clock)
    await sensor.start()
    mon = monitor([sensor], clock, Embodied(EmbodiedConfig(), 1000.0))
    await mon.tick()
    clock.advance(30)
    totals = dict((await mon.tick()).node.embodied_g_total)
    assert totals == pytest.approx({"server": grams(1000, 30), "gpu-0": grams(150, 30)})


# ---- persistence -----------------------------------------------------------------------------------------------------


def embodied_config(tmp_path: Path, **embodied: Any) -> config.Config:
    return config.Config(
        embodied=EmbodiedConfig(**embodied),
        paths=config.PathsConfig(sysfs=tmp_path / "no-sys", procfs=tmp_path / "no-proc"),
        state_dir=tmp_path / "state",
    )


@pytest.mark.asyncio
async def test_restart_continues_from_the_saved_totals(tmp_path: Path) -> None:
    cfg = embodied_config(tmp_path, server_kg=1000.0)
    state_dir = tmp_path / "state"

    clock = ManualClock(1000.0)
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0), FakeDevice("gpu-0", "gpu", 300.0)], clock)
    await sensor.start()
    p1 = Persistence(StateStore(state_dir), "node-a", "boot-1", max_power_w=MAX_POWER_W)
    mon = monitor([sensor], clock, builder.build_embodied(cfg, "FR", p1), p1)
    await mon.tick()
    for _ in range(40):
        clock.advance(15)
        before = await mon.tick()
    p1.close()
    saved_by_first = dict(before.node.embodied_g_total)
    assert saved_by_first == pytest.approx({"server": grams(1000, 600), "gpu-0": grams(150, 600)})
    loaded = StateStore(state_dir).load("node-a")
    assert loaded is not None
    assert loaded.embodied_g_total == saved_by_first

    # the next run: a fresh monotonic clock, no GPU this time
    clock = ManualClock(10.0)
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await sensor.start()
    p2 = Persistence(StateStore(state_dir), "node-a", "boot-2", max_power_w=MAX_POWER_W)
    mon = monitor([sensor], clock, builder.build_embodied(cfg, "FR", p2), p2)
    history = [await mon.tick()]
    for _ in range(20):
        clock.advance(15)
        history.append(await mon.tick())
    p2.close()
    assert dict(history[0].node.embodied_g_total) == {"server": saved_by_first["server"]}  # continues, no reset
    servers = [dict(s.node.embodied_g_total)["server"] for s in history]
    assert servers == sorted(servers)  # the counter never goes back
    assert servers[-1] == pytest.approx(saved_by_first["server"] + grams(1000, 300))
    after = StateStore(state_dir).load("node-a")
    assert after is not None
    assert after.embodied_g_total["server"] == servers[-1]
    assert after.embodied_g_total["gpu-0"] == saved_by_first["gpu-0"]  # not met this run: kept as it was


@pytest.mark.asyncio
async def test_disabled_run_keeps_the_saved_embodied_totals(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = StateStore(state_dir)
    store.save(SavedState("node-a", "b", 1.7e9, embodied_g_total={"server": 12.5, "gpu-0": 3.0}))
    store.close()
    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await sensor.start()
    p = Persistence(StateStore(state_dir), "node-a", "b", max_power_w=MAX_POWER_W)
    cfg = embodied_config(tmp_path, enabled=False)
    mon = monitor([sensor], clock, builder.build_embodied(cfg, "FR", p), p)
    await mon.tick()
    clock.advance(15)
    assert (await mon.tick()).node.embodied_g_total == ()
    p.close()
    after = StateStore(state_dir).load("node-a")
    assert after is not None
    assert after.embodied_g_total == {"server": 12.5, "gpu-0": 3.0}


@pytest.mark.parametrize(
    "bad",
    [
        {"server": -1.0},
        {"server": math.nan},
        {"server": math.inf},
        {"server": "12"},
        {"server": True},
        {"server": None},
        {"server": [1.0]},
        {"server": 10**400},  # a JSON integer too large for a float
        [1.0, 2.0],
        "server",
        None,
    ],
)
@pytest.mark.asyncio
async def test_malformed_embodied_totals_are_rejected_not_a_crash(tmp_path: Path, bad: Any) -> None:
    state_dir = tmp_path / "state"
    store = StateStore(state_dir)
    doc = json.loads(encode(SavedState("node-a", "b", 1.7e9, node_energy_j_total=5000.0)))
    doc["embodied_g_total"] = bad
    store.write(json.dumps(doc).encode())
    store.close()
    with structlog.testing.capture_logs() as logs:
        p = Persistence(StateStore(state_dir), "node-a", "b", max_power_w=MAX_POWER_W)
    assert p.restored is None
    ignored = [e for e in logs if e["event"] == "state_ignored"]
    assert len(ignored) == 1
    assert "embodied_g_total" in ignored[0]["reason"]

    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await sensor.start()
    mon = monitor([sensor], clock, builder.build_embodied(embodied_config(tmp_path, server_kg=1000.0), "FR", p), p)
    await mon.tick()
    clock.advance(60)
    snap = await mon.tick()
    p.close()
    assert dict(snap.node.embodied_g_total) == pytest.approx({"server": grams(1000, 60)})  # from zero
    # the next save replaces the bad record with a good one
    again = StateStore(state_dir).load("node-a")
    assert again is not None
    assert again.embodied_g_total == dict(snap.node.embodied_g_total)


def older_doc() -> dict[str, Any]:
    """A state document as written before embodied accounting: no embodied_g_total key."""
    return {
        "format": FORMAT,
        "host": "node-a",
        "boot_id": "b",
        "saved_wall": 1.7e9,
        "node_energy_j_total": 5000.0,
        "node_emissions_g_total": 0.5,
        "devices": {"fake/package-0": {"energy_j_total": 5000.0, "emissions_g_total": 0.5}},
    }


def write_record(state_dir: Path, doc: dict[str, Any]) -> None:
    """One record in slot 1, in the on-disk layout StateStore documents (magic, seq, length, CRC-32, JSON)."""
    body = json.dumps(doc).encode()
    state_dir.mkdir(parents=True, exist_ok=True)
    header = struct.pack("<8sQII", MAGIC, 1, len(body), zlib.crc32(body))
    (state_dir / "counters.state").write_bytes(b"\0" * (1 << 20) + header + body)


@pytest.mark.asyncio
async def test_older_state_without_embodied_loads_empty(tmp_path: Path) -> None:
    assert decode(older_doc(), "node-a").embodied_g_total == {}
    state_dir = tmp_path / "state"
    write_record(state_dir, older_doc())
    p = Persistence(StateStore(state_dir), "node-a", "b", max_power_w=MAX_POWER_W)
    assert p.restored is not None
    assert p.restored.embodied_g_total == {}
    assert p.node_totals() == (5000.0, 0.5)  # the rest of the file is used

    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    await sensor.start()
    mon = monitor([sensor], clock, builder.build_embodied(embodied_config(tmp_path, server_kg=1000.0), "FR", p), p)
    await mon.tick()
    clock.advance(60)
    snap = await mon.tick()
    p.close()
    assert dict(snap.node.embodied_g_total) == pytest.approx({"server": grams(1000, 60)})
    assert snap.node.energy_j_total == pytest.approx(5000.0 + 40.0 * 60)


# ---- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("embodied:\n  lifetime_years: 0\n", "embodied.lifetime_years"),
        ("embodied:\n  lifetime_years: -4\n", "embodied.lifetime_years"),
        ("embodied:\n  share: 2\n", "embodied.share"),
        ("embodied:\n  share: 0\n", "embodied.share"),
        ("embodied:\n  server_kg: -1\n", "embodied.server_kg"),
        ("embodied:\n  cloud: oracle\n", "embodied.cloud"),
        ("embodied:\n  gpus: {H100: -5}\n", "embodied.gpus.H100"),
        ("embodied:\n  default_gpu_kg: lots\n", "embodied.default_gpu_kg"),
        ("embodied:\n  instance_typ: m5.large\n", "embodied.instance_typ"),
    ],
)
def test_bad_embodied_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key}:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "key"), [("lifetime_years: 0", "embodied.lifetime_years"), ("share: 2", "embodied.share")]
)
def test_check_config_process_exits_2(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"embodied:\n  {text}\n")
    out = subprocess.run(
        [sys.executable, "-m", "carbond", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert key in out.stderr
    assert "Traceback" not in out.stderr


def test_good_embodied_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "embodied:\n  lifetime_years: 6\n  share: 0.5\n  instance_type: m5.large\n  cloud: aws\n"
        "  gpus: {'A100 80GB': 400, A100: 319}\n  default_gpu_kg: 200\n"
    )
    assert cli.main(["check-config", str(path)]) == 0
    cfg = config.load(path)
    assert cfg.embodied.gpus == {"A100 80GB": 400.0, "A100": 319.0}
    assert cfg.embodied.share == 0.5
    assert cfg.embodied.lifetime_years == 6.0


async def daemon_snapshot(tmp_path: Path, embodied: str) -> tuple[Snapshot, list[MutableMapping[str, Any]]]:
    """The snapshot of the daemon's own pipeline (carbond.builder.build_monitor) on a fake sensor."""
    path = tmp_path / "c.yaml"
    path.write_text(
        f"sensors: [fake]\nstate_dir: {tmp_path / 'state'}\nattribution: {{enabled: false}}\n"
        f"paths: {{sysfs: {tmp_path / 'no-sys'}, procfs: {tmp_path / 'no-proc'}}}\n"
        f"intensity: {{zone: 'aws:eu-west-3'}}\nembodied: {embodied}\n"
    )
    cfg = config.load(path)
    with structlog.testing.capture_logs() as logs:
        async with contextlib.AsyncExitStack() as stack:
            mon, _ = await builder.build_monitor(cfg, stack)
            stop = asyncio.Event()
            stop.set()
            await mon.run(stop)  # baseline read, then the final tick
    snap = mon.latest()
    assert snap is not None
    return snap, logs


@pytest.mark.asyncio
async def test_disabled_embodied_exports_nothing(tmp_path: Path) -> None:
    snap, logs = await daemon_snapshot(tmp_path, "{enabled: false}")
    assert snap.node.embodied_g_total == ()
    assert "carbond_embodied_emissions_grams" not in {f.name for f in families(snap)}
    assert not [e for e in logs if e["event"] == "embodied_server"]
    assert builder.build_embodied(config.Config(embodied=EmbodiedConfig(enabled=False)), "FR", None) is None


@pytest.mark.asyncio
async def test_enabled_embodied_takes_the_instance_type_from_the_zone(tmp_path: Path) -> None:
    snap, logs = await daemon_snapshot(tmp_path, "{instance_type: p4d.24xlarge}")
    assert [device for device, _ in snap.node.embodied_g_total] == ["server"]
    assert "carbond_embodied_emissions_grams" in {f.name for f in families(snap)}
    (line,) = [e for e in logs if e["event"] == "embodied_server"]
    assert line["kg"] == pytest.approx(source_host_kg("aws", "p4d.24xlarge"), abs=0.05)
