"""The trackers' keywords as CodeCarbon resolves them: a keyword given to the tracker, else ``CODECARBON_<NAME>``
in the environment, else ``./.codecarbon.config``, else ``~/.codecarbon.config`` (section ``[codecarbon]``), else
CodeCarbon's default. Teams that set ``project_name``, ``output_dir`` or ``country_iso_code`` there keep them.
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("carbond.codecarbon")

CONFIG_FILE = ".codecarbon.config"
DEFAULT_EXPERIMENT_ID = "5b0fa12a-3dd7-45bb-9766-cc326314d9f1"  # CodeCarbon's default
#: the keywords carbond honours and CodeCarbon's defaults for them (None: not set)
DEFAULTS: dict[str, Any] = {
    "project_name": "codecarbon",
    "measure_power_secs": 15.0,
    "experiment_id": DEFAULT_EXPERIMENT_ID,
    "experiment_name": "base",
    "tracking_mode": "machine",
    "gpu_ids": None,
    "output_dir": ".",
    "output_file": "emissions.csv",
    "save_to_file": True,
    "on_csv_write": "append",
    "country_iso_code": None,
    "country_2letter_iso_code": None,
    "region": None,
    "cloud_provider": None,
    "cloud_region": None,
    "pue": None,
    "wue": 0.0,
    "log_level": None,
    "allow_multiple_runs": True,
}
FLOATS = frozenset({"measure_power_secs", "pue", "wue"})
BOOLS = frozenset({"save_to_file", "allow_multiple_runs"})


def external(
    home: Path | None = None, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """CodeCarbon's configuration outside the code: values (strings) and where each came from."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for path in ((home or Path.home()) / CONFIG_FILE, (cwd or Path.cwd()) / CONFIG_FILE):
        parser = configparser.ConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:  # CodeCarbon fails on it too: say which file
            raise ValueError(f"{path}: not a CodeCarbon config file: {exc}") from None
        if parser.has_section("codecarbon"):
            for key, value in parser.items("codecarbon"):
                values[key], sources[key] = value, str(path)
    for name, value in (os.environ if environ is None else environ).items():
        if name.lower().startswith("codecarbon_"):
            key = name.lower().removeprefix("codecarbon_")
            values[key], sources[key] = value, name
    return values, sources


def _parse(key: str, text: str, source: str) -> Any:
    if key in BOOLS:
        return text.strip().lower() == "true"  # CodeCarbon's reading: anything else is False
    if key in FLOATS:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}: {text!r} from {source} is not a number") from None
    return text.strip()


def resolve(
    given: Mapping[str, Any],
    home: Path | None = None,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Every honoured keyword's value (``given`` holds the tracker's keywords, None where not given) and the
    names of the other CodeCarbon options the configuration sets (reported as not implemented)."""
    values, sources = external(home, cwd, environ)
    out: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        if given.get(key) is not None:
            out[key] = given[key]
        elif key in values:
            out[key] = _parse(key, values[key], sources[key])
            log.info("carbond.codecarbon: %s from %s", key, sources[key])
        else:
            out[key] = default
    return out, sorted(k for k in values if k not in DEFAULTS)
