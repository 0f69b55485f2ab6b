"""The trackers' arguments and machine facts, as CodeCarbon takes them: positional arguments in its order, the log
level, the GPUs that count, the physical cores, and the intensity zone of the location keywords."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from carbond.codecarbon import settings
from carbond.codecarbon.location import zone_of

log = logging.getLogger("carbond.codecarbon")
LOCATION = ("country_iso_code", "region", "cloud_provider", "cloud_region", "country_2letter_iso_code")
#: the keywords in CodeCarbon's order (its positional arguments follow it), then carbond's own
KEYWORDS = tuple(k for k in settings.DEFAULTS if k not in LOCATION)
OWN = ("config", "csv_columns")
_said_world = False


def _gpu_ids(given: list[int | str] | str | None) -> list[int | str] | None:
    """The GPUs that count: ``gpu_ids`` as given, else, as CodeCarbon, ``CUDA_VISIBLE_DEVICES`` (then
    ``ROCR_VISIBLE_DEVICES``) when set and not empty: indexes or UUIDs, read as CUDA reads them, up to the first
    entry that is neither (``-1`` hides every GPU)."""
    variable = next((v for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES") if os.environ.get(v)), None)
    if given is None and variable is not None:
        ids: list[int | str] = []
        for entry in os.environ[variable].split(","):
            entry = entry.strip()
            if entry.isdigit():
                ids.append(int(entry))
            elif entry.upper().startswith(("GPU-", "MIG-")):
                ids.append(entry)
            else:  # "-1", the usual way to hide every GPU, or a typo: CUDA sees none from here on
                break
        log.info("carbond.codecarbon: gpu_ids from %s: %s", variable, ids)
        return ids
    if isinstance(given, str):
        return [g.strip() for g in given.split(",") if g.strip()]
    return given


def _physical_cores(procfs: Path = Path("/proc")) -> int | None:
    """Physical cores: distinct (physical id, core id) pairs of cpuinfo; None where it does not say."""
    pairs, phys = set(), ""
    with contextlib.suppress(OSError):
        for line in (procfs / "cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                pairs.add((phys, value.strip()))
    return len(pairs) or os.cpu_count()


def _level(value: int | str) -> int | None:
    """A log level by number or name; None (logged, as CodeCarbon logs it) for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    found = logging.getLevelNamesMapping().get(str(value).upper())
    if found is None:
        log.error("carbond.codecarbon: unknown log_level %r: ignored", value)
    return found


def _zone(o: dict[str, Any], offline: bool) -> str | None:
    """carbond's zone for the location keywords (None: the config's); a location carbond cannot place is logged
    and gives the world average, as CodeCarbon's offline tracker without a country."""
    global _said_world
    location = [o[k] for k in LOCATION]
    try:
        zone = zone_of(*location)
    except ValueError as exc:
        log.error("carbond.codecarbon: %s: the location is ignored", exc)
        zone = None
    if zone is not None:
        from carbond.intensity.static import lookup

        if lookup(zone) is None:
            log.error("carbond.codecarbon: location %s is not in carbond's tables: the world average used", zone)
            zone = "world"
    if zone is None and offline:
        if not _said_world:
            log.warning(
                "carbond.codecarbon: OfflineEmissionsTracker without country_iso_code or cloud_provider/cloud_region: "
                "the world average intensity is used and the country columns are left empty"
            )
        _said_world = True
        zone = "world"
    return zone


def _merge_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The positional arguments into ``kwargs`` by CodeCarbon's order; a TypeError as Python would raise for a
    signature."""
    if len(args) > len(KEYWORDS):
        raise TypeError(f"{name}() takes at most {len(KEYWORDS)} positional arguments")
    twice = sorted(k for k in KEYWORDS[: len(args)] if k in kwargs)
    if twice:
        raise TypeError(f"{name}() got multiple values for argument(s): {', '.join(twice)}")
    kwargs.update(zip(KEYWORDS, args, strict=False))
    unknown = sorted(set(kwargs) - set(settings.DEFAULTS) - set(OWN))
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword argument(s): {', '.join(unknown)}")
