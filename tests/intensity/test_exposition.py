"""A live provider's value reaches /metrics through the monitor and today's collector; emissions use it."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from carbond.exporter.collector import SnapshotCollector
from carbond.intensity.cache import CachedIntensity
from carbond.intensity.static import lookup
from carbond.intensity.ukgrid import UkGrid
from carbond.sensors.fake import FakeDevice, FakeSensor
from carbond.testing.clock import ManualClock
from carbond.testing.provider_fakes import FakeUkGrid
from tests.harness.monitors import build_monitor


@pytest.mark.asyncio
async def test_ukgrid_value_is_exported_and_used_for_emissions(session: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    sensor = FakeSensor([FakeDevice("package-0", "cpu", 3600.0)], clock)  # 1 Wh per second
    await sensor.start()
    async with FakeUkGrid(actual=200) as fake:
        source = CachedIntensity([UkGrid(fake.url)], static=lookup("GB"), session=session)
        await source.refresh_once()
    mon = build_monitor(sensor, host="n", interval_s=1, intensity=source, clock=clock)
    await mon.tick()
    clock.advance(1)
    snap = await mon.tick()
    assert snap.node.emissions_g_total == pytest.approx(0.2)  # 1 Wh x 200 g/kWh
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    assert (
        'carbond_grid_intensity_grams_per_kwh{factor_type="direct",host="n",provider="ukgrid",signal="average",'
        'source="ukgrid",year="",zone="GB"}'
        " 200.0" in text
    )
    assert 'carbond_grid_intensity_age_seconds{host="n",provider="ukgrid",zone="GB"}' in text
