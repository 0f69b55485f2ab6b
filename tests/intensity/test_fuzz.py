"""Whatever JSON a provider sends, parsing gives a checked value or a ProviderError, and the refresh goes on."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.intensity import electricitymaps, ukgrid, watttime
from carbond.intensity.cache import CachedIntensity
from carbond.intensity.http import ForecastPoint, ProviderError
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
PARSERS: dict[str, Callable[[Any], Intensity | tuple[ForecastPoint, ...]]] = {
    "electricitymaps.latest": electricitymaps.parse_latest,
    "electricitymaps.forecast": electricitymaps.parse_forecast,
    "watttime.latest": lambda d: watttime.parse_latest(d, "CAISO_NORTH"),
    "watttime.forecast": watttime.parse_forecast,
    "ukgrid.national": ukgrid.parse_national,
    "ukgrid.regional": ukgrid.parse_regional,
    "ukgrid.forecast.regional": lambda d: ukgrid.parse_forecast(d, True),
    "ukgrid.forecast.national": lambda d: ukgrid.parse_forecast(d, False),
}
_T0, _T1 = "2023-01-23T17:00:00.000Z", "2023-01-23T18:00:00.000Z"
_UK = [
    {"from": "2018-01-20T12:00Z", "to": "2018-01-20T12:30Z", "intensity": {"forecast": 266, "actual": 263}},
    {"from": "2018-01-20T12:30Z", "to": "2018-01-20T13:00Z", "intensity": {"forecast": 250, "index": "moderate"}},
]
_WT_META = {"region": "CAISO_NORTH", "units": "lbs_co2_per_mwh", "data_point_period_seconds": 300}
#: One answer of the shape each parser accepts (the providers' documented JSON), which the fuzzer then damages.
VALID: dict[str, Any] = {
    "electricitymaps.latest": {"zone": "FR", "carbonIntensity": 56, "datetime": _T0, "isEstimated": True},
    "electricitymaps.forecast": {
        "zone": "FR",
        "forecast": [{"carbonIntensity": 50, "datetime": _T0}, {"carbonIntensity": 61.5, "datetime": _T1}],
    },
    "watttime.latest": {"data": [{"point_time": _T0, "value": 1048.41}], "meta": _WT_META},
    "watttime.forecast": {
        "data": [{"point_time": _T0, "value": 900}, {"point_time": _T1, "value": 0}],
        "meta": _WT_META,
    },
    "ukgrid.national": {"data": _UK[:1]},
    "ukgrid.regional": {"data": [{"regionid": 3, "shortname": "North West England", "data": _UK[1:]}]},
    "ukgrid.forecast.regional": {"data": {"regionid": 3, "data": _UK}},
    "ukgrid.forecast.national": {"data": _UK},
}


def _check(result: Any) -> None:
    values = [result] if isinstance(result, Intensity) else [p for p in result]
    for v in values:
        assert 0 <= v.g_per_kwh <= 2000


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``doc`` a value sits (the root included)."""
    out = [at]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, child in items:
        out += _paths(child, (*at, key))
    return out


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _replaced(doc[path[0]], path[1:], value)  # type: ignore[index]
    return copy


@st.composite
def damaged(draw: st.DrawFn) -> Any:
    """A valid answer of one provider, left whole or with one value replaced by fuzz."""
    doc = VALID[draw(st.sampled_from(sorted(VALID)))]
    if draw(st.booleans()):
        return doc
    return _replaced(doc, draw(st.sampled_from(_paths(doc))), draw(json_docs))


def test_the_documented_answers_parse() -> None:
    for name, doc in VALID.items():
        _check(PARSERS[name](doc))


def test_parsers_never_raise_anything_else() -> None:
    """Whatever the document, a checked value or a ProviderError; and the fuzz reaches the accepting paths of
    every parser, not only the rejections (a generator whose documents were all rejected would test nothing)."""
    accepted: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(doc=json_docs | damaged())
    def run(doc: Any) -> None:
        for name, parse in PARSERS.items():
            try:
                result = parse(doc)
            except ProviderError:
                continue
            _check(result)
            accepted[name] += 1

    run()
    assert set(accepted) == set(PARSERS), f"never accepted: {sorted(set(PARSERS) - set(accepted))}"


def test_near_valid_ukgrid_answers() -> None:
    intensities = scalars | st.floats(min_value=0, max_value=2000)
    counts: Counter[bool] = Counter()

    @settings(max_examples=200, deadline=None)
    @given(
        inner=st.fixed_dictionaries(
            {"from": times, "intensity": st.fixed_dictionaries({"forecast": intensities, "actual": intensities})}
        )
    )
    def run(inner: dict[str, Any]) -> None:
        try:
            result = ukgrid.parse_national({"data": [inner]})
        except ProviderError:
            counts[False] += 1
            return
        _check(result)
        counts[True] += 1

    run()
    assert counts[True] >= 10, counts
    assert counts[False] >= 10, counts  # both outcomes, each a fair share of the runs


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
            assert value is not None
            assert 0 <= value.g_per_kwh <= 2000
        fake.ok()
        await c.refresh_once()
        assert c.current()[0] is not None
        assert c.current()[0].g_per_kwh == 120.0
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
