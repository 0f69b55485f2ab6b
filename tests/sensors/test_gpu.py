"""What the GPU backends share: trapezoid integration of power samples and the background sampler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from carbond.errors import SensorReadError
from carbond.sensors.base import BlockingCalls
from carbond.sensors.gpu import PowerIntegrator, PowerSampler
from tests.harness.wait import eventually_async

T = TypeVar("T")


def test_trapezoids_are_exact_at_the_injected_times() -> None:
    p = PowerIntegrator()
    assert not p.primed
    # (W, s): irregular intervals, values exact in binary so the sum is too
    samples = [(100.0, 10.0), (200.0, 11.0), (200.0, 13.0), (50.0, 13.5), (50.0, 17.75)]
    p.add(*samples[0])
    assert p.primed
    assert p.joules == 0.0
    for watts, at in samples[1:]:
        p.add(watts, at)
    # 150 W x 1 s + 200 W x 2 s + 125 W x 0.5 s + 50 W x 4.25 s
    assert p.joules == 150.0 + 400.0 + 62.5 + 212.5


def test_a_linear_ramp_is_integrated_exactly() -> None:
    # trapezoids are exact for power linear in time, whatever the sampling instants
    def watts(t: float) -> float:
        return 40.0 + 3.0 * t

    times = [0.0, 0.1, 0.35, 1.0, 1.05, 2.7, 4.0]
    p = PowerIntegrator()
    for t in times:
        p.add(watts(t), t)
    t0, t1 = times[0], times[-1]
    assert p.joules == pytest.approx(40.0 * (t1 - t0) + 1.5 * (t1**2 - t0**2), rel=1e-12)


def test_restart_forgets_the_last_sample_so_a_gap_adds_nothing() -> None:
    p = PowerIntegrator()
    p.add(100.0, 0.0)
    p.add(100.0, 2.0)
    assert p.joules == 200.0
    p.restart()  # the device was lost
    assert not p.primed
    p.add(300.0, 60.0)  # back after a minute: nothing for the gap
    assert p.joules == 200.0
    assert p.primed
    p.add(300.0, 61.0)  # integration resumes from the first sample after the gap
    assert p.joules == 500.0


def test_a_sample_not_after_the_last_adds_nothing() -> None:
    p = PowerIntegrator()
    p.add(100.0, 5.0)
    p.add(100.0, 5.0)
    assert p.joules == 0.0
    p.add(100.0, 6.0)
    assert p.joules == 100.0


class CountingCalls(BlockingCalls):
    """BlockingCalls that counts the calls made through it, skipped ones included."""

    def __init__(self, what: str, grace_s: float) -> None:
        super().__init__(what, grace_s)
        self.calls = 0

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        self.calls += 1
        return await super().__call__(fn, *args)


@pytest.mark.asyncio
async def test_sampler_polls_in_the_background_until_closed() -> None:
    polls: list[int] = []
    blocking = BlockingCalls("test")
    sampler = PowerSampler("test", lambda: polls.append(1), 0.01, blocking)
    await eventually_async(lambda: len(polls) >= 3, what="three background polls")
    await sampler.close()
    await eventually_async(lambda: not blocking.blocked, what="a poll in flight at close done")
    assert sampler._task.done()
    assert not blocking.blocked


@pytest.mark.asyncio
async def test_sampler_skips_a_poll_while_the_backend_is_blocked() -> None:
    blocking = CountingCalls("test", grace_s=0.02)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    hung = asyncio.ensure_future(blocking(lambda: asyncio.run_coroutine_threadsafe(release.wait(), loop).result()))
    await eventually_async(lambda: blocking.blocked, what="the backend call hung")
    polls: list[int] = []
    sampler = PowerSampler("test", lambda: polls.append(1), 0.01, blocking)
    await eventually_async(lambda: blocking.calls >= 4, what="three polls tried while blocked")
    assert polls == []
    assert not sampler._task.done()
    with pytest.raises(SensorReadError):
        await blocking(lambda: None)
    release.set()
    await hung
    await eventually_async(lambda: polls, what="a poll once the backend is back")
    await sampler.close()
