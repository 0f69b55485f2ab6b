"""Issue 29, embodied emissions: jobs and the daemon by one rule, a container's quota, CCF's instance types that the
embodied CSV lacked, GCP's shared-core types, and the instance type's cloud from DMI.

Through the CLI (``carbond measure --json``, in-process) and the real daemon, on fixture /proc and /sys trees.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import cli
from carbond.embodied import instance_table
from carbond.sensors.cpuhost import lookup_instance, typical_host_vcpus
from tests.harness.daemon import Daemon
from tests.sensors.test_issue29_cpu import machine


def measure(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``carbond measure --json`` of ``true`` on the configured machine; the report."""
    path, out = tmp_path / "measure.yaml", tmp_path / "report.json"
    path.write_text(yaml.safe_dump({"sensors": ["tdp"], **config}))
    assert cli.main(["measure", "--config", str(path), "--json", str(out), "-q", "--", "true"]) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def detail_share(detail: str) -> float:
    found = re.search(r"host share ([\d.e-]+)", detail)
    assert found is not None, detail
    return float(found.group(1))


def daemon_embodied(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    tmp_path.mkdir(exist_ok=True)
    with Daemon(tmp_path, {"sensors": ["tdp"], **config}) as d:
        log = d.wait_for_log('"embodied_server"')
    (event,) = [json.loads(x) for x in log.splitlines() if '"embodied_server"' in x]
    return event


def test_measure_and_daemon_charge_a_masked_vm_alike(tmp_path: Path) -> None:
    """A VM whose host cannot be sized: the daemon charged its vCPUs' share of a median cloud host while jobs
    charged a whole estimated server (share 1). Both now take the one rule."""
    paths = machine(tmp_path / "m", vm=True, cpus=2)
    daemon = daemon_embodied(tmp_path / "d", {"paths": paths})
    report = measure(tmp_path, {"paths": paths})
    host_vcpus, _ = typical_host_vcpus(None)
    assert daemon["share"] == pytest.approx(2 / host_vcpus, rel=1e-3)
    assert detail_share(report["embodied_detail"]) == pytest.approx(daemon["share"], rel=1e-2)
    assert f"server {daemon['kg']:.0f} kg" in report["embodied_detail"]
    assert "median CCF cloud host" in report["embodied_detail"]


def test_container_quota_limits_the_embodied_share(tmp_path: Path) -> None:
    """1.5 CPUs of a 64-CPU machine: the CPU is charged 1.5/64 and so, now, is the hardware."""
    paths = machine(tmp_path / "m", cpus=64, model="AMD EPYC 7763 64-Core Processor", quota="150000 100000")
    daemon = daemon_embodied(tmp_path / "d", {"paths": paths})
    assert daemon["share"] == pytest.approx(1.5 / 64, rel=1e-3)
    report = measure(tmp_path, {"paths": paths})
    assert detail_share(report["embodied_detail"]) == pytest.approx(1.5 / 64, rel=1e-2)
    assert "cpu.max quota" in daemon_share_source(tmp_path / "d")


def daemon_share_source(workdir: Path) -> str:
    log = (workdir / "carbond.log").read_text()
    (event,) = [json.loads(x) for x in log.splitlines() if '"embodied_share"' in x]
    return str(event["source"])


@pytest.mark.parametrize(
    ("cloud", "type_", "kg"),
    [
        ("aws", "c6i.large", 1332.9),
        ("aws", "c6a.xlarge", 1510.4),
        ("aws", "m6a.large", 2042.9),
        ("azure", "D2s v5", 1510.4),
    ],
)
def test_ccf_types_missing_from_the_embodied_csv_now_have_their_host(cloud: str, type_: str, kg: float) -> None:
    assert instance_table()[(cloud, type_.lower().replace(" ", ""))][0] == pytest.approx(kg)


def test_every_sized_instance_type_has_an_embodied_figure() -> None:
    """No instance type with vCPUs falls to a 1,000 kg estimate but Azure's A-series, for which CCF has none."""
    from carbond.sensors.cpuhost import _instances

    table = instance_table()
    missing = [t for key, t in _instances().items() if key not in table]
    assert all(t.cloud == "azure" and re.fullmatch(r"A\d+", t.name) for t in missing), missing


def test_ec2_c6i_found_through_dmi_gets_its_ccf_host(tmp_path: Path) -> None:
    paths = machine(tmp_path / "m", vm=True, cpus=2, dmi=("Amazon EC2", "c6i.large"))
    report = measure(tmp_path, {"paths": paths, "intensity": {"zone": "FR"}})
    assert "server 1333 kg (ccf aws c6i.large" in report["embodied_detail"]
    assert detail_share(report["embodied_detail"]) == pytest.approx(2 / 96, rel=1e-2)


def test_unknown_type_found_through_dmi_warns(tmp_path: Path) -> None:
    paths = machine(tmp_path / "m", vm=True, cpus=2, dmi=("Amazon EC2", "zz9.large"))
    (tmp_path / "d").mkdir()
    with Daemon(tmp_path / "d", {"sensors": ["tdp"], "paths": paths}) as d:
        log = d.wait_for_log('"embodied_server"')
    (event,) = [json.loads(x) for x in log.splitlines() if '"embodied_instance_type_unknown"' in x]
    assert event["instance_type"] == "zz9.large"
    assert event["source"] == "DMI product name"


@pytest.mark.parametrize(("type_", "vcpus"), [("e2-micro", 2), ("e2-small", 2), ("e2-medium", 2)])
def test_gcp_shared_core_types_are_shares_of_the_e2_host(tmp_path: Path, type_: str, vcpus: int) -> None:
    found = lookup_instance("gcp", type_)
    assert found is not None
    assert (found.vcpus, found.host_vcpus) == (vcpus, 32)
    paths = machine(tmp_path / "m", vm=True, cpus=2, dmi=("Google", "Google Compute Engine"))
    report = measure(tmp_path, {"paths": paths, "embodied": {"instance_type": type_}})
    assert detail_share(report["embodied_detail"]) == pytest.approx(2 / 32, rel=1e-2)


def test_instance_type_without_cloud_takes_dmis_cloud(tmp_path: Path) -> None:
    """embodied.instance_type alone, the zone naming no cloud: DMI says GCP, so n2-standard-8 is looked up there
    for the hardware and for the CPU model (n2: Cascade Lake), not estimated with the cloud-average CPU."""
    paths = machine(tmp_path / "m", vm=True, cpus=8, dmi=("Google", "Google Compute Engine"))
    cfg = {"paths": paths, "intensity": {"zone": "BE"}, "embodied": {"instance_type": "n2-standard-8"}}
    report = measure(tmp_path, cfg)
    assert "ccf gcp n2-standard-8" in report["embodied_detail"]
    assert detail_share(report["embodied_detail"]) == pytest.approx(8 / 128, rel=1e-2)
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump({"sensors": ["tdp"], **cfg}))
    assert cli.main(["probe", "--config", str(path), "--seconds", "0.05"]) == 0
