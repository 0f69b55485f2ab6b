"""Embodied emissions on a VM: its share of its host from its instance type (Cloud Carbon Footprint's vCPU counts
and host sizes), else the threads of the part its cpuinfo names, else a median cloud host."""

from __future__ import annotations

from pathlib import Path

import pytest

from carbond.embodied import EmbodiedConfig, server_kg
from carbond.sensors.cpuhost import lookup_instance, vm_share
from tests.embodied.test_embodied import source_host_kg

# ---- a VM's share of its host from its instance type (Cloud Carbon Footprint's vCPU counts) -----------------------


def _ec2(root: Path, product: str, model: str = "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz") -> tuple[Path, Path]:
    """An EC2 VM: 2 vCPUs with the hypervisor flag, DMI vendor Amazon EC2 and product name ``product``."""
    proc = root / "proc"
    proc.mkdir(parents=True)
    cpus = "".join(f"processor\t: {i}\nmodel name\t: {model}\nflags\t\t: fpu hypervisor\n\n" for i in range(2))
    (proc / "cpuinfo").write_text(cpus)
    dmi = root / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("Amazon EC2\n")
    (dmi / "product_name").write_text(product + "\n")
    return proc, root / "sys"


@pytest.mark.parametrize(
    ("cloud", "type_", "vcpus", "host"),
    [
        ("aws", "m5.large", 2, 96),
        ("aws", "m6a.large", 2, 192),
        ("aws", "c5.24xlarge", 96, 96),
        ("azure", "D2s v3", 2, 64),
    ],
)
def test_instance_table_has_ccfs_vcpus_and_host(cloud: str, type_: str, vcpus: int, host: int) -> None:
    found = lookup_instance(cloud, type_)
    assert found is not None
    assert (found.vcpus, found.host_vcpus) == (vcpus, host)
    assert found.share == pytest.approx(vcpus / host)


def test_azure_imds_spelling_finds_the_instance() -> None:
    assert lookup_instance("azure", "Standard_D2s_v3") == lookup_instance("azure", "D2s v3")
    assert lookup_instance("aws", "m99.gigantic") is None
    assert lookup_instance(None, "m5.large") is None


def test_share_from_the_dmi_instance_type(tmp_path: Path) -> None:
    """An EC2 VM whose cpuinfo names no core count: the share is its type's vCPUs over the family's largest size."""
    proc, sysfs = _ec2(tmp_path, "m5.large")
    share, why = vm_share(proc, sysfs)
    assert share == pytest.approx(2 / 96)
    assert "m5.large" in why
    assert "Cloud Carbon Footprint" in why


def test_configured_instance_type_wins_over_dmi_and_cpuinfo(tmp_path: Path) -> None:
    proc, sysfs = _ec2(tmp_path, "m5.large", model="AMD EPYC 7763 64-Core Processor")
    share, why = vm_share(proc, sysfs, "m5.xlarge", "aws")
    assert share == pytest.approx(4 / 96)
    assert "embodied.instance_type" in why
    unknown, _ = vm_share(proc, sysfs, "m99.gigantic", "aws")  # unknown type: the part's threads (2/128)
    assert unknown == pytest.approx(2 / 128)


def test_dmi_instance_type_sizes_the_server(tmp_path: Path) -> None:
    proc, sysfs = _ec2(tmp_path, "p4d.24xlarge")
    kg, how = server_kg(EmbodiedConfig(), "FR", sysfs, proc)
    assert kg == pytest.approx(source_host_kg("aws", "p4d.24xlarge"))
    assert "DMI" in how


def test_build_embodied_charges_the_instance_share(tmp_path: Path) -> None:
    from carbond.builder import build_embodied
    from carbond.config import Config

    proc, sysfs = _ec2(tmp_path, "m5.large")
    cfg = Config(paths={"procfs": proc, "sysfs": sysfs}, embodied={"server_kg": 1000.0})
    e = build_embodied(cfg, "FR", None)
    assert e is not None
    e.advance(0.0, {})
    grams = dict(e.advance(3600.0, {}))["server"]
    assert grams == pytest.approx(1000.0 * 1000.0 * (2 / 96) * 3600.0 / (4.0 * 365.25 * 86_400))


def test_vm_of_unknown_host_is_charged_a_share_of_a_median_cloud_host(tmp_path: Path) -> None:
    """A 2-vCPU VM whose cpuinfo says only "AMD EPYC" and whose DMI names no type: not the whole server estimated
    from its own memory, but its vCPUs over a median CCF host, at that host's embodied kg."""
    from carbond.builder import build_embodied
    from carbond.config import Config
    from carbond.embodied import instance_table, typical_host
    from carbond.sensors.cpuhost import typical_host_vcpus

    proc, sysfs = _ec2(tmp_path, "", model="AMD EPYC")
    (sysfs / "class/dmi/id/sys_vendor").write_text("QEMU\n")
    (proc / "meminfo").write_text("MemTotal:       25165824 kB\n")
    host_vcpus, types = typical_host_vcpus(None)
    assert types > 100
    assert 32 <= host_vcpus <= 192
    kg, vcpus, how = typical_host(None)
    no_gpu = sorted(t for t, g in instance_table().values() if g == 0)
    assert no_gpu[0] <= kg <= no_gpu[-1]
    assert vcpus == host_vcpus
    assert "median" in how
    e = build_embodied(Config(paths={"procfs": proc, "sysfs": sysfs}), "FR", None)
    assert e is not None
    e.advance(0.0, {})
    grams = dict(e.advance(3600.0, {}))["server"]
    assert grams == pytest.approx(kg * 1000.0 * (2 / host_vcpus) * 3600.0 / (4.0 * 365.25 * 86_400))
    whole_own_estimate = 1000.0 * 1000.0 * 3600.0 / (4.0 * 365.25 * 86_400)
    assert grams < whole_own_estimate / 10


@pytest.mark.parametrize(
    ("type_", "vcpus", "host", "arch"),
    [
        ("n2-standard-8", 8, 128, "Cascade Lake"),
        ("n2d-standard-2", 2, 224, "AMD EPYC 2nd Gen"),
        ("c2-standard-60", 60, 60, "Cascade Lake"),
    ],
)
def test_gcp_types_are_sized_from_their_names_and_series(type_: str, vcpus: int, host: int, arch: str) -> None:
    found = lookup_instance("gcp", type_)
    assert found is not None
    assert (found.vcpus, found.host_vcpus) == (vcpus, host)
    assert arch in found.microarchitectures


@pytest.mark.parametrize(("type_", "vcpus", "host"), [("e2-micro", 2, 32), ("e2-medium", 2, 32), ("f1-micro", 1, 96)])
def test_gcp_shared_core_types_have_their_listed_vcpus_on_their_series_host(type_: str, vcpus: int, host: int) -> None:
    """Shared-core types name no vCPU count: GCP lists e2-micro/small/medium with 2 vCPUs on the E2 host (the largest
    e2 is 32), f1-micro with 1 on N1's (96)."""
    found = lookup_instance("gcp", type_)
    assert found is not None
    assert (found.vcpus, found.host_vcpus) == (vcpus, host)


def test_configured_gcp_instance_type_sets_the_share(tmp_path: Path) -> None:
    proc, sysfs = _ec2(tmp_path, "", model="Intel(R) Xeon(R) CPU @ 2.80GHz")  # GCP masks the model number
    (sysfs / "class/dmi/id/sys_vendor").write_text("Google\n")
    (sysfs / "class/dmi/id/product_name").write_text("Google Compute Engine\n")
    share, why = vm_share(proc, sysfs, "n2-standard-8", "gcp")
    assert share == pytest.approx(8 / 128)
    assert "n2-standard-8" in why
