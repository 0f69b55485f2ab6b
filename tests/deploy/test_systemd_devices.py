"""The unit's device rules evaluated as systemd applies them, over the /proc/devices layouts of real drivers.

systemd turns ``DeviceAllow=char-NAME`` into "every major whose name in the Character devices section of
/proc/devices matches NAME (fnmatch)", and ``DeviceAllow=/dev/PATH`` into the major:minor of that node when the
unit starts. NVIDIA drivers up to the 545 series register major 195 as ``nvidia-frontend``; from the 550 series it
appears as ``nvidia`` and ``nvidiactl``. Under ``DevicePolicy=closed`` a rule that matches no name grants nothing:
/dev/nvidia0..N would be denied and NVML would see no GPU.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent.parent / "systemd" / "carbond.service"

# Character-device sections as the drivers write them (majors of dynamic drivers vary; these are typical).
PROC_DEVICES = {
    "nvidia-535": "195 nvidia-frontend\n226 drm\n234 kfd\n508 nvidia-caps\n510 nvidia-uvm\n",
    "nvidia-550": "195 nvidia\n195 nvidiactl\n226 drm\n234 kfd\n508 nvidia-caps\n510 nvidia-uvm\n",
}
# The nodes NVML and amdsmi open: (major, minor); the majors agree with the tables above.
NODES = {
    "/dev/nvidiactl": (195, 255),
    "/dev/nvidia0": (195, 0),
    "/dev/nvidia7": (195, 7),
    "/dev/nvidia-uvm": (510, 0),
    "/dev/nvidia-caps/nvidia-cap1": (508, 1),
    "/dev/kfd": (234, 0),
    "/dev/dri/renderD128": (226, 128),
    "/dev/dri/card0": (226, 0),
}
NOT_GPU = {"/dev/sda": (8, 0), "/dev/mem": (1, 1), "/dev/kmsg": (1, 11)}


def unit_settings(text: str) -> list[tuple[str, str]]:
    return [
        tuple(line.split("=", 1))  # type: ignore[misc]
        for line in text.splitlines()
        if "=" in line and not line.startswith(("#", "["))
    ]


def allowed(rules: list[str], proc_devices: str, nodes: dict[str, tuple[int, int]]) -> dict[tuple[int, int], str]:
    """(major, minor or -1 for every minor) -> access, as systemd builds the devices filter from DeviceAllow."""
    out: dict[tuple[int, int], str] = {}
    table = [(int(major), name) for major, name in (ln.split() for ln in proc_devices.splitlines() if ln.strip())]
    for rule in rules:
        spec, mode = rule.split()
        if spec.startswith("char-"):
            for major, name in table:
                if fnmatch.fnmatchcase(name, spec.removeprefix("char-")):
                    out[(major, -1)] = mode
        elif spec in nodes:  # a path rule: resolved when the unit starts, skipped when the node does not exist
            out[nodes[spec]] = mode
    return out


def can_open_rw(grants: dict[tuple[int, int], str], node: tuple[int, int]) -> bool:
    mode = grants.get(node) or grants.get((node[0], -1), "")
    return "r" in mode and "w" in mode


def device_rules(text: str) -> list[str]:
    return [value for key, value in unit_settings(text) if key == "DeviceAllow"]


@pytest.mark.parametrize("layout", sorted(PROC_DEVICES))
def test_every_gpu_node_opens_read_write_whatever_the_driver_layout(layout: str) -> None:
    text = UNIT.read_text()
    assert ("DevicePolicy", "closed") in unit_settings(text)
    grants = allowed(device_rules(text), PROC_DEVICES[layout], NODES)
    denied = [path for path, node in NODES.items() if not can_open_rw(grants, node)]
    assert denied == []
    leaked = [path for path, node in NOT_GPU.items() if grants.get(node) or grants.get((node[0], -1))]
    assert leaked == []


def test_the_frontend_rule_alone_denies_the_550_drivers_gpus() -> None:
    """The evaluator tells the layouts apart: the pre-550 rule set leaves /dev/nvidia0 closed on a 550 driver."""
    old = [r for r in device_rules(UNIT.read_text()) if r.split()[0] not in ("char-nvidia", "char-nvidiactl")]
    grants = allowed(old, PROC_DEVICES["nvidia-550"], NODES)
    assert not can_open_rw(grants, NODES["/dev/nvidia0"])
    assert can_open_rw(allowed(old, PROC_DEVICES["nvidia-535"], NODES), NODES["/dev/nvidia0"])


def test_amd_nodes_group_render_or_video_is_a_supplementary_group() -> None:
    """/dev/kfd and /dev/dri/renderD* are 0660 root:render (root:video on older distributions): DynamicUser's user
    opens them only with that group among its supplementary groups."""
    settings = unit_settings(UNIT.read_text())
    assert ("DynamicUser", "yes") in settings
    groups = {g for key, value in settings if key == "SupplementaryGroups" for g in value.split()}
    assert {"render", "video"} <= groups
