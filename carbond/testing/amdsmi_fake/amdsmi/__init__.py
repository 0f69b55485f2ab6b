"""A fake of ROCm's ``amdsmi`` Python binding: function names, dict shapes, units and exceptions.

GPUs come from the JSON file named in ``$CARBOND_FAKE_AMDSMI`` or from :func:`configure`::

    {"gpus": [{"name": "AMD Instinct MI250X", "uuid": "...", "power_w": 500, "counter": true,
               "zero_die": false, "legacy_key": false, "bad_resolution": false}], "missing": null}

``amdsmi_get_energy_count`` returns ``{"energy_accumulator", "counter_resolution" (µJ per count), "timestamp"}``
(``"power"`` instead of ``"energy_accumulator"`` with ``legacy_key``, as older releases name it);
``amdsmi_get_power_info`` returns ``average_socket_power`` in W. An MI250 "zero_die" reports 0 W and a still
counter, as the second die of each MI250 package does (the first reports both). A GPU with ``"lost_for_s": S``
fails every query with ``STATUS_DRM_ERROR`` for S seconds after ``amdsmi_init`` (off the bus, then back). Time is
``time.monotonic`` unless :func:`configure` is given the clock the sensor under test runs on.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Callable
from typing import Any


class AmdSmiRetCode(enum.IntEnum):
    SUCCESS = 0
    STATUS_INVAL = 1
    STATUS_NOT_SUPPORTED = 2
    STATUS_DRM_ERROR = 6
    STATUS_NOT_INIT = 32
    STATUS_DRIVER_NOT_LOADED = 34


class AmdSmiInitFlags(enum.IntFlag):
    INIT_AMD_GPUS = 2


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        self.err_code = err_code
        super().__init__(f"Error code:\n\t{err_code} | {AmdSmiRetCode(err_code).name}")

    def get_error_code(self) -> int:
        return self.err_code


_state: dict[str, Any] = {"spec": None, "t0": None, "fail_not_init": 0, "clock": time.monotonic}


def configure(spec: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
    """Describe the fake GPUs in-process (instead of $CARBOND_FAKE_AMDSMI); ``clock``: the monotonic seconds the
    counters and losses follow."""
    _state["spec"], _state["t0"], _state["clock"] = spec, None, clock


def _now() -> float:
    clock: Callable[[], float] = _state["clock"]
    return clock()


def fail_not_init_once() -> None:
    """The next call raises STATUS_NOT_INIT, as after a driver reset."""
    _state["fail_not_init"] += 1


def _spec() -> dict[str, Any]:
    if _state["spec"] is None:
        path = os.environ.get("CARBOND_FAKE_AMDSMI")
        _state["spec"] = json.loads(open(path).read()) if path else {"gpus": []}  # noqa: SIM115
    return _state["spec"]  # type: ignore[no-any-return]


def _check() -> float:
    if _state["t0"] is None:
        raise AmdSmiLibraryException(AmdSmiRetCode.STATUS_NOT_INIT)
    if _state["fail_not_init"]:
        _state["fail_not_init"] -= 1
        _state["t0"] = None
        raise AmdSmiLibraryException(AmdSmiRetCode.STATUS_NOT_INIT)
    return _now() - _state["t0"]  # type: ignore[no-any-return]


def amdsmi_init(flag: int = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
    if _spec().get("missing") == "driver":
        raise AmdSmiLibraryException(AmdSmiRetCode.STATUS_DRIVER_NOT_LOADED)
    if _state["t0"] is None:
        _state["t0"] = _now() - 1000.0  # counters have been running since the driver loaded
        _state["init_at"] = _now()


def amdsmi_shut_down() -> None:
    _state["t0"] = None


def amdsmi_get_processor_handles() -> list[int]:
    _check()
    return list(range(len(_spec()["gpus"])))


def _gpu(h: int) -> dict[str, Any]:
    g: dict[str, Any] = _spec()["gpus"][h]
    lost = g.get("lost_for_s")
    if lost is not None and _now() - _state.get("init_at", 0.0) < lost:
        raise AmdSmiLibraryException(AmdSmiRetCode.STATUS_DRM_ERROR)
    return g


def amdsmi_get_gpu_asic_info(h: int) -> dict[str, Any]:
    _check()
    return {"market_name": _gpu(h)["name"], "vendor_id": "0x1002", "device_id": "0x740c"}


def amdsmi_get_gpu_device_uuid(h: int) -> str:
    _check()
    return str(_gpu(h)["uuid"])


def amdsmi_get_power_info(h: int) -> dict[str, Any]:
    _check()
    g = _gpu(h)
    watts = 0 if g.get("zero_die") else g["power_w"]
    return {"average_socket_power": watts, "current_socket_power": "N/A", "gfx_voltage": 800, "power_limit": 560}


def amdsmi_get_energy_count(h: int) -> dict[str, Any]:
    t = _check()
    g = _gpu(h)
    if not g.get("counter", True):
        raise AmdSmiLibraryException(AmdSmiRetCode.STATUS_NOT_SUPPORTED)
    resolution = 15.3  # µJ per count, as on MI200/MI300
    watts = 0 if g.get("zero_die") else g["power_w"]
    joules = watts * t * (1000.0 if g.get("bad_resolution") else 1.0)  # a misreported unit, 1000x off
    key = "power" if g.get("legacy_key") else "energy_accumulator"
    return {key: int(joules * 1e6 / resolution), "counter_resolution": resolution, "timestamp": int(t * 1e9)}
