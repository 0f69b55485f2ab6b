"""A fake ``pynvml`` (nvidia-ml-py) for tests and demos: NVML's function names, units and error classes.

Put ``carbond/testing/nvml_fake`` first on ``PYTHONPATH`` (or ``sys.path``) and ``import pynvml`` gets this module.
The GPUs are described by the JSON file named in ``$CARBOND_FAKE_NVML`` (or by :func:`configure`)::

    {"gpus": [{"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-...", "power_w": 250, "energy_counter": true,
               "lost_after_s": null, "recover_after_s": null, "lost_handle": false,
               "processes": {"1234": 60},
               "mig": [...], "mig_mode": true, "max_mig_devices": 7, "gpm": false, "errors": {}}],
     "missing": null}            # or "library" / "driver": nvmlInit raises LibraryNotFound / DriverNotLoaded

Energy (mJ) is ``power x`` time since :func:`nvmlInit`; power is in mW as NVML reports it. Time is
``time.monotonic`` unless :func:`configure` is given the clock the sensor under test runs on (a
``carbond.testing.clock.ManualClock``), so that a test moves both together.

MIG (Multi-Instance GPU, Ampere and later), as the driver shows it:

- ``mig``: the MIG devices (compute instances), one per slot of ``nvmlDeviceGetMigDeviceHandleByIndex`` (slot =
  position; ``null`` is an empty slot). Each is a UUID string (a ``1g.5gb`` instance, GPU instance = slot + 1) or
  ``{"uuid", "gi", "ci", "profile": "1g.10gb", "gi_slices", "ci_slices", "memory_mb", "processes": {pid: smUtil},
  "sm_util": percent (GPM), "exists_from_s", "exists_until_s"}``; outside ``exists_from_s``..``exists_until_s``
  (seconds since nvmlInit) the slot is empty (NotFound), which is how a test reconfigures MIG between ticks.
- ``mig_mode``: current mode (default: true when ``mig`` is given; ``null``/absent without ``mig``: a GPU without
  MIG support, where ``nvmlDeviceGetMigMode`` raises NotSupported). ``max_mig_devices``: 7 (A100/H100), 0 when
  MIG is disabled, as NVML reports.
- Energy and power queries on a MIG device handle raise NotSupported (only the physical GPU has them), as do
  utilisation queries on a MIG-enabled GPU and its MIG devices. Processes on a MIG device handle are that
  instance's; on the parent handle they are every instance's, with their GPU and compute instance ids.
- ``gpm``: GPM support (Hopper and later): ``nvmlGpmMigSampleGet`` samples each GPU instance, and
  ``nvmlGpmMetricsGet`` gives ``NVML_GPM_METRIC_SM_UTIL`` from two samples, relative to that instance's SMs.
- ``errors``: ``{"<NVML function name>": "<error>"}`` (``not_supported``, ``no_permission``, ``unknown`` ...)
  makes that call fail on this GPU and its MIG devices.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1
NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_MAX = 477
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_SUPPORT_VERSION = 1
#: gpuInstanceId / computeInstanceId of a process when MIG is off
NVML_VALUE_NOT_AVAILABLE_uint = 0xFFFFFFFF

_MESSAGES = {
    1: "Uninitialized",
    2: "Invalid Argument",
    3: "Not Supported",
    4: "Insufficient Permissions",
    6: "Not Found",
    9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found",
    15: "GPU is lost",
    25: "Argument version mismatch",
    999: "Unknown Error",
}


class NVMLError(Exception):
    _by_value: ClassVar[dict[int, type[NVMLError]]] = {}

    def __new__(cls, value: int) -> NVMLError:
        target = NVMLError._by_value.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(target)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        self.value = value
        super().__init__(value)

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, "Error")


def _sub(name: str, value: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._by_value[value] = cls
    return cls


NVMLError_Uninitialized = _sub("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _sub("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _sub("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _sub("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _sub("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _sub("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _sub("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _sub("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_ArgumentVersionMismatch = _sub("NVMLError_ArgumentVersionMismatch", NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
NVMLError_Unknown = _sub("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

_ERROR_NAMES = {
    "not_supported": NVML_ERROR_NOT_SUPPORTED,
    "no_permission": NVML_ERROR_NO_PERMISSION,
    "not_found": NVML_ERROR_NOT_FOUND,
    "invalid_argument": NVML_ERROR_INVALID_ARGUMENT,
    "gpu_is_lost": NVML_ERROR_GPU_IS_LOST,
    "unknown": NVML_ERROR_UNKNOWN,
}


@dataclass
class _Gpu:
    """A device handle: a physical GPU, or (``mig`` set) one of its MIG devices."""

    index: int
    spec: dict[str, Any]
    mig: dict[str, Any] | None = None


@dataclass
class c_nvmlPciInfo_t:
    busId: str


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = NVML_VALUE_NOT_AVAILABLE_uint
    computeInstanceId: int = NVML_VALUE_NOT_AVAILABLE_uint


@dataclass
class c_nvmlDeviceAttributes:
    multiprocessorCount: int
    sharedCopyEngineCount: int
    sharedDecoderCount: int
    sharedEncoderCount: int
    sharedJpegCount: int
    sharedOfaCount: int
    gpuInstanceSliceCount: int
    computeInstanceSliceCount: int
    memorySizeMB: int


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class c_nvmlGpmSupport_t:
    version: int = 0
    isSupportedDevice: int = 0


@dataclass
class c_nvmlGpmMetric_t:
    metricId: int = 0
    nvmlReturn: int = 0
    value: float = 0.0


@dataclass
class _GpmSample:
    """An opaque sample buffer (nvmlGpmSampleAlloc): filled by nvmlGpmMigSampleGet."""

    key: tuple[int, int] | None = None  # (GPU index, GPU instance id)
    at: float = 0.0
    busy_s: float = 0.0  # SM-busy seconds of the instance, relative to its own SMs
    freed: bool = False


@dataclass
class c_nvmlGpmMetricsGet_t:
    version: int = 0
    numMetrics: int = 0
    sample1: _GpmSample | None = None
    sample2: _GpmSample | None = None
    metrics: list[c_nvmlGpmMetric_t] = field(
        default_factory=lambda: [c_nvmlGpmMetric_t() for _ in range(NVML_GPM_METRIC_MAX)]
    )


_state: dict[str, Any] = {"spec": None, "t0": None, "clock": time.monotonic, "gpm": {}}


def configure(spec: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
    """Describe the fake GPUs in-process (instead of $CARBOND_FAKE_NVML); ``clock``: the monotonic seconds the
    energy counters, losses and recoveries follow. The spec stays live: a test may change it between reads."""
    _state["spec"], _state["clock"], _state["gpm"] = spec, clock, {}


def _now() -> float:
    clock: Callable[[], float] = _state["clock"]
    return clock()


def _spec() -> dict[str, Any]:
    if _state["spec"] is None:
        path = os.environ.get("CARBOND_FAKE_NVML")
        _state["spec"] = json.loads(open(path).read()) if path else {"gpus": []}  # noqa: SIM115
    return _state["spec"]  # type: ignore[no-any-return]


def _elapsed() -> float:
    if _state["t0"] is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _now() - _state["t0"]  # type: ignore[no-any-return]


def _fail(h: _Gpu, function: str) -> None:
    """Raise the error the spec's ``errors`` sets for ``function`` on this GPU (and its MIG devices)."""
    name = h.spec.get("errors", {}).get(function)
    if name is not None:
        raise NVMLError(_ERROR_NAMES[name])


def nvmlInit() -> None:
    missing = _spec().get("missing")
    if missing == "library":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    if missing == "driver":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    if _state["t0"] is None:
        _state["t0"] = _now()


def nvmlShutdown() -> None:
    _state["t0"] = None


def nvmlDeviceGetCount() -> int:
    _elapsed()
    return len(_spec()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Gpu:
    """A lost GPU fails here already when its spec says ``"lost_handle": true`` (else at its first query)."""
    gpus = _spec()["gpus"]
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    handle = _Gpu(index, gpus[index])
    if handle.spec.get("lost_handle"):
        _alive(handle)
    return handle


def _instances(spec: dict[str, Any]) -> list[dict[str, Any] | None]:
    """The MIG slots of a GPU's spec, each a full instance description or None (an empty slot)."""
    out: list[dict[str, Any] | None] = []
    for slot, item in enumerate(spec.get("mig") or []):
        if item is None:
            out.append(None)
            continue
        inst: dict[str, Any] = {"uuid": item} if isinstance(item, str) else dict(item)
        inst.setdefault("gi", slot + 1)
        inst.setdefault("ci", 0)
        inst.setdefault("gi_slices", 1)
        inst.setdefault("ci_slices", inst["gi_slices"])
        inst.setdefault("memory_mb", 4864 * inst["gi_slices"])
        inst.setdefault("profile", f"{inst['gi_slices']}g.{round(inst['memory_mb'] / 1024)}gb")
        out.append(inst)
    return out


def _exists(inst: dict[str, Any] | None) -> bool:
    if inst is None:
        return False
    t = _elapsed()
    start, end = inst.get("exists_from_s"), inst.get("exists_until_s")
    return (start is None or t >= start) and (end is None or t < end)


def _mig_enabled(spec: dict[str, Any]) -> bool | None:
    """True / False: the current MIG mode; None: a GPU without MIG."""
    mode = spec.get("mig_mode", True if spec.get("mig") else None)
    return None if mode is None else bool(mode)


def nvmlDeviceGetHandleByUUID(uuid: str) -> _Gpu:
    for i, g in enumerate(_spec()["gpus"]):
        if g["uuid"] == uuid:
            return _Gpu(i, g)
        for inst in _instances(g):
            if inst is not None and inst["uuid"] == uuid and _exists(inst):
                return _Gpu(i, g, inst)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetMigMode(h: _Gpu) -> list[int]:
    """[current, pending]; NotSupported on a GPU without MIG, InvalidArgument on a MIG device handle."""
    _alive(h)
    _fail(h, "nvmlDeviceGetMigMode")
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    enabled = _mig_enabled(h.spec)
    if enabled is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    mode = NVML_DEVICE_MIG_ENABLE if enabled else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(h: _Gpu) -> int:
    """The most MIG devices the GPU can hold: 0 when MIG is unsupported or disabled."""
    _alive(h)
    _fail(h, "nvmlDeviceGetMaxMigDeviceCount")
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if not _mig_enabled(h.spec):
        return 0
    return int(h.spec.get("max_mig_devices", max(7, len(h.spec.get("mig") or []))))


def nvmlDeviceGetMigDeviceHandleByIndex(h: _Gpu, index: int) -> _Gpu:
    """The MIG device in slot ``index``: NotFound for an empty slot, NotSupported with MIG off."""
    _alive(h)
    _fail(h, "nvmlDeviceGetMigDeviceHandleByIndex")
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if not _mig_enabled(h.spec):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if not 0 <= index < nvmlDeviceGetMaxMigDeviceCount(h):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    slots = _instances(h.spec)
    inst = slots[index] if index < len(slots) else None
    if not _exists(inst):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Gpu(h.index, h.spec, inst)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle: _Gpu) -> _Gpu:
    if handle.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return nvmlDeviceGetHandleByIndex(handle.index)


def nvmlDeviceIsMigDeviceHandle(handle: _Gpu) -> int:
    return 1 if handle.mig is not None else 0


def _mig_field(h: _Gpu, key: str, function: str) -> int:
    _alive(h)
    _fail(h, function)
    if h.mig is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(h.mig[key])


def nvmlDeviceGetGpuInstanceId(h: _Gpu) -> int:
    """The GPU instance id of a MIG device handle (NotSupported on a physical GPU's handle)."""
    return _mig_field(h, "gi", "nvmlDeviceGetGpuInstanceId")


def nvmlDeviceGetComputeInstanceId(h: _Gpu) -> int:
    """The compute instance id of a MIG device handle, within its GPU instance."""
    return _mig_field(h, "ci", "nvmlDeviceGetComputeInstanceId")


def nvmlDeviceGetAttributes_v2(h: _Gpu) -> c_nvmlDeviceAttributes:
    """SMs, slices and memory of a MIG device (or of the whole GPU: its full profile)."""
    _alive(h)
    _fail(h, "nvmlDeviceGetAttributes_v2")
    if h.mig is None:
        slices = int(h.spec.get("max_mig_devices", 7))
        return c_nvmlDeviceAttributes(98, 7, 5, 0, 1, 1, slices, slices, int(h.spec.get("memory_mb", 40960)))
    m = h.mig
    return c_nvmlDeviceAttributes(14 * m["ci_slices"], 1, 0, 0, 0, 0, m["gi_slices"], m["ci_slices"], m["memory_mb"])


def nvmlDeviceGetAttributes(h: _Gpu) -> c_nvmlDeviceAttributes:
    return nvmlDeviceGetAttributes_v2(h)


def _alive(h: _Gpu) -> None:
    t = _elapsed()
    lost, back = h.spec.get("lost_after_s"), h.spec.get("recover_after_s")
    if lost is not None and t >= lost and (back is None or t < back):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if h.mig is not None and not _exists(h.mig):  # its compute instance was destroyed: the handle is stale
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetName(h: _Gpu) -> str:
    """A MIG device is named after its parent and profile, as ``nvidia-smi -L`` shows it."""
    _alive(h)
    name = str(h.spec["name"])
    return f"{name} MIG {h.mig['profile']}" if h.mig is not None else name


def nvmlDeviceGetUUID(h: _Gpu) -> str:
    _alive(h)
    return str(h.mig["uuid"] if h.mig is not None else h.spec["uuid"])


def nvmlDeviceGetPciInfo(h: _Gpu) -> c_nvmlPciInfo_t:
    return c_nvmlPciInfo_t(busId=f"00000000:{0x17 + h.index:02X}:00.0")


def nvmlDeviceGetPowerManagementLimit(h: _Gpu) -> int:
    return int(h.spec.get("limit_w", 400) * 1000)


def nvmlDeviceGetPowerUsage(h: _Gpu) -> int:
    _alive(h)
    if h.mig is not None:  # power is the physical GPU's only
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(h.spec["power_w"] * 1000)


def nvmlDeviceGetTotalEnergyConsumption(h: _Gpu) -> int:
    _alive(h)
    if not h.spec.get("energy_counter", True) or h.mig is not None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(h.spec.get("energy_offset_mj", 0) + h.spec["power_w"] * _elapsed() * 1000)


def nvmlDeviceGetUtilizationRates(h: _Gpu) -> c_nvmlUtilization_t:
    """NotSupported on a MIG-enabled GPU and on MIG devices, as NVML documents."""
    _alive(h)
    if h.mig is not None or _mig_enabled(h.spec):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    procs = h.spec.get("processes", {})
    return c_nvmlUtilization_t(min(100, int(sum(procs.values()))), 0)


def nvmlDeviceGetComputeRunningProcesses(h: _Gpu) -> list[c_nvmlProcessInfo_t]:
    """A MIG device's own processes; on a MIG-enabled GPU's handle every instance's, with their instance ids."""
    _alive(h)
    _fail(h, "nvmlDeviceGetComputeRunningProcesses")
    if h.mig is not None:
        return [c_nvmlProcessInfo_t(int(pid), 1 << 30, h.mig["gi"], h.mig["ci"]) for pid in h.mig.get("processes", {})]
    if _mig_enabled(h.spec):
        return [
            c_nvmlProcessInfo_t(int(pid), 1 << 30, inst["gi"], inst["ci"])
            for inst in _instances(h.spec)
            if inst is not None and _exists(inst)
            for pid in inst.get("processes", {})
        ]
    return [c_nvmlProcessInfo_t(int(pid), 1 << 30) for pid in h.spec.get("processes", {})]


@dataclass
class c_nvmlProcessUtilizationSample_t:
    pid: int
    timeStamp: int
    smUtil: int
    memUtil: int
    encUtil: int
    decUtil: int


def nvmlDeviceGetProcessUtilization(h: _Gpu, lastSeenTimeStamp: int) -> list[c_nvmlProcessUtilizationSample_t]:
    """SM utilisation per process (``processes`` maps pid -> smUtil); NotFound when no sample, as NVML does;
    NotSupported on a MIG-enabled GPU and its MIG devices."""
    _alive(h)
    if h.mig is not None or _mig_enabled(h.spec):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    procs = h.spec.get("processes", {})
    if not procs or h.spec.get("no_process_samples"):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    now = int(time.time() * 1e6)
    return [c_nvmlProcessUtilizationSample_t(int(pid), now, int(util), 0, 0, 0) for pid, util in procs.items()]


# ---- GPM (Hopper and later) ----------------------------------------------------------------------------------------


def nvmlGpmQueryDeviceSupport(h: _Gpu) -> c_nvmlGpmSupport_t:
    _alive(h)
    _fail(h, "nvmlGpmQueryDeviceSupport")
    return c_nvmlGpmSupport_t(NVML_GPM_SUPPORT_VERSION, 1 if h.spec.get("gpm") else 0)


def nvmlGpmSampleAlloc() -> _GpmSample:
    _elapsed()
    return _GpmSample()


def nvmlGpmSampleFree(sample: _GpmSample) -> None:
    sample.freed = True


def nvmlGpmMigSampleGet(h: _Gpu, gpuInstanceId: int, sample: _GpmSample) -> _GpmSample:
    """Sample the GPU instance's SM activity: its ``sm_util`` integrated since the previous sample of it."""
    _alive(h)
    _fail(h, "nvmlGpmMigSampleGet")
    if not h.spec.get("gpm") or not _mig_enabled(h.spec):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    insts = [i for i in _instances(h.spec) if i is not None and _exists(i) and i["gi"] == gpuInstanceId]
    if not insts:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    key = (h.index, gpuInstanceId)
    at = _now()
    last_at, busy = _state["gpm"].get(key, (at, 0.0))
    busy += max(at - last_at, 0.0) * float(insts[0].get("sm_util", 0.0)) / 100.0
    _state["gpm"][key] = (at, busy)
    sample.key, sample.at, sample.busy_s = key, at, busy
    return sample


def nvmlGpmMetricsGet(metricsGet: c_nvmlGpmMetricsGet_t) -> c_nvmlGpmMetricsGet_t:
    """Metrics between sample1 and sample2; each metric's ``nvmlReturn`` tells whether it could be computed."""
    if metricsGet.version != NVML_GPM_METRICS_GET_VERSION:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    s1, s2 = metricsGet.sample1, metricsGet.sample2
    if s1 is None or s2 is None or s1.key is None or s1.key != s2.key or s1.freed or s2.freed:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    for m in metricsGet.metrics[: metricsGet.numMetrics]:
        if m.metricId == NVML_GPM_METRIC_SM_UTIL:  # two samples at one instant: no activity between them
            busy = s2.busy_s - s1.busy_s
            m.nvmlReturn, m.value = NVML_SUCCESS, 100.0 * busy / (s2.at - s1.at) if s2.at > s1.at else 0.0
        else:
            m.nvmlReturn, m.value = NVML_ERROR_NOT_SUPPORTED, 0.0
    return metricsGet
