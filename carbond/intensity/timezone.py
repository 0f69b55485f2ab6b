"""The country of this machine from its time zone, for ``intensity.zone`` left unset.

The time zone is ``$TZ``, else ``/etc/timezone``, else the target of the ``/etc/localtime`` link (the part after
``zoneinfo/``). Its country comes from the tz database's ``zone.tab`` (one country per zone), else the first
country of ``zone1970.tab``, read from the system's tz database (``zoneinfo.TZPATH``) or the ``tzdata`` package.
UTC, ``Etc/*`` and anything not found give None: the world average, with one warning naming the key.
"""

from __future__ import annotations

import os
import zoneinfo
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TimezoneCountry:
    tz: str  # the time zone name, or "" when none was found
    country: str | None  # ISO 3166 alpha-2, or None
    how: str  # where the time zone came from (for the log)


def system_timezone(env: dict[str, str] | None = None, etc: Path = Path("/etc")) -> tuple[str, str]:
    """(time zone name, where it came from); ("", "") when none is set."""
    tz = (env if env is not None else os.environ).get("TZ", "").lstrip(":").strip()
    if tz:
        return tz, "$TZ"
    try:
        text = (etc / "timezone").read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    if text:
        return text.split()[0], f"{etc / 'timezone'}"
    try:
        target = os.readlink(etc / "localtime")
    except OSError:
        return "", ""
    _, sep, name = target.partition("zoneinfo/")
    return (name, f"{etc / 'localtime'} -> {target}") if sep else ("", "")


def _tables(tzpaths: tuple[str, ...]) -> list[str]:
    """The text of zone.tab then zone1970.tab, from the first place that has them."""
    for base in tzpaths:
        found = [Path(base) / n for n in ("zone.tab", "zone1970.tab") if (Path(base) / n).is_file()]
        if found:
            return [p.read_text(encoding="utf-8", errors="replace") for p in found]
    try:
        pkg = resources.files("tzdata").joinpath("zoneinfo")
        return [pkg.joinpath(n).read_text(encoding="utf-8") for n in ("zone.tab", "zone1970.tab")]
    except (ModuleNotFoundError, OSError):
        return []


def country_of(tz: str, tzpaths: tuple[str, ...] | None = None) -> str | None:
    """ISO alpha-2 of a time zone name, or None (UTC, Etc/*, unknown)."""
    if not tz or tz.upper() in ("UTC", "GMT", "UCT", "ZULU") or tz.startswith("Etc/"):
        return None
    for text in _tables(tuple(zoneinfo.TZPATH) if tzpaths is None else tzpaths):
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) >= 3 and fields[2] == tz:
                return fields[0].split(",")[0]
    return None


def locate(
    env: dict[str, str] | None = None, etc: Path = Path("/etc"), tzpaths: tuple[str, ...] | None = None
) -> TimezoneCountry:
    tz, how = system_timezone(env, etc)
    return TimezoneCountry(tz, country_of(tz, tzpaths), how)
