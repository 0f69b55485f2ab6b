"""Apple Silicon through ``powermetrics`` (macOS, root): one long-lived subprocess streaming plist samples.

``powermetrics --samplers cpu_power,gpu_power,ane_power -i <ms> -f plist`` writes one plist document per sample,
separated by NUL bytes. Each sample's energy is taken from ``processor.<x>_energy`` (mJ) when present, else from
``<x>_power`` (mW) x ``elapsed_ns``, and integrated into devices ``cpu``, ``gpu`` and ``ane`` (kind ``soc``).
A process that exits or goes silent for 5 intervals is restarted with backoff (1 s doubling to 60 s); reads never
wait on it and fail only when no sample arrived for 3 intervals. This is the only module that starts a subprocess.
A launchd plist is in deploy/macos/.
"""

from __future__ import annotations

import asyncio
import contextlib
import plistlib
import shutil
import sys
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.logs import get_logger
from carbond.model import DeviceClass, Reading, SensorRead
from carbond.procfs import HostSample
from carbond.sensors.base import Backend, Clock, Context, Settings

log = get_logger("carbond.sensors.powermetrics")
DEVICES = ("cpu", "gpu", "ane")
INTERVAL_MS = 1000


class PowermetricsSettings(Settings):
    """The ``powermetrics`` config section."""

    interval_ms: Annotated[int, Field(ge=100, le=60_000)] = INTERVAL_MS
    binary: str | None = None  # default: powermetrics on PATH (macOS only)
    args: list[str] = Field(default_factory=list)  # extra arguments before the samplers


def sample_joules(sample: dict[str, Any]) -> dict[str, float]:
    """Energy of one sample per device, in joules."""
    proc = sample.get("processor", {})
    gpu = sample.get("gpu", {})  # newer macOS releases put the GPU figures in their own dict
    seconds = float(sample.get("elapsed_ns", 0)) / 1e9
    out = {}
    for dev in DEVICES:
        src = proc if f"{dev}_power" in proc or f"{dev}_energy" in proc else gpu
        if f"{dev}_energy" in src:
            out[dev] = float(src[f"{dev}_energy"]) / 1000.0
        elif f"{dev}_power" in src:
            out[dev] = float(src[f"{dev}_power"]) / 1000.0 * seconds
    return out


class PowermetricsSensor:
    name = "powermetrics"
    inline = True  # only looks at what the background task collected

    def __init__(
        self, clock: Clock, *, interval_ms: int = INTERVAL_MS, binary: str | None = None, args: Sequence[str] = ()
    ) -> None:
        self._clock = clock
        self._interval_ms = interval_ms
        self._binary = binary
        self._extra = list(args)
        self._joules = dict.fromkeys(DEVICES, 0.0)
        self._seen: set[str] = set()
        self._last_sample: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    @property
    def covers(self) -> frozenset[DeviceClass]:
        return frozenset({"cpu", "gpu"}) if self._task else frozenset()

    def _command(self) -> list[str]:
        assert self._binary is not None
        return [
            self._binary,
            *self._extra,
            "--samplers",
            "cpu_power,gpu_power,ane_power",
            "-i",
            str(self._interval_ms),
            "-f",
            "plist",
        ]

    async def start(self) -> None:
        if self._binary is None:
            if sys.platform != "darwin":
                raise SensorUnavailable("powermetrics", "powermetrics exists only on macOS")
            self._binary = shutil.which("powermetrics") or "/usr/bin/powermetrics"
        self._task = asyncio.create_task(self._supervise(), name="powermetrics")
        deadline = self._clock() + max(5.0, 5 * self._interval_ms / 1000)
        while self._last_sample is None and self._clock() < deadline and not self._task.done():
            await asyncio.sleep(0.05)
        if self._last_sample is None:
            await self.close()
            raise SensorUnavailable("powermetrics", f"no sample from {' '.join(self._command())} (root is required)")

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._command(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
                )
            except OSError as exc:
                log.warning("powermetrics_spawn_failed", error=str(exc), retry_in_s=backoff)
            else:
                got = await self._consume(self._proc)
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
                if got:
                    backoff = 1.0
                log.warning("powermetrics_restarting", returncode=self._proc.returncode, retry_in_s=backoff)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def _consume(self, proc: asyncio.subprocess.Process) -> bool:
        assert proc.stdout is not None
        silence = 5 * self._interval_ms / 1000
        buf = b""
        got = False
        while True:
            try:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), timeout=silence)
            except TimeoutError:
                log.warning("powermetrics_silent", seconds=silence)
                return got
            if not chunk:
                return got
            buf += chunk
            *docs, buf = buf.split(b"\0")
            for doc in docs:
                if not doc.strip():
                    continue
                try:
                    sample = plistlib.loads(doc.strip())
                except Exception as exc:  # noqa: BLE001 - a malformed document is skipped, never fatal
                    log.warning("powermetrics_bad_sample", error=str(exc)[:200])
                    continue
                for dev, joules in sample_joules(sample).items():
                    self._joules[dev] += joules
                    self._seen.add(dev)
                self._last_sample = self._clock()
                got = True

    async def read(self, host: HostSample) -> SensorRead:
        if self._last_sample is None or self._clock() - self._last_sample > 3 * self._interval_ms / 1000:
            raise SensorReadError("no powermetrics sample recently")
        at = self._last_sample
        return SensorRead(tuple(Reading(d, "soc", self._joules[d], at) for d in DEVICES if d in self._seen))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()


def create(settings: PowermetricsSettings, ctx: Context) -> PowermetricsSensor:
    return PowermetricsSensor(ctx.clock, interval_ms=settings.interval_ms, binary=settings.binary, args=settings.args)


BACKEND = Backend(frozenset({"cpu", "gpu"}), PowermetricsSettings, create)
