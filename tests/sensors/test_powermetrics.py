from __future__ import annotations

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
from tests.harness.wait import eventually_async

NO_HOST = HostSample(b"")  # powermetrics does not look at /proc

#: The sensor restarts a process silent for 5 intervals, its first sample included: at 100 ms a fake started on a
#: busy machine (shell, interpreter, first interval) can miss that and be killed again and again. 200 ms leaves 1 s.
INTERVAL_MS = 200


async def read(s: PowermetricsSensor) -> tuple[Reading, ...]:
    return (await s.read(NO_HOST)).readings


async def read_fails(s: PowermetricsSensor) -> bool:
    try:
        await read(s)
    except SensorReadError:
        return True
    return False


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
        interval_ms=INTERVAL_MS,
        binary=fake_binary(tmp_path, FAKE_PM_MW="cpu=4000,gpu=2000,ane=100", FAKE_PM_ENERGY=energy_keys),
    )
    await s.start()
    a = {r.device: r for r in await read(s)}

    async def a_second_later() -> dict[str, Reading] | None:
        b = {r.device: r for r in await read(s)}
        return b if b["cpu"].at - a["cpu"].at >= 1.0 else None

    # samples over at least a second of the sensor's clock (a read fails while samples are late: not yet)
    b = await eventually_async(a_second_later, what="samples over a second", ignore=(SensorReadError,))
    assert set(b) == {"cpu", "gpu", "ane"}
    assert all(r.kind == "soc" for r in b.values())
    joules = {d: b[d].joules - a[d].joules for d in b}
    # one set of samples for every device: their ratio is the fake's (up to its whole millijoules per sample)
    assert joules["cpu"] / joules["gpu"] == pytest.approx(2.0, rel=0.01)
    # the samples' own durations against the times they arrived: equal up to how late the first and last came
    watts = {d: joules[d] / (b[d].at - a[d].at) for d in b}
    assert watts["cpu"] == pytest.approx(4.0, rel=0.1)
    assert watts["gpu"] == pytest.approx(2.0, rel=0.1)
    await s.close()


@pytest.mark.asyncio
async def test_dead_process_is_restarted(tmp_path: Path) -> None:
    s = PowermetricsSensor(
        time.monotonic, interval_ms=INTERVAL_MS, binary=fake_binary(tmp_path, FAKE_PM_EXIT_AFTER="3")
    )
    await s.start()
    # it dies after 3 samples: reads fail (never a stale value) until the restarted process sends samples
    await eventually_async(lambda: read_fails(s), what="reads failing once it died")
    assert await eventually_async(lambda: read(s), what="a sample after a restart", ignore=(SensorReadError,))
    assert s.restarts >= 1
    await s.close()


@pytest.mark.asyncio
async def test_silent_process_times_out_reads_and_is_restarted(tmp_path: Path) -> None:
    s = PowermetricsSensor(
        time.monotonic, interval_ms=INTERVAL_MS, binary=fake_binary(tmp_path, FAKE_PM_SILENT_AFTER="2")
    )
    await s.start()
    await eventually_async(lambda: read_fails(s), what="reads failing once it went silent")
    await eventually_async(lambda: s.restarts >= 1, what="the silent process restarted")
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
    assert len(docs) == 2
    assert docs[0]["processor"]["clusters"][0]["name"] == "E-Cluster"
    assert docs[0]["elapsed_ns"] > 0
