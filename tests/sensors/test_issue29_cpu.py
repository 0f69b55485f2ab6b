"""Issue 29, CPU power model on machines as users meet them: a configured model name, cpu.tdp_watts and
cpu.power_watts on a VM, ARM servers named by their implementer/part, desktop parts by table, suffix and family.

Each machine is a fixture /proc and /sys tree; `carbond probe` (the CLI, in-process) or the real daemon reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import cli
from carbond.cpu_models import arm_part, lookup_part
from carbond.testing.procfs import ProcTree
from tests.harness.daemon import Daemon

ARM_CPUINFO = (
    "processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"
    "CPU implementer\t: {impl}\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: {part}\nCPU revision\t: 1\n"
)


def machine(
    root: Path,
    *,
    model: str = "Intel(R) Xeon(R) Processor",
    cpus: int = 2,
    vm: bool = False,
    dmi: tuple[str, str] | None = None,
    arm: tuple[str, str] | None = None,
    quota: str | None = None,
) -> dict[str, str]:
    """A fixture machine: its cpuinfo (x86, or ARM from (implementer, part)), DMI, and a container's cpu.max."""
    proc, sysfs, cgroup = root / "proc", root / "sys", root / "cgroup"
    ProcTree(proc, model=model, cpus_per_socket=cpus, flags="fpu hypervisor" if vm else "fpu")
    if arm is not None:
        (proc / "cpuinfo").write_text("\n".join(ARM_CPUINFO.format(n=i, impl=arm[0], part=arm[1]) for i in range(cpus)))
    (sysfs / "class/dmi/id").mkdir(parents=True)
    if dmi is not None:
        (sysfs / "class/dmi/id/sys_vendor").write_text(dmi[0] + "\n")
        (sysfs / "class/dmi/id/product_name").write_text(dmi[1] + "\n")
    cgroup.mkdir()
    if quota is not None:
        (proc / "self").mkdir()
        (proc / "self/cgroup").write_text("0::/\n")
        (cgroup / "cpu.max").write_text(quota + "\n")
    return {"procfs": str(proc), "sysfs": str(sysfs), "cgroupfs": str(cgroup)}


def probe(tmp_path: Path, capsys: pytest.CaptureFixture[str], paths: dict[str, str], **config: Any) -> str:
    path = tmp_path / "carbond.yaml"
    path.write_text(yaml.safe_dump({"paths": paths, "sensors": ["tdp"], **config}))
    capsys.readouterr()
    assert cli.main(["probe", "--config", str(path), "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    (line,) = [row for row in out.splitlines() if row.startswith("tdp ")]
    return line


def test_configured_model_is_one_name_and_reaches_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cpu.model was joined letter by letter ("A M D   E P Y C   7 7 6 3") and never found."""
    paths = machine(tmp_path / "m", vm=True, cpus=2)
    line = probe(tmp_path, capsys, paths, cpu={"model": "AMD EPYC 7763"})
    assert "A M D" not in line
    assert "AMD EPYC 7763 TDP 280 W x 2/128 threads" in line
    assert "tdp-vcpu-share" in line


def test_tdp_watts_on_a_vm_is_the_parts_socket_tdp_at_the_vms_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = machine(tmp_path / "m", vm=True, cpus=2, model="AMD EPYC 7763 64-Core Processor")
    line = probe(tmp_path, capsys, paths, cpu={"tdp_watts": 225})
    assert "cpu.tdp_watts 225 W x 2/128 threads of the part" in line


def test_tdp_watts_on_a_masked_vm_warns_of_an_implausible_figure(tmp_path: Path) -> None:
    """A user following the old hint sets a socket's 225 W on a 2-vCPU VM whose part is masked: the daemon still
    charges it whole (nothing to share it by) but warns, naming the per-vCPU figure and the keys that fix it."""
    paths = machine(tmp_path / "m", vm=True, cpus=2)
    cfg = {"paths": paths, "sensors": ["tdp"], "cpu": {"tdp_watts": 225}, "embodied": {"enabled": False}}
    with Daemon(tmp_path, cfg) as d:
        log = d.wait_for_log("cpu_power_implausible")
    (event,) = [json.loads(x) for x in log.splitlines() if '"cpu_power_implausible"' in x]
    assert event["watts_per_vcpu"] == pytest.approx(112.5)
    assert event["plausible_max"] == pytest.approx(8.58)
    assert "cpu.power_watts" in event["hint"]
    assert "cpu.model" in event["hint"]


def test_power_watts_is_charged_as_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = machine(tmp_path / "m", vm=True, cpus=4, model="AMD EPYC 7763 64-Core Processor")
    line = probe(tmp_path, capsys, paths, cpu={"power_watts": 12})
    assert "power-watts" in line
    assert "cpu.power_watts 12 W for this machine" in line


@pytest.mark.parametrize(
    ("part", "cpus", "expected"),
    [
        (("0x41", "0xd0c"), 80, "Ampere Altra Q80-30 (Neoverse-N1, 80 cores) TDP 210 W"),
        (("0x41", "0xd0c"), 128, "Ampere Altra Max M128-30 (Neoverse-N1, 128 cores) TDP 250 W"),
        (("0x41", "0xd4f"), 72, "NVIDIA Grace (Neoverse-V2, 72 cores) TDP 250 W"),
    ],
)
def test_arm_server_is_identified_by_implementer_and_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], part: tuple[str, str], cpus: int, expected: str
) -> None:
    line = probe(tmp_path, capsys, machine(tmp_path / "m", arm=part, cpus=cpus))
    assert expected in line
    assert "per-thread-default" not in line


def test_arm_core_without_a_chip_of_its_size_is_charged_per_core(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 96-core Neoverse-N1 matches no listed chip: the median W per core of the N1 chips x 96 (not 4 W/thread)."""
    line = probe(tmp_path, capsys, machine(tmp_path / "m", arm=("0x41", "0xd0c"), cpus=96))
    assert "ARM Neoverse-N1 x 96 cores at" in line
    assert "median of the Neoverse-N1 chips" in line
    found = arm_part("".join(ARM_CPUINFO.format(n=i, impl="0x41", part="0xd0c") for i in range(96)))
    assert found is not None
    assert found.cores == 96


def test_arm_vm_is_charged_its_vcpus_per_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = machine(tmp_path / "m", arm=("0x41", "0xd40"), cpus=4, dmi=("Amazon EC2", "c7g.xlarge"))
    line = probe(tmp_path, capsys, paths)
    assert "ARM Neoverse-V1 x 4 cores" in line
    assert "x 4/4 threads" in line


def test_unknown_arm_part_is_not_guessed(tmp_path: Path) -> None:
    assert arm_part(ARM_CPUINFO.format(n=0, impl="0x61", part="0x000")) is None  # Apple: not in the table
    assert arm_part("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") is None


@pytest.mark.parametrize(
    ("model", "tdp", "how"),
    [
        ("12th Gen Intel(R) Core(TM) i7-12700", 65.0, "table"),  # only H and K were listed
        ("Intel(R) Core(TM) i5-12400F", 65.0, "table"),
        ("13th Gen Intel(R) Core(TM) i9-13900T", 35.0, "table"),
        ("AMD Ryzen 7 7700 8-Core Processor", 65.0, "table"),
    ],
)
def test_desktop_parts_from_the_widened_table(model: str, tdp: float, how: str) -> None:
    found = lookup_part(model)
    assert found is not None
    assert (found.tdp, found.how) == (tdp, how)


def test_family_rule_when_the_exact_part_is_missing() -> None:
    """A part absent from the table takes its family's median when the family agrees: same generation and suffix,
    any tier. A family whose TDPs disagree, or with no member, stays unknown."""
    found = lookup_part("Intel(R) Core(TM) i7-13750")  # no such part: the 13th-gen no-suffix desktop family
    assert found is not None
    assert found.how == "family"
    assert found.tdp == 65.0
    assert lookup_part("Intel(R) Core(TM) i7-14799") is None  # no 14th-gen no-suffix part in the table


def test_bare_metal_desktop_through_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = probe(tmp_path, capsys, machine(tmp_path / "m", model="12th Gen Intel(R) Core(TM) i7-12700", cpus=20))
    assert "Intel Core i7-12700 TDP 65 W per socket" in line


def test_probe_without_config_does_not_say_in_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "in config" not in out.replace("not in config", "")
    assert "default sensor" in out
