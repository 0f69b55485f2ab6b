from __future__ import annotations

import asyncio
import contextlib
import os
import plistlib
import sys
import time
from pathlib import Path

import pytest

from carbond.errors import SensorReadError, SensorUnavailable
from carbond.model import Reading
from carbond.procfs import HostSample
from carbond.sensors.powermetrics import PowermetricsSensor, sample_joules

NO_HOST = HostSample(b"")  # powermetrics does not look at /proc


async def read(s: PowermetricsSensor) -> tuple[Reading, ...]:
    return (await s.read(NO_HOST)).readings


def fake_binary(tmp_path: Path, **env: str) -> str:
    script = tmp_path / "powermetrics"
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    script.write_text(f'#!/bin/sh\n{exports}exec {sys.executable} -m carbond.testing.fake_powermetrics "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_sample_energy_prefers_energy_keys_then_power_times_elapsed() -> None:
    s = {"elapsed_ns": 500_000_000, "processor": {"cpu_power": 4000.0, "gpu_power": 1000.0, "ane_energy": 7}}
    assert sample_joules(s) == {"cpu": pytest.approx(2.0), "gpu": pytest.approx(0.5), "ane": pytest.approx(0.007)}
    newer = {"elapsed_ns": 1_000_000_000, "processor": {"cpu_power": 1000.0}, "gpu": {"gpu_energy": 300}}
    assert sample_joules(newer) == {"cpu": pytest.approx(1.0), "gpu": pytest.approx(0.3)}


@pytest.mark.asyncio
@pytest.mark.parametrize("energy_keys", ["0", "1"])
async def test_stream_parsed_and_integrated(tmp_path: Path, energy_keys: str) -> None:
    s = PowermetricsSensor(
        time.monotonic,
        interval_ms=100,
        binary=fake_binary(tmp_path, FAKE_PM_MW="cpu=4000,gpu=2000,ane=100", FAKE_PM_ENERGY=energy_keys),
    )
    await s.start()
    a = {r.device: r for r in await read(s)}
    await asyncio.sleep(1.0)
    b = {r.device: r for r in await read(s)}
    assert set(b) == {"cpu", "gpu", "ane"} and all(r.kind == "soc" for r in b.values())
    watts = {d: (b[d].joules - a[d].joules) / (b[d].at - a[d].at) for d in b}
    assert watts["cpu"] == pytest.approx(4.0, rel=0.1)
    assert watts["gpu"] == pytest.approx(2.0, rel=0.1)
    await s.close()


@pytest.mark.asyncio
async def test_dead_process_is_restarted(tmp_path: Path) -> None:
    s = PowermetricsSensor(time.monotonic, interval_ms=100, binary=fake_binary(tmp_path, FAKE_PM_EXIT_AFTER="3"))
    await s.start()
    await asyncio.sleep(0.6)
    with pytest.raises(SensorReadError):  # it died after 3 samples: reads fail, never a stale value
        await read(s)
    for _ in range(60):  # until the restarted process has sent a sample
        await asyncio.sleep(0.05)
        with contextlib.suppress(SensorReadError):
            if await read(s):
                break
    else:
        pytest.fail("no sample after a restart")
    assert s.restarts >= 1
    await s.close()


@pytest.mark.asyncio
async def test_silent_process_times_out_reads_and_is_restarted(tmp_path: Path) -> None:
    s = PowermetricsSensor(time.monotonic, interval_ms=100, binary=fake_binary(tmp_path, FAKE_PM_SILENT_AFTER="2"))
    await s.start()
    await asyncio.sleep(0.5)
    with pytest.raises(SensorReadError):
        await read(s)
    await asyncio.sleep(1.2)
    assert s.restarts >= 1
    await s.close()


@pytest.mark.asyncio
async def test_not_macos_or_no_samples_is_unavailable(tmp_path: Path) -> None:
    if sys.platform != "darwin":
        with pytest.raises(SensorUnavailable, match="only on macOS"):
            await PowermetricsSensor(time.monotonic).start()
    broken = tmp_path / "pm"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SensorUnavailable, match="no sample"):
        await PowermetricsSensor(time.monotonic, interval_ms=100, binary=str(broken)).start()


def test_fake_emits_real_plist_documents(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [fake_binary(tmp_path, FAKE_PM_EXIT_AFTER="2"), "-i", "50"], capture_output=True, timeout=30, env={**os.environ}
    )
    docs = [plistlib.loads(d) for d in out.stdout.split(b"\0") if d.strip()]
    assert len(docs) == 2 and docs[0]["processor"]["clusters"][0]["name"] == "E-Cluster"
    assert docs[0]["elapsed_ns"] > 0
