"""A whole fixture host in one call, for end-to-end tests (the golden ``/metrics``), demos and benchmarks.

``FixtureHost(root)`` builds, under ``root``:

- ``sys``: a powercap tree with ``package-0`` (``core`` and ``dram`` subzones inside it) and ``psys``, each advanced
  at constant watts by :meth:`FixtureHost.running` (:data:`RAPL_WATTS`), and an ACPI power meter in ``class/hwmon``
  (:mod:`carbond.testing.hwmon`) reading a constant :data:`WALL_WATTS` at the wall, above the components it contains
  (psys and the GPUs), so carbond's ``other`` is the difference; only a daemon whose ``sensors`` list ``hwmon`` reads
  it (the default list does not);
- ``proc``: ``cpuinfo`` (one socket, two CPUs), ``meminfo`` (16 GB), ``boot_id`` and a ``stat`` whose CPUs are
  :data:`BUSY` busy while running, plus ``/proc/<pid>/cgroup`` for the GPU processes that live in a cgroup;
- ``cgroup``: a cgroup v2 tree with three systemd services, a docker container and one Kubernetes pod's container
  (:data:`WORKLOADS`), their CPU time advancing at fixed rates while running;
- ``nvml.json``: two fake NVIDIA GPUs with energy counters for :mod:`carbond.testing.nvml_fake` (an A100 whose
  processes are the pod's container, the docker container and a process outside any cgroup; an H100 without
  processes), see :meth:`FixtureHost.nvml_env`. Neither is power-only: carbond then samples power in the
  background through the same one-call-at-a-time guard as the tick's read, and a tick that meets a sample in
  flight counts a sensor error (seen about once in 50 runs), which a golden cannot pin;
- ``kube-token``: the bearer token of :attr:`FixtureHost.pods`, served by :class:`ServedInThread` around
  :class:`carbond.testing.kube_fake.FakeKubernetes` (:meth:`FixtureHost.kubernetes`).

Every figure a test may check is a module constant; the CPU time of the workloads (0.5 CPUs) is well below the busy
time (1 CPU), and a sixth of the A100's processes' utilisation has no cgroup, so ``(unattributed)`` is always
clearly positive.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from carbond.testing.cgroupfs import CgroupTree, CgroupWriter, write_pid_cgroup
from carbond.testing.hwmon import HwmonChip, HwmonTree
from carbond.testing.kube_fake import FakeKubernetes, FakePod
from carbond.testing.powercap import PowercapTree, PowercapWriter, Zone
from carbond.testing.procfs import ProcTree

NODE = "golden-node"
BUSY = 0.5  # share of every CPU's time spent busy (/proc/stat)
CPUS = 2
MEM_KB = 16 * 1024 * 1024
RAPL_WATTS = {"package": 40.0, "core": 25.0, "dram": 6.0, "psys": 55.0}  # zone name -> constant watts
WALL_WATTS = 640.0  # the ACPI power meter: psys 55 W + GPUs 500 W + 85 W nothing else measures (fans, PSU losses)
#: The meter's device as carbond's hwmon sensor names it: ``<chip name>-<hwmonN>-<channel>``.
WALL_DEVICE = "power_meter-hwmon0-power1"

POD_UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
POD_CONTAINER_ID = "ab" * 32
DOCKER_ID = "cd" * 32
POD_CGROUP = (
    "kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{POD_CONTAINER_ID}.scope"
)
DOCKER_CGROUP = f"system.slice/docker-{DOCKER_ID}.scope"


@dataclass(frozen=True, slots=True)
class Workload:
    cgroup: str
    cpus: float  # CPUs kept busy
    memory_bytes: int


WORKLOADS = (
    Workload("system.slice/ssh.service", 0.05, 16 << 20),
    Workload("system.slice/nginx.service", 0.10, 128 << 20),
    Workload("system.slice/postgresql.service", 0.15, 1 << 30),
    Workload(DOCKER_CGROUP, 0.10, 512 << 20),
    Workload(POD_CGROUP, 0.10, 2 << 30),
)

# pid -> the cgroup it lives in (None: no /proc/<pid>/cgroup, so its GPU share stays unattributed)
GPU_PIDS: dict[int, str | None] = {4242: POD_CGROUP, 4343: DOCKER_CGROUP, 4444: None}
GPUS: tuple[dict[str, Any], ...] = (
    {
        "name": "NVIDIA A100-SXM4-40GB",
        "uuid": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
        "power_w": 300.0,
        "energy_counter": True,
        "processes": {"4242": 50, "4343": 25, "4444": 15},  # pid -> SM utilisation
    },
    {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-11111111-aaaa-bbbb-cccc-dddddddddddd",
        "power_w": 200.0,
        "energy_counter": True,
    },
)
KUBE_TOKEN = "fixture-host-token"
PODS = (
    FakePod(
        uid=POD_UID,
        name="trainer-7d9f8b6c5-x2x4q",
        namespace="ml",
        node=NODE,
        containers={"trainer": f"containerd://{POD_CONTAINER_ID}"},
    ),
    FakePod(uid="99999999-8888-7777-6666-555555555555", name="elsewhere-0", namespace="ml", node="other-node"),
)


class FixtureHost:
    """The host described in the module docstring, built under ``root`` (which must not exist or be empty)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs, self.procfs, self.cgroupfs = root / "sys", root / "proc", root / "cgroup"
        self.powercap = PowercapTree(self.sysfs)
        pkg = self.powercap.add_zone("package-0")
        self.zones: dict[str, Zone] = {
            "package": pkg,
            "core": self.powercap.add_zone("core", parent=pkg),
            "dram": self.powercap.add_zone("dram", parent=pkg),
            "psys": self.powercap.add_zone("psys"),
        }
        self.hwmon = HwmonTree(self.sysfs)
        self.meter: HwmonChip = self.hwmon.power_meter(watts=WALL_WATTS)
        self.proc = ProcTree(self.procfs, sockets=1, cpus_per_socket=CPUS, mem_kb=MEM_KB)
        self.cgroups = CgroupTree(self.cgroupfs)
        for w in WORKLOADS:
            self.cgroups.add(w.cgroup, cpus=w.cpus, memory_bytes=w.memory_bytes)
        for pid, cgroup in GPU_PIDS.items():
            if cgroup is not None:
                write_pid_cgroup(self.procfs, pid, cgroup)
        self.nvml_spec = root / "nvml.json"
        self.nvml_spec.write_text(json.dumps({"gpus": list(GPUS)}, indent=1))
        self.kube_token = root / "kube-token"
        self.kube_token.write_text(KUBE_TOKEN + "\n")
        self.pods = list(PODS)

    def paths(self) -> dict[str, str]:
        """The config's ``paths`` section."""
        return {"sysfs": str(self.sysfs), "procfs": str(self.procfs), "cgroupfs": str(self.cgroupfs)}

    def nvml_env(self) -> dict[str, str]:
        """Environment for a daemon process whose ``import pynvml`` must load the fake with these GPUs."""
        fake_dir = str(Path(importlib.import_module("carbond.testing.nvml_fake").__path__[0]))
        path = os.pathsep.join(p for p in (fake_dir, os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "CARBOND_FAKE_NVML": str(self.nvml_spec)}

    def kubernetes(self) -> FakeKubernetes:
        """A loopback API server (not started) that lists :attr:`pods` to the holder of :attr:`kube_token`."""
        kube = FakeKubernetes(token=KUBE_TOKEN)
        kube.pods = list(self.pods)
        return kube

    @staticmethod
    def rapl_watts() -> dict[str, float]:
        """Device name (as carbond's rapl sensor names it) -> the constant watts its zone is advanced at."""
        return {
            "package-0": RAPL_WATTS["package"],
            "core-0": RAPL_WATTS["core"],
            "dram-0": RAPL_WATTS["dram"],
            "psys": RAPL_WATTS["psys"],
        }

    @staticmethod
    def gpu_watts() -> dict[str, float]:
        """Device name (``gpu-<NVML index>``) -> the fake GPU's constant watts."""
        return {f"gpu-{i}": float(g["power_w"]) for i, g in enumerate(GPUS)}

    @staticmethod
    def wall_watts() -> dict[str, float]:
        """Device name (as carbond's hwmon sensor names it) -> the power meter's constant watts."""
        return {WALL_DEVICE: WALL_WATTS}

    @contextlib.contextmanager
    def running(self, period_s: float = 0.005) -> Iterator[None]:
        """Counters, CPU time and /proc/stat advance in real time (background threads) inside the block; the
        counters are rewritten every ``period_s``, which bounds the error of a power measured over one tick."""
        watts = {zone: RAPL_WATTS[name] for name, zone in self.zones.items()}
        with PowercapWriter(watts, period_s=period_s), CgroupWriter(self.cgroups, self.proc, busy=BUSY):
            yield


class _Server(Protocol):
    async def start(self) -> str: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


class ServedInThread(Generic[S]):
    """Serve a loopback fake with ``async start() -> url`` and ``async stop()`` (such as
    :class:`~carbond.testing.kube_fake.FakeKubernetes`) from an event loop of its own in a daemon thread, for a
    client in another process. Change the fake's plain attributes between requests only through :meth:`call`."""

    def __init__(self, fake: S, timeout_s: float = 10.0) -> None:
        self.fake = fake
        self.url = ""
        self._timeout = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=type(fake).__name__, daemon=True)

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the fake's loop; its result here."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    def __enter__(self) -> Self:
        self._thread.start()
        try:
            self.url = asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(self._timeout)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):  # the fake's loop may be gone already
                asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(self._timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
