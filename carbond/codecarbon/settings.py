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
#: CodeCarbon 3.3's tracker keywords, in the order of its signature (positional arguments follow it), and its
#: defaults (None: not set); the location keywords are the offline tracker's
DEFAULTS: dict[str, Any] = {
    "project_name": "codecarbon",
    "measure_power_secs": 15.0,
    "api_call_interval": 8.0,
    "api_endpoint": None,
    "api_key": None,
    "output_dir": ".",
    "output_file": "emissions.csv",
    "output_methods": None,
    "save_to_file": True,
    "save_to_api": False,
    "save_to_logger": False,
    "logging_logger": None,
    "save_to_prometheus": False,
    "save_to_logfire": False,
    "prometheus_url": "localhost:9091",
    "output_handlers": None,
    "gpu_ids": None,
    "emissions_endpoint": None,
    "experiment_id": DEFAULT_EXPERIMENT_ID,
    "experiment_name": "base",
    "electricitymaps_api_token": None,
    "co2_signal_api_token": None,
    "tracking_mode": "machine",
    "log_level": None,
    "on_csv_write": "append",
    "logger_preamble": None,
    "force_cpu_power": None,
    "force_ram_power": None,
    "pue": None,
    "wue": 0.0,
    "force_carbon_intensity_g_co2e_kwh": None,
    "force_mode_cpu_load": False,
    "allow_multiple_runs": True,
    "rapl_include_dram": False,
    "rapl_prefer_psys": None,
    "metadata": None,
    "country_iso_code": None,
    "region": None,
    "cloud_provider": None,
    "cloud_region": None,
    "country_2letter_iso_code": None,
}
FLOATS = frozenset(
    {"measure_power_secs", "api_call_interval", "pue", "wue", "force_cpu_power", "force_ram_power"}
    | {"force_carbon_intensity_g_co2e_kwh"}
)
BOOLS = frozenset(
    {"save_to_file", "save_to_api", "save_to_logger", "save_to_prometheus", "save_to_logfire", "allow_multiple_runs"}
    | {"force_mode_cpu_load", "rapl_include_dram", "rapl_prefer_psys"}
)


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
        except (configparser.Error, UnicodeDecodeError) as exc:  # the program goes on: say which file is skipped
            log.error("carbond.codecarbon: %s is not a CodeCarbon config file (%s): ignored", path, exc)
            continue
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
        except ValueError:  # CodeCarbon logs it and goes on with the default: so does carbond
            log.error(
                "carbond.codecarbon: %s: %r from %s is not a number: ignored, the default used", key, text, source
            )
            return None
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
        elif key in values and (parsed := _parse(key, values[key], sources[key])) is not None:
            out[key] = parsed
            log.info("carbond.codecarbon: %s from %s", key, sources[key])
        else:
            out[key] = default
    return out, sorted(k for k in values if k not in DEFAULTS)
