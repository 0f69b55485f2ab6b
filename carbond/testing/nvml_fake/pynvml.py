"""A fake ``pynvml`` (nvidia-ml-py) for tests and demos: NVML's function names, units and error classes.

Put ``carbond/testing/nvml_fake`` first on ``PYTHONPATH`` (or ``sys.path``) and ``import pynvml`` gets this module.
The GPUs are described by the JSON file named in ``$CARBOND_FAKE_NVML`` (or by :func:`configure`)::

    {"gpus": [{"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-...", "power_w": 250, "energy_counter": true,
               "lost_after_s": null, "recover_after_s": null, "lost_handle": false, "mig": ["MIG-..."],
               "processes": {"1234": 60}}],
     "missing": null}            # or "library" / "driver": nvmlInit raises LibraryNotFound / DriverNotLoaded

Energy (mJ) is ``power x`` time since :func:`nvmlInit`; power is in mW as NVML reports it. Time is
``time.monotonic`` unless :func:`configure` is given the clock the sensor under test runs on (a
``carbond.testing.clock.ManualClock``), so that a test moves both together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999


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
        return {
            1: "Uninitialized",
            3: "Not Supported",
            6: "Not Found",
            9: "Driver Not Loaded",
            12: "NVML Shared Library Not Found",
            15: "GPU is lost",
            999: "Unknown Error",
        }.get(self.value, "Error")


def _sub(name: str, value: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._by_value[value] = cls
    return cls


NVMLError_Uninitialized = _sub("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _sub("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _sub("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NotFound = _sub("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _sub("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _sub("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _sub("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _sub("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass
class _Gpu:
    index: int
    spec: dict[str, Any]


@dataclass
class c_nvmlPciInfo_t:
    busId: str


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int


_state: dict[str, Any] = {"spec": None, "t0": None, "clock": time.monotonic}


def configure(spec: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
    """Describe the fake GPUs in-process (instead of $CARBOND_FAKE_NVML); ``clock``: the monotonic seconds the
    energy counters, losses and recoveries follow."""
    _state["spec"], _state["clock"] = spec, clock


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


def nvmlDeviceGetHandleByUUID(uuid: str) -> _Gpu:
    for i, g in enumerate(_spec()["gpus"]):
        if g["uuid"] == uuid:
            return _Gpu(i, g)
        if uuid in g.get("mig", []):
            return _Gpu(i, {**g, "_mig_of": i})
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle: _Gpu) -> _Gpu:
    if "_mig_of" not in handle.spec:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return nvmlDeviceGetHandleByIndex(handle.index)


def nvmlDeviceIsMigDeviceHandle(handle: _Gpu) -> int:
    return 1 if "_mig_of" in handle.spec else 0


def _alive(h: _Gpu) -> None:
    t = _elapsed()
    lost, back = h.spec.get("lost_after_s"), h.spec.get("recover_after_s")
    if lost is not None and t >= lost and (back is None or t < back):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)


def nvmlDeviceGetName(h: _Gpu) -> str:
    _alive(h)
    return str(h.spec["name"])


def nvmlDeviceGetUUID(h: _Gpu) -> str:
    _alive(h)
    return str(h.spec["uuid"])


def nvmlDeviceGetPciInfo(h: _Gpu) -> c_nvmlPciInfo_t:
    return c_nvmlPciInfo_t(busId=f"00000000:{0x17 + h.index:02X}:00.0")


def nvmlDeviceGetPowerManagementLimit(h: _Gpu) -> int:
    return int(h.spec.get("limit_w", 400) * 1000)


def nvmlDeviceGetPowerUsage(h: _Gpu) -> int:
    _alive(h)
    return int(h.spec["power_w"] * 1000)


def nvmlDeviceGetTotalEnergyConsumption(h: _Gpu) -> int:
    _alive(h)
    if not h.spec.get("energy_counter", True):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(h.spec.get("energy_offset_mj", 0) + h.spec["power_w"] * _elapsed() * 1000)


def nvmlDeviceGetComputeRunningProcesses(h: _Gpu) -> list[c_nvmlProcessInfo_t]:
    _alive(h)
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
    """SM utilisation per process (``processes`` maps pid -> smUtil); NotFound when no sample, as NVML does."""
    _alive(h)
    procs = h.spec.get("processes", {})
    if not procs or h.spec.get("no_process_samples"):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    now = int(time.time() * 1e6)
    return [c_nvmlProcessUtilizationSample_t(int(pid), now, int(util), 0, 0, 0) for pid, util in procs.items()]
