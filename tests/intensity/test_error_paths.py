"""A corrupt intensity cache file: unreadable, not JSON, of another format, or with entries that do not check out.
Loading logs it and keeps what is good; nothing raises, and the next save writes a good file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from carbond.intensity.http import ForecastPoint
from carbond.intensity.persist import FILE_NAME, CacheFile, Saved
from carbond.model import Intensity

GB = Intensity(g_per_kwh=120.0, provider="ukgrid", zone="GB", observed_at=1.7e9, factor_type="direct", source="ukgrid")


def good_entry() -> dict[str, Any]:
    return {
        "key": "ukgrid:national",
        "fetched_at": 1.7e9 + 5,
        "value": {
            "g_per_kwh": 120.0,
            "provider": "ukgrid",
            "zone": "GB",
            "observed_at": 1.7e9,
            "signal": "average",
            "factor_type": "direct",
            "estimated": False,
            "source": "ukgrid",
            "year": None,
        },
        "forecast": [[1.7e9, 1.7e9 + 1800, 90.0]],
    }


def write(path: Path, doc: Any) -> None:
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def test_the_good_entry_loads(tmp_path: Path) -> None:
    write(tmp_path / FILE_NAME, {"version": 1, "providers": {"ukgrid": good_entry()}})
    saved = CacheFile(tmp_path / FILE_NAME).load()
    assert saved == {"ukgrid": Saved("ukgrid:national", GB, 1.7e9 + 5, (ForecastPoint(1.7e9, 1.7e9 + 1800, 90.0),))}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (b"{not json", "JSONDecodeError"),
        (b"\xff\xfe\x00", "UnicodeDecodeError"),
        (b"[" * 100_000, "RecursionError"),
        ({"version": 2, "providers": {"ukgrid": good_entry()}}, "unknown format"),  # a later format
        ({"version": 1, "providers": [good_entry()]}, "unknown format"),
        ([1, 2], "unknown format"),
    ],
    ids=["not-json", "not-utf8", "too-deep", "other-version", "providers-list", "not-an-object"],
)
def test_a_file_that_is_not_a_cache_is_one_line_and_nothing_loaded(tmp_path: Path, doc: Any, error: str) -> None:
    write(tmp_path / FILE_NAME, doc)
    with capture_logs() as logs:
        assert CacheFile(tmp_path / FILE_NAME).load() == {}
    assert [(e["event"], e["error"]) for e in logs] == [("intensity_cache_unreadable", error)]


def test_an_unreadable_cache_file_is_one_line_and_nothing_loaded(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).mkdir()  # something at the path that cannot be read as a file (mode bits do not stop root)
    with capture_logs() as logs:
        assert CacheFile(tmp_path / FILE_NAME).load() == {}
    assert [(e["event"], e["error"]) for e in logs] == [("intensity_cache_unreadable", "IsADirectoryError")]


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    entry = good_entry()
    target: Any = entry
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return entry


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("a string", "entry is not an object"),
        (_with(("value",), [120.0]), "entry is not an object"),
        (_with(("value", "g_per_kwh"), "120"), "not a finite number"),
        (_with(("value", "g_per_kwh"), True), "not a finite number"),
        (_with(("value", "g_per_kwh"), 10**400), "not a finite number"),  # too large for a float
        (_with(("value", "g_per_kwh"), 1e308 * 10), "not a finite number"),  # json.dumps writes Infinity
        (_with(("value", "g_per_kwh"), 1e9), "g_per_kwh out of range"),
        (_with(("value", "signal"), "instant"), "bad signal or factor_type"),
        (_with(("value", "factor_type"), None), "bad signal or factor_type"),
        (_with(("value", "year"), "2023"), "bad year"),
        (_with(("value", "zone"), "Z" * 200), "not a short string"),
        (_with(("key",), 5), "not a short string"),
        (_with(("fetched_at",), None), "not a finite number"),
        (_with(("forecast",), [[1.0, 2.0, "x"]]), "not a finite number"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_entry_is_dropped_with_one_line_and_the_good_ones_kept(tmp_path: Path, entry: Any, error: str) -> None:
    write(tmp_path / FILE_NAME, {"version": 1, "providers": {"watttime": entry, "ukgrid": good_entry()}})
    with capture_logs() as logs:
        saved = CacheFile(tmp_path / FILE_NAME).load()
    assert list(saved) == ["ukgrid"]
    assert saved["ukgrid"].value == GB
    assert [(e["event"], e["provider"], e["error"]) for e in logs] == [
        ("intensity_cache_entry_ignored", "watttime", error)
    ]


def test_forecast_points_that_do_not_check_out_are_dropped_and_the_entry_kept(tmp_path: Path) -> None:
    points = [[10.0, 20.0, 50.0], [30.0, 20.0, 50.0], [40.0, 50.0, 3000.0], [1, 2], "x", [50.0, 60.0, 0.0]]
    write(tmp_path / FILE_NAME, {"version": 1, "providers": {"ukgrid": {**good_entry(), "forecast": points}}})
    with capture_logs() as logs:
        saved = CacheFile(tmp_path / FILE_NAME).load()
    assert saved["ukgrid"].forecast == (ForecastPoint(10.0, 20.0, 50.0), ForecastPoint(50.0, 60.0, 0.0))
    assert logs == []  # a bad point is not worth a line: the entry is used, with the good points
    write(tmp_path / FILE_NAME, {"version": 1, "providers": {"ukgrid": {**good_entry(), "forecast": {"a": 1}}}})
    assert CacheFile(tmp_path / FILE_NAME).load()["ukgrid"].forecast == ()


def test_after_a_corrupt_file_the_next_save_writes_a_good_one(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(b"\x00garbage")
    cache = CacheFile(path)
    assert cache.load() == {}
    entry = Saved("ukgrid:national", GB, 1.7e9 + 5)
    cache.save({"ukgrid": entry})
    with capture_logs() as logs:
        assert CacheFile(path).load() == {"ukgrid": entry}
    assert logs == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temporary file left behind
