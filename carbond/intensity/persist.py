"""The intensity cache file: the last good value of each live provider, with its fetch time and forecast.

``<state_dir>/intensity-cache.json``, written atomically (temp file in the same directory, fsync, rename, fsync of
the directory): a crash leaves the old file or the new one, never half of one. A file that cannot be read or
decoded is logged and ignored (the providers refill it); an entry is only reused for the same provider key
(provider and zone or region).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from carbond.intensity.http import MAX_G_PER_KWH, ForecastPoint
from carbond.logs import get_logger
from carbond.model import Intensity

log = get_logger("carbond.intensity.persist")

FILE_NAME = "intensity-cache.json"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Saved:
    key: str
    value: Intensity
    fetched_at: float
    forecast: tuple[ForecastPoint, ...] = ()


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a finite number")
    try:
        result = float(value)
    except OverflowError:  # a JSON integer too large for a float: a bad entry, not a crash at start-up
        raise ValueError("not a finite number") from None
    if not math.isfinite(result):
        raise ValueError("not a finite number")
    return result


def _str(value: Any, limit: int = 128) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError("not a short string")
    return value


def decode_entry(raw: Any) -> Saved:
    """One saved entry, checked as strictly as a provider's answer; ValueError otherwise."""
    if not isinstance(raw, dict) or not isinstance(raw.get("value"), dict):
        raise ValueError("entry is not an object")
    v = raw["value"]
    g = _finite(v.get("g_per_kwh"))
    if not 0.0 <= g <= MAX_G_PER_KWH:
        raise ValueError("g_per_kwh out of range")
    signal, factor, year = v.get("signal"), v.get("factor_type"), v.get("year")
    if signal not in ("average", "marginal") or factor not in ("lifecycle", "direct"):
        raise ValueError("bad signal or factor_type")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        raise ValueError("bad year")
    value = Intensity(
        g_per_kwh=g,
        provider=_str(v.get("provider")),
        zone=_str(v.get("zone")),
        observed_at=_finite(v.get("observed_at")),
        signal=signal,
        factor_type=factor,
        estimated=v.get("estimated") is True,
        source=_str(v.get("source", "")),
        year=year,
    )
    points = []
    for p in raw.get("forecast", []) if isinstance(raw.get("forecast", []), list) else []:
        if isinstance(p, list) and len(p) == 3:
            start, end, pg = (_finite(x) for x in p)
            if end > start and 0.0 <= pg <= MAX_G_PER_KWH:
                points.append(ForecastPoint(start, end, pg))
    return Saved(_str(raw.get("key")), value, _finite(raw.get("fetched_at")), tuple(points))


class CacheFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Saved]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("intensity_cache_unreadable", path=str(self.path), error=type(exc).__name__)
            return {}
        providers = doc.get("providers") if isinstance(doc, dict) and doc.get("version") == VERSION else None
        if not isinstance(providers, dict):
            log.warning("intensity_cache_unreadable", path=str(self.path), error="unknown format")
            return {}
        out: dict[str, Saved] = {}
        for name, raw in providers.items():
            try:
                out[str(name)] = decode_entry(raw)
            except ValueError as exc:
                log.warning("intensity_cache_entry_ignored", path=str(self.path), provider=str(name), error=str(exc))
        return out

    def save(self, entries: dict[str, Saved]) -> None:
        doc = {
            "version": VERSION,
            "providers": {
                name: {
                    "key": e.key,
                    "fetched_at": e.fetched_at,
                    "value": asdict(e.value),
                    "forecast": [[p.starts_at, p.ends_at, p.g_per_kwh] for p in e.forecast],
                }
                for name, e in entries.items()
            },
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
