"""Whatever JSON a provider sends, parsing gives a checked value or a ProviderError, and the refresh goes on."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.intensity import electricitymaps, ukgrid, watttime
from carbond.intensity.cache import CachedIntensity
from carbond.intensity.http import ProviderError
from carbond.intensity.static import WORLD
from carbond.intensity.ukgrid import UkGrid
from carbond.model import Intensity
from carbond.testing.provider_fakes import FakeUkGrid

scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=30)
times = st.sampled_from(["2023-01-23T17:00:00.000Z", "2018-01-20T12:00Z", "2023-13-45T99:00Z", "", "now"])
keys = st.sampled_from(
    ["zone", "carbonIntensity", "datetime", "emissionFactorType", "isEstimated", "data", "meta", "units", "value",
     "point_time", "from", "to", "intensity", "forecast", "actual", "regionid", "region", "token"]
)  # fmt: skip
json_docs = st.recursive(
    scalars | times,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys | st.text(max_size=5), children, max_size=6),
    max_leaves=25,
)
PARSERS = [
    electricitymaps.parse_latest,
    electricitymaps.parse_forecast,
    lambda d: watttime.parse_latest(d, "CAISO_NORTH"),
    watttime.parse_forecast,
    ukgrid.parse_national,
    ukgrid.parse_regional,
    lambda d: ukgrid.parse_forecast(d, True),
    lambda d: ukgrid.parse_forecast(d, False),
]


def _check(result: Any) -> None:
    values = [result] if isinstance(result, Intensity) else [p for p in result]
    for v in values:
        assert 0 <= v.g_per_kwh <= 2000


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_docs)
def test_parsers_never_raise_anything_else(doc: Any) -> None:
    for parse in PARSERS:
        with contextlib.suppress(ProviderError):
            _check(parse(doc))


@settings(max_examples=200, deadline=None)
@given(
    inner=st.fixed_dictionaries(
        {"from": times, "intensity": st.fixed_dictionaries({"forecast": scalars, "actual": scalars})}
    )
)
def test_near_valid_ukgrid_answers(inner: dict[str, Any]) -> None:
    with contextlib.suppress(ProviderError):
        _check(ukgrid.parse_national({"data": [inner]}))


@pytest.mark.asyncio
async def test_fuzzed_answers_never_end_the_refresh() -> None:
    rng = random.Random(1)
    docs = _fixed_docs()
    async with FakeUkGrid(actual=120) as fake, aiohttp.ClientSession() as session:
        c = CachedIntensity([UkGrid(fake.url)], static=WORLD, session=session, rng=rng)
        for doc in docs:
            fake.respond(doc)
            await c.refresh_once()
            value, _ = c.current()
            assert value is not None and 0 <= value.g_per_kwh <= 2000
        fake.ok()
        await c.refresh_once()
        assert c.current()[0] is not None and c.current()[0].g_per_kwh == 120.0  # type: ignore[union-attr]
        await c.start()
        await asyncio.sleep(0)
        await c.close()


def _fixed_docs() -> list[Any]:
    return [
        None,
        [],
        "text",
        {"data": None},
        {"data": [None]},
        {"data": [{"from": 5, "intensity": {"actual": 10}}]},
        {"data": [{"from": "2018-01-20T12:00Z", "intensity": []}]},
        {"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": float("1e308") * 10}}]},
        {"data": [{"from": "9999-12-31T23:59Z", "intensity": {"actual": True}}]},
        {"data": [{"from": "0001-01-01T00:00Z", "intensity": {"forecast": 1e-300}}]},
        {"data": [{"from": "2018-01-20T12:00Z", "intensity": {"actual": None, "forecast": 2000.0001}}]},
    ]
