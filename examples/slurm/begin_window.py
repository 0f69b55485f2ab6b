#!/usr/bin/env python3
"""Print the ``sbatch --begin=`` option that starts a job in the lowest-carbon window of the next 24 hours.

carbond exports, where its intensity provider forecasts (Electricity Maps, WattTime, the GB Carbon Intensity API):

    carbond_grid_intensity_forecast_lowest_grams_per_kwh{zone, provider, signal}      the lowest forecast value
    carbond_grid_intensity_forecast_lowest_starts_in_seconds{zone, provider, signal}  seconds until it starts (0: now)
    carbond_grid_intensity_grams_per_kwh{zone, provider, signal, ...}                 the value in force now

This script asks Prometheus for them (one instant query each, no carbond or Slurm call), adds the seconds to the time
Prometheus evaluated the query at, and prints ``--begin=YYYY-MM-DDTHH:MM:SS`` in local time (what ``sbatch`` reads),
rounded to the minute: forecast windows start on the hour or half hour. It prints ``--begin=now`` when there is no
forecast for the zone, when the lowest window starts later than ``--max-wait`` hours, or when waiting saves less
than ``--min-saving`` percent against the intensity now. Why goes to stderr; stdout holds only the option:

    sbatch $(begin_window.py --prometheus http://prometheus:9090 --zone DE --max-wait 12) job.sh

Several carbond nodes in one zone export the same forecast; the lowest of their values (the soonest on a tie) is
taken. A job longer than the provider's window (an hour for most) still starts at the window's beginning: the
window is where the forecast is lowest, not a promise for the hours after it. Standard library only (Python 3.9+).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple, TypedDict

LOWEST = "carbond_grid_intensity_forecast_lowest_grams_per_kwh"
STARTS_IN = "carbond_grid_intensity_forecast_lowest_starts_in_seconds"
CURRENT = "carbond_grid_intensity_grams_per_kwh"


class Window(NamedTuple):
    begin: float  # Unix seconds
    g_per_kwh: float
    zone: str
    provider: str


class PrometheusError(Exception):
    pass


class Sample(TypedDict):
    """One item of an instant query's vector."""

    metric: dict[str, str]
    value: list[float | str]  # [evaluation time, "value"]


def _selector(zone: str | None, signal: str) -> str:
    matchers = [f'signal="{signal}"'] + ([f'zone="{zone}"'] if zone else [])
    return "{" + ", ".join(matchers) + "}"


def query(base: str, expr: str, timeout: float = 10.0) -> list[Sample]:
    """The ``result`` of an instant query (a vector: each item has ``metric`` and ``value`` = [time, "value"])."""
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise PrometheusError(f"{url}: HTTP {err.code}: {err.read()[:200]!r}") from None
    except (OSError, ValueError) as err:
        raise PrometheusError(f"{url}: {err}") from None
    if doc.get("status") != "success" or doc.get("data", {}).get("resultType") != "vector":
        raise PrometheusError(f"{url}: {doc.get('error') or doc}")
    result: list[Sample] = doc["data"]["result"]
    return result


def _key(labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels.get(k, "") for k in ("instance", "job", "host", "zone", "provider"))


def lowest_window(base: str, zone: str | None, signal: str = "average") -> Window | None:
    """The lowest forecast window over every node of the zone, as a start time; None without a forecast."""
    sel = _selector(zone, signal)
    starts = {_key(r["metric"]): r["value"] for r in query(base, STARTS_IN + sel)}
    best: Window | None = None
    for r in query(base, LOWEST + sel):
        labels = r["metric"]
        at_and_in = starts.get(_key(labels))
        if at_and_in is None:
            continue
        evaluated_at, starts_in = float(at_and_in[0]), float(at_and_in[1])
        g = float(r["value"][1])
        w = Window(evaluated_at + max(starts_in, 0.0), g, labels.get("zone", ""), labels.get("provider", ""))
        if best is None or (w.g_per_kwh, w.begin) < (best.g_per_kwh, best.begin):
            best = w
    return best


def current_intensity(base: str, zone: str | None, signal: str = "average") -> float | None:
    values = [float(r["value"][1]) for r in query(base, CURRENT + _selector(zone, signal))]
    return min(values) if values else None


def slurm_time(unix_s: float) -> str:
    """Local time rounded to the minute, as ``sbatch --begin`` reads it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(round(unix_s / 60.0) * 60))


def choose(window: Window | None, now_g: float | None, now: float, max_wait_h: float, min_saving_pct: float) -> str:
    """The ``--begin`` value, with why on stderr."""
    if window is None:
        print("begin_window: no forecast for this zone in Prometheus: start now", file=sys.stderr)
        return "now"
    wait_s = window.begin - now
    saving = (1.0 - window.g_per_kwh / now_g) * 100.0 if now_g else None
    about = f"{window.g_per_kwh:g} g/kWh in {window.zone or 'the zone'} ({window.provider})"
    if now_g is not None:
        about += f" against {now_g:g} now"
    if wait_s < 60.0:
        print(f"begin_window: the lowest window, {about}, is now", file=sys.stderr)
        return "now"
    if wait_s > max_wait_h * 3600.0:
        print(
            f"begin_window: the lowest window, {about}, starts in {wait_s / 3600:.1f} h, beyond --max-wait",
            file=sys.stderr,
        )
        return "now"
    if saving is not None and saving < min_saving_pct:
        print(f"begin_window: waiting saves {saving:.0f} % ({about}), under --min-saving: start now", file=sys.stderr)
        return "now"
    print(f"begin_window: lowest window {about}, in {wait_s / 3600:.1f} h", file=sys.stderr)
    return slurm_time(window.begin)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="base URL of the Prometheus that scrapes carbond")
    p.add_argument("--zone", help="the intensity zone (carbond's zone label); every zone when omitted")
    p.add_argument("--signal", default="average", help="average (default) or marginal, where the provider has it")
    p.add_argument("--max-wait", type=float, default=24.0, metavar="HOURS", help="never delay more (default 24)")
    p.add_argument("--min-saving", type=float, default=0.0, metavar="PERCENT", help="delay only if it saves this much")
    args = p.parse_args(argv)
    try:
        window = lowest_window(args.prometheus, args.zone, args.signal)
        now_g = current_intensity(args.prometheus, args.zone, args.signal)
    except PrometheusError as err:
        print(f"begin_window: {err}", file=sys.stderr)
        return 2
    print(f"--begin={choose(window, now_g, time.time(), args.max_wait, args.min_saving)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
