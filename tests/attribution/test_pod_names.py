"""Pod names from a loopback Kubernetes serving real-shaped PodLists, through the whole daemon pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from carbond.attribution.attributor import Attributor
from carbond.attribution.kubernetes import PodDirectory, endpoint, parse_pod_list
from carbond.exporter.collector import families
from carbond.intensity import FixedIntensity
from carbond.model import Intensity
from carbond.procfs import HostReader
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.cgroupfs import CgroupTree
from carbond.testing.clock import ManualClock
from carbond.testing.kube_fake import FakeKubernetes, FakePod
from carbond.testing.procfs import ProcTree
from tests.harness.monitors import build_monitor

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
OTHER_UID = "11111111-2222-3333-4444-555555555555"
CID = "cd" * 32
STATIC_UID = "5c1b9a0e8f7d6c5b4a39281706f5e4d3"  # a static pod's: its config hash (the kubelet's manifests)
MIRROR_UID = "99999999-aaaa-bbbb-cccc-dddddddddddd"  # the API's UID of its mirror pod
STATIC_CID = "e7" * 32


def kube() -> FakeKubernetes:
    k = FakeKubernetes()
    k.pods = [
        FakePod(
            UID,
            "trainer-7d9f-x2x",
            "ml",
            "node-a",
            {"train": f"containerd://{CID}", "sidecar": "containerd://" + "ef" * 32},
        ),
        FakePod(OTHER_UID, "web-1", "default", "node-b", {"nginx": "containerd://" + "12" * 32}),
        FakePod(
            MIRROR_UID,
            "etcd-node-a",
            "kube-system",
            "node-a",
            {"etcd": f"containerd://{STATIC_CID}"},
            annotations={"kubernetes.io/config.mirror": STATIC_UID, "kubernetes.io/config.hash": STATIC_UID},
        ),
    ]
    return k


def test_parse_skips_malformed_items() -> None:
    doc = {"items": [None, {"metadata": "x"}, {"metadata": {"uid": UID}}, kube().pods[0].to_json(), 3]}
    pods = parse_pod_list(doc)
    assert list(pods) == [UID]
    mirror = parse_pod_list({"items": [kube().pods[2].to_json()]})
    assert mirror[STATIC_UID] == mirror[MIRROR_UID]  # a static pod's cgroup is named by its hash
    assert (mirror[STATIC_UID].name, mirror[STATIC_UID].containers) == ("etcd-node-a", {STATIC_CID: "etcd"})
    assert pods[UID].containers[CID] == "train"
    assert parse_pod_list([]) == {}
    assert parse_pod_list({"items": "no"}) == {}


@pytest.mark.asyncio
@pytest.mark.parametrize("source", ["apiserver", "kubelet"])
async def test_directory_lists_this_nodes_pods(tmp_path: Path, source: str) -> None:
    k = kube()
    url = await k.start()
    token = tmp_path / "token"
    token.write_text(k.token + "\n")
    try:
        ep = endpoint(source, "node-a", api_url=url, kubelet_url=url, token_file=token, ca_file=None)
        d = PodDirectory(ep)
        assert await d.refresh()
        assert d.lookup(UID, CID) == ("ml", "trainer-7d9f-x2x", "train")
        if source == "apiserver":
            assert k.requests[-1] == "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a"
            assert d.lookup(OTHER_UID, "") == ("", "", "")  # another node's pod is not listed
        else:
            assert k.requests[-1] == "/pods"
        assert d.lookup("no-such-uid", CID) == ("", "", "")
    finally:
        await k.stop()


@pytest.mark.asyncio
async def test_failures_keep_the_last_names_and_count(tmp_path: Path) -> None:
    k = kube()
    url = await k.start()
    token = tmp_path / "token"
    token.write_text(k.token)
    try:
        d = PodDirectory(endpoint("apiserver", "node-a", api_url=url, token_file=token, ca_file=None))
        assert await d.refresh()
        k.fail_with = 503
        assert not await d.refresh()
        token.write_text("rotated-but-wrong")  # the token is re-read each time
        k.fail_with = None
        assert not await d.refresh()
        assert d.errors_total == 2
        assert d.lookup(UID, CID) == ("ml", "trainer-7d9f-x2x", "train")
        token.write_text(k.token)
        assert await d.refresh()
    finally:
        await k.stop()
    gone = PodDirectory(endpoint("apiserver", "node-a", api_url=url, token_file=token, ca_file=None), timeout_s=2)
    assert not await gone.refresh()  # server stopped: connection refused, counted, no exception
    assert gone.errors_total == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("uid", "cid", "names"),
    [
        (UID, CID, ("ml", "trainer-7d9f-x2x", "train")),
        (STATIC_UID, STATIC_CID, ("kube-system", "etcd-node-a", "etcd")),  # a static pod, named by its mirror
    ],
    ids=["pod", "static-pod"],
)
async def test_cgroup_series_carry_pod_names(tmp_path: Path, uid: str, cid: str, names: tuple[str, ...]) -> None:
    k = kube()
    url = await k.start()
    token = tmp_path / "token"
    token.write_text(k.token)
    clock = ManualClock()
    proc = ProcTree(tmp_path / "proc")
    tree = CgroupTree(tmp_path / "cg")
    pod_slice = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    tree.add(f"{pod_slice}/cri-containerd-{cid}.scope", cpus=0.5)
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 40.0)], clock)
    pods = PodDirectory(endpoint("apiserver", "node-a", api_url=url, token_file=token, ca_file=None))
    att = Attributor(tmp_path / "cg", tmp_path / "proc", clock=clock, pods=pods)
    intensity = FixedIntensity(Intensity(g_per_kwh=100.0, provider="static", zone="FR", observed_at=0.0))
    mon = build_monitor(
        sensor,
        host="node-a",
        interval_s=5,
        intensity=intensity,
        clock=clock,
        attributor=att,
        host_reader=HostReader(tmp_path / "proc"),
    )
    try:
        await sensor.start()
        assert await pods.refresh()
        await mon.tick()
        clock.advance(5)
        proc.advance(5, 0.5)
        tree.advance(5)
        snap = await mon.tick()
    finally:
        await k.stop()
    fam = {f.name: f for f in families(snap)}
    samples = [s for s in fam["carbond_cgroup_energy_joules"].samples if s.labels["pod_uid"] == uid]
    assert samples, "the pod's cgroup has a series"
    labels = samples[0].labels
    assert (labels["pod_namespace"], labels["pod_name"], labels["container_name"]) == names
    assert labels["container_id"] == cid
    assert fam["carbond_pod_names_refresh_errors"].samples[0].value == 0
