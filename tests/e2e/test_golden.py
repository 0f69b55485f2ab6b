"""Golden end to end, node_exporter style (its ``collector/fixtures`` + ``e2e-output.txt``): the real ``carbond run``
process on a whole fixture host (:mod:`carbond.testing.fixture_host`: powercap psys/package/core/dram, an ACPI
power meter at the wall read by the ``hwmon`` sensor, /proc, a cgroup v2 tree with systemd services, a docker
container and a Kubernetes pod, two fake NVML GPUs), the GB Carbon Intensity API and a Kubernetes API server faked
on loopback. After at least three 1 s ticks its whole ``/metrics`` body is normalised and diffed against
``tests/golden/e2e-metrics.txt``; a failure prints a unified diff.

Rewrite the golden after an intended change, then review its diff like code::

    CARBOND_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e/test_golden.py
    .venv/bin/python -m pytest tests/e2e/test_golden.py --update-golden

Normalisation (what the golden pins, and what it leaves to timing):

- ``# HELP`` and ``# TYPE`` lines, sample names, full label sets (names, values, order) and the order of the
  series are kept exactly as served.
- Values kept exactly: those the fixture or the build fixes, i.e. ``carbond_pue``, ``carbond_build_info``, every
  ``*_up`` and ``*_info`` gauge (``carbond_uncertainty_dominant_info``'s term is the live intensity's: its 14 % is
  well above the energy's 5 % and the PUE's 4 %), the error counters (``carbond_sensor_errors_total``,
  ``carbond_intensity_provider_errors_total``, ``carbond_pod_names_refresh_errors_total``,
  ``carbond_state_persist_errors_total``: every fake is healthy, so 0), the grid intensity and the lowest forecast
  value (the fake's canned numbers), the age of a ``static`` intensity (0), the histogram's ``le`` labels, the
  configured ``carbond_pue_uncertainty`` and the intensity's ``carbond_grid_intensity_uncertainty_ratio`` (fixed
  bands), ``carbond_node_platform_active`` (1: the meter reads fresh every tick), ``carbond_calibration_in_use``
  (0: the node is the wall measured, not modelled) and the HTTP server's counters (0: the test's scrapes are one
  connection at a time, never evicted or refused, over plain HTTP, and there is no web config to refuse a login).
- ``~X``: power the fixture drives at constant watts (``carbond_device_power_watts``, ``carbond_node_power_watts``)
  is within ``POWER_TOLERANCE`` (5 %) of ``X``, the watts :class:`FixtureHost` sets (node: the wall, as carbond
  counts the node when a platform sensor reads fresh; ``other``: the wall minus psys and the GPUs, the node's
  components when psys is present), or within what the writer's measured staleness allows if
  that is more: a RAPL counter carries the value of the writer thread's last write, so a 10 ms scheduling delay
  on a busy 2-core machine already moves a 1 s power by 1 %; the writer's clock
  (:class:`tests.harness.wait.GapClock`) records the longest delay, and a power over one tick may be off by twice
  that over the tick (0.7 % at worst over 32 scrapes on a quiet machine, with the counters rewritten every 5 ms).
- ``<positive>``: finite and > 0; energy, emissions and embodied counters, every cgroup series (the split follows
  CPU-time deltas read at slightly different moments), the histogram's ``_sum`` and the standard uncertainties of
  powers, energies and emissions (every band in play is above 0; their size follows the totals).
- ``<count>``: a histogram ``_bucket`` or ``_count``: a whole number >= 0; the buckets never decrease and ``+Inf``
  equals ``_count``, which is at least ``MIN_TICKS``.
- ``<lo..hi>``: within [lo, hi]: the age of a live intensity value (``<0..60>``), the seconds until the lowest
  forecast window starts (``<0..3600>``: the fake's lowest half-hour is the third from the current one) and the
  wall calibration's samples (``<1..29>``: a few ticks, below the 30 the fit needs, so its ``model`` is ``none`` and
  its coefficients and quality have no sample: see :data:`UNSAMPLED`) and ``carbond_platform_clamped_total``
  (``<0..3>``: the wall is 85 W above the components, but in the first ticks after the baselines the components'
  deltas and the meter's can cover different spans on a loaded machine, and a tick is clamped; seen once beside
  two CPU hogs).
- A value that fails its check is written ``!<value> (expected ...)``, and a family without a rule
  ``!<value> (no normalisation rule)``, so the diff shows it; the golden is never rewritten with either.

Coverage comes from the declarations (:data:`carbond.exporter.families.FAMILIES`): the golden holds every declared
family, in order, with its type, help and labels, and with samples unless :data:`UNSAMPLED` says why not; every
declared family has one normalisation rule. A new family fails here until the fixture serves it and the golden is
rewritten.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from carbond.exporter.families import BY_NAME, FAMILIES
from carbond.testing.cgroupfs import CgroupWriter
from carbond.testing.fixture_host import BUSY, NODE, RAPL_WATTS, WALL_DEVICE, FixtureHost, ServedInThread
from carbond.testing.powercap import PowercapWriter
from carbond.testing.provider_fakes import FakeInThread, FakeUkGrid
from tests.harness.daemon import Daemon, parse_metrics
from tests.harness.wait import DEFAULT_TIMEOUT_S, GapClock, NotYet, eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests" / "golden" / "e2e-metrics.txt"
UPDATE_ENV = "CARBOND_UPDATE_GOLDEN"
POWER_TOLERANCE = 0.05
MIN_TICKS = 3
READY_TIMEOUT_S = DEFAULT_TIMEOUT_S

# ---- normalisation ---------------------------------------------------------------------------------------------

#: One rule per declared family (carbond.exporter.families) except those in UNSAMPLED (checked below).
EXACT = {
    "carbond_pue",
    "carbond_build_info",
    "carbond_device_up",
    "carbond_device_info",
    "carbond_location_info",
    "carbond_sensor_up",
    "carbond_sensor_errors_total",
    "carbond_grid_intensity_grams_per_kwh",
    "carbond_grid_intensity_forecast_lowest_grams_per_kwh",
    "carbond_intensity_provider_up",
    "carbond_intensity_provider_errors_total",
    "carbond_pod_names_refresh_errors_total",
    "carbond_state_persist_errors_total",
    "carbond_uncertainty_dominant_info",
    "carbond_pue_uncertainty",
    "carbond_grid_intensity_uncertainty_ratio",
    "carbond_node_platform_active",
    "carbond_calibration_in_use",
    "carbond_http_connections_evicted_total",
    "carbond_http_connections_refused_total",
    "carbond_http_tls_handshake_timeouts_total",
    "carbond_http_logins_refused_total",
}
APPROX = {"carbond_device_power_watts", "carbond_node_power_watts"}
POSITIVE = {
    "carbond_device_energy_joules_total",
    "carbond_device_emissions_grams_total",
    "carbond_node_energy_joules_total",
    "carbond_emissions_grams_total",
    "carbond_embodied_emissions_grams_total",
    "carbond_cgroup_power_watts",
    "carbond_cgroup_energy_joules_total",
    "carbond_cgroup_emissions_grams_total",
    "carbond_device_power_uncertainty_watts",
    "carbond_device_energy_uncertainty_joules",
    "carbond_node_power_uncertainty_watts",
    "carbond_node_energy_uncertainty_joules",
    "carbond_emissions_uncertainty_grams",
    "carbond_embodied_emissions_uncertainty_grams",
}
RANGES = {
    "carbond_grid_intensity_age_seconds": (0.0, 60.0),
    "carbond_grid_intensity_forecast_lowest_starts_in_seconds": (0.0, 3600.0),
    "carbond_calibration_samples": (1.0, 29.0),
    "carbond_platform_clamped_total": (0.0, 3.0),
}
HISTOGRAMS = {f.name for f in FAMILIES if f.type == "histogram"}

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Expected = Callable[[str, dict[str, str]], float | None]


def _fmt(value: float) -> str:
    return repr(float(value))


def _failed(raw: str, expected: str) -> str:
    return f"!{raw} (expected {expected})"


@dataclass
class _Histogram:
    """The checks on one histogram series that span lines: buckets never decrease, +Inf == _count."""

    last_bucket: float = 0.0
    inf: float | None = None


def normalise(body: str, expected_power: Expected, power_tolerance: float = POWER_TOLERANCE) -> list[str]:
    """The body's lines with each value replaced by its canonical form (rules in the module docstring)."""
    out: list[str] = []
    family = ""
    histograms: dict[str, _Histogram] = {}
    for line in body.splitlines():
        if line.startswith("#"):
            if line.startswith("# TYPE "):
                family = line.split()[2]
            out.append(line)
            continue
        m = _SAMPLE.match(line)
        if m is None:
            out.append(f"!{line} (not a sample line)")
            continue
        name, label_text, raw = m["name"], m["labels"] or "", m["value"]
        labels = dict(_LABEL.findall(label_text))
        value = float(raw)
        canon = _canonical(family, name, labels, value, raw, expected_power, power_tolerance, histograms)
        out.append(f"{name}{label_text} {canon}")
    return out


def _canonical(
    family: str,
    name: str,
    labels: dict[str, str],
    value: float,
    raw: str,
    expected_power: Expected,
    power_tolerance: float,
    histograms: dict[str, _Histogram],
) -> str:
    if family in EXACT or (family == "carbond_grid_intensity_age_seconds" and labels.get("provider") == "static"):
        return raw
    if family in APPROX:
        want = expected_power(family, labels)
        if want is None:
            return _failed(raw, "a power the fixture sets")
        if math.isfinite(value) and abs(value - want) <= power_tolerance * want:
            return f"~{_fmt(want)}"
        return _failed(raw, f"~{_fmt(want)} within {power_tolerance:.3g}")
    if family in POSITIVE:
        return "<positive>" if math.isfinite(value) and value > 0 else _failed(raw, "<positive>")
    if family in RANGES:
        lo, hi = RANGES[family]
        span = f"<{lo:g}..{hi:g}>"
        return span if lo <= value <= hi else _failed(raw, span)
    if family in HISTOGRAMS:
        return _histogram(family, name, labels, value, raw, histograms)
    return f"!{raw} (no normalisation rule)"


def _histogram(
    family: str, name: str, labels: dict[str, str], value: float, raw: str, histograms: dict[str, _Histogram]
) -> str:
    key = repr(sorted((k, v) for k, v in labels.items() if k != "le"))
    h = histograms.setdefault(key, _Histogram())
    if name == f"{family}_sum":
        return "<positive>" if math.isfinite(value) and value > 0 else _failed(raw, "<positive>")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        return _failed(raw, "<count>: a whole number >= 0")
    if name == f"{family}_bucket":
        previous, h.last_bucket = h.last_bucket, value
        if labels.get("le") == "+Inf":
            h.inf = value
        if value < previous:
            return _failed(raw, f"<count> >= the previous bucket's {_fmt(previous)}")
        return "<count>"
    if name == f"{family}_count":
        if h.inf is not None and value != h.inf:
            return _failed(raw, f"<count> equal to the +Inf bucket's {_fmt(h.inf)}")
        if value < MIN_TICKS:
            return _failed(raw, f"<count> >= {MIN_TICKS}")
        return "<count>"
    return _failed(raw, "a histogram sample")


def expected_power(host: FixtureHost) -> Expected:
    wall = host.wall_watts()[WALL_DEVICE]
    # the components when psys is present: psys (package and dram are inside it) plus the GPUs; the node is the wall,
    # and ``other`` what the wall draws beyond the components
    components = host.rapl_watts()["psys"] + sum(host.gpu_watts().values())
    devices = {**host.rapl_watts(), **host.gpu_watts(), **host.wall_watts(), "other": wall - components}

    def lookup(family: str, labels: dict[str, str]) -> float | None:
        if family == "carbond_node_power_watts":
            return wall
        return devices.get(labels.get("device", ""))

    return lookup


# ---- the run ---------------------------------------------------------------------------------------------------

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _ready(m: Metrics) -> bool:
    """Enough ticks, the node at the wall, the pod names fetched, the live intensity value and its forecast in force."""
    ticks = [v for (n, _), v in m.items() if n == "carbond_tick_duration_seconds_count"]
    return (
        bool(ticks)
        and ticks[0] >= MIN_TICKS
        and any(n == "carbond_node_platform_active" and v == 1.0 for (n, _), v in m.items())
        and any(n == "carbond_cgroup_energy_joules_total" and dict(lab).get("pod_name") for (n, lab) in m)
        and any(n == "carbond_grid_intensity_forecast_lowest_grams_per_kwh" for (n, _) in m)
        and any(n == "carbond_grid_intensity_grams_per_kwh" and ("provider", "ukgrid") in lab for (n, lab) in m)
    )


def _scrape_when_ready(d: Daemon) -> str:
    """The /metrics body once :func:`_ready`, or the last one at the deadline (the diff then shows what lacks)."""
    last: list[tuple[int, str]] = []

    def ready() -> str | None:
        status, raw = d.get("/metrics")
        last[:] = [(status, raw.decode())]
        return last[0][1] if status == 200 and _ready(parse_metrics(last[0][1])) else None

    try:
        what = "ticks, the node at the wall, pod names and the live intensity"
        return eventually(ready, READY_TIMEOUT_S, what=what, ignore=(OSError,))
    except NotYet:
        if not last or last[0][0] != 200:
            pytest.fail(f"/metrics never answered 200: {last}\n{d.log()[-3000:]}")
        return last[0][1]


@contextmanager
def running(host: FixtureHost, clock: GapClock) -> Iterator[None]:
    """:meth:`FixtureHost.running` with the powercap writer on ``clock``, which records how stale a counter gets."""
    watts = {zone: RAPL_WATTS[name] for name, zone in host.zones.items()}
    with PowercapWriter(watts, clock=clock), CgroupWriter(host.cgroups, host.proc, busy=BUSY):
        yield


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return os.environ.get(UPDATE_ENV, "") not in ("", "0") or bool(request.config.getoption("--update-golden"))


def test_metrics_match_golden(tmp_path: Path, update_golden: bool) -> None:
    host = FixtureHost(tmp_path / "host")
    clock = GapClock()
    with (
        ServedInThread(host.kubernetes()) as kube,
        FakeInThread(FakeUkGrid(forecast=266.0, actual=263.0)) as uk,
        running(host, clock),
    ):
        cfg = {
            "host_name": NODE,
            "measure_power_secs": 1,
            "pue": 1.2,
            "pue_uncertainty": 0.05,
            "sensors": ["hwmon", "rapl", "nvml"],
            "hwmon": {"interval_s": 1},  # the ACPI meter's own averaging interval, the fastest the sensor polls
            "paths": host.paths(),
            "intensity": {
                "zone": "GB",
                "providers": ["ukgrid", "static"],
                "refresh_secs": 600,
                "ukgrid": {"base_url": uk.url},
            },
            "attribution": {
                "kubernetes": {
                    "enabled": True,
                    "source": "apiserver",
                    "api_url": kube.url,
                    "node_name": NODE,
                    "token_file": str(host.kube_token),
                    "ca_file": None,
                }
            },
        }
        with Daemon(tmp_path, cfg, env=host.nvml_env()) as d:
            body = _scrape_when_ready(d)
            log = d.log()
        stale_s = clock.max_gap_s()
    # over one 1 s tick a counter's staleness moves a power by up to 2 x stale_s (1 % for the daemon's own read)
    actual = normalise(body, expected_power(host), max(POWER_TOLERANCE, 0.01 + 2 * stale_s))
    failed = [line for line in actual if not line.startswith("#") and (" !" in line or line.startswith("!"))]
    if update_golden:
        assert not failed, "not rewriting the golden: these values fail their checks\n" + "\n".join(failed)
        GOLDEN.write_text("\n".join(actual) + "\n")
    golden = GOLDEN.read_text().splitlines() if GOLDEN.exists() else []
    if actual != golden:
        diff = "\n".join(
            difflib.unified_diff(
                golden, actual, "tests/golden/e2e-metrics.txt", "normalised /metrics", n=2, lineterm=""
            )
        )
        hint = f"(if the change is intended: {UPDATE_ENV}=1 .venv/bin/python -m pytest tests/e2e/test_golden.py)"
        pytest.fail(f"/metrics differs from the golden {hint}\n{diff}\n\ndaemon log (tail):\n{log[-2000:]}", False)


# ---- the golden covers every declared family -------------------------------------------------------------------


#: Families the golden run serves without a sample (a ``# TYPE`` line alone), so their labels cannot be compared with
#: the declaration's: family -> why. Checked to be exactly the golden's families without samples.
UNSAMPLED = {
    name: "the wall fit has fewer than its 30 samples in a run of a few ticks: model none, no coefficient or quality"
    for name in (
        "carbond_calibration_intercept_watts",
        "carbond_calibration_component_ratio",
        "carbond_calibration_utilisation_watts",
        "carbond_calibration_r_squared",
        "carbond_calibration_residual_watts",
    )
}


def golden_families(lines: list[str]) -> Iterator[tuple[str, str, frozenset[str] | None]]:
    """(family, type, label names of its samples but host and le, None without samples) of each ``# TYPE`` line of
    the golden."""
    family, kind = "", ""
    labels: set[str] | None = None
    for line in [*lines, "# TYPE end end"]:
        if line.startswith("# TYPE "):
            if family:
                yield family, kind, frozenset(labels) if labels is not None else None
            _, _, family, kind = line.split()
            labels = None
        elif not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m is not None, line
            labels = (labels or set()) | {k for k, _ in _LABEL.findall(m["labels"] or "")} - {"host", "le"}


def test_golden_covers_every_declared_family() -> None:
    """Each family of carbond.exporter.families is in the golden, in the declared order, with the declared type,
    help and labels, and with samples unless :data:`UNSAMPLED` says why not: a new family needs a golden sample."""
    lines = GOLDEN.read_text().splitlines()
    golden = {name: (kind, labels) for name, kind, labels in golden_families(lines)}
    assert list(golden) == [f.name for f in FAMILIES], f"{GOLDEN.name} and carbond.exporter.families differ"
    unsampled = sorted(name for name, (_, labels) in golden.items() if labels is None)
    assert unsampled == sorted(UNSAMPLED), f"families without samples in {GOLDEN.name}: {unsampled}"
    wrong = [
        (f.name, (f.type, sorted(f.labels)), (kind, sorted(labels) if labels is not None else "no samples"))
        for f in FAMILIES
        for kind, labels in [golden[f.name]]
        if f.type != kind or (labels is not None and set(f.labels) != labels)
    ]
    assert not wrong, f"type or labels differ between the declaration (first) and the golden (second): {wrong}"
    helps = dict(line.removeprefix("# HELP ").split(" ", 1) for line in lines if line.startswith("# HELP "))
    assert helps == {f.name: f.help for f in FAMILIES}


def test_every_declared_family_has_one_rule() -> None:
    """A declared family has one normalisation rule, or none because the golden run serves it without samples."""
    rules = [EXACT, APPROX, POSITIVE, set(RANGES), HISTOGRAMS, set(UNSAMPLED)]
    named = [name for rule in rules for name in rule]
    assert sorted(named) == sorted(BY_NAME), "each declared family in exactly one rule (or UNSAMPLED)"


def test_normalise_rules() -> None:
    """The normaliser on a hand-made body: each rule, and each way a value fails its check."""
    body = "\n".join(
        [
            "# TYPE carbond_pue gauge",
            'carbond_pue{host="h"} 1.2',
            "# TYPE carbond_device_power_watts gauge",
            'carbond_device_power_watts{device="psys",host="h"} 56.0',
            'carbond_device_power_watts{device="gpu-0",host="h"} 330.0',
            'carbond_device_power_watts{device="gpu-9",host="h"} 1.0',
            "# TYPE carbond_node_energy_joules_total counter",
            'carbond_node_energy_joules_total{host="h"} 0.0',
            "# TYPE carbond_grid_intensity_age_seconds gauge",
            'carbond_grid_intensity_age_seconds{host="h",provider="static",zone="FR"} 0.0',
            'carbond_grid_intensity_age_seconds{host="h",provider="ukgrid",zone="GB"} 61.0',
            "# TYPE carbond_tick_duration_seconds histogram",
            'carbond_tick_duration_seconds_bucket{host="h",le="0.001"} 2.0',
            'carbond_tick_duration_seconds_bucket{host="h",le="+Inf"} 1.0',
            'carbond_tick_duration_seconds_count{host="h"} 3.0',
            'carbond_tick_duration_seconds_sum{host="h"} 0.01',
            "# TYPE carbond_new_thing gauge",
            'carbond_new_thing{host="h"} 7.0',
        ]
    )
    watts = {"psys": 55.0, "gpu-0": 300.0}
    lines = normalise(body, lambda family, labels: watts.get(labels.get("device", "")))
    values = [line.split(" ", 1)[1] for line in lines if not line.startswith("#")]
    assert values == [
        "1.2",
        "~55.0",
        "!330.0 (expected ~300.0 within 0.05)",
        "!1.0 (expected a power the fixture sets)",
        "!0.0 (expected <positive>)",
        "0.0",
        "!61.0 (expected <0..60>)",
        "<count>",
        "!1.0 (expected <count> >= the previous bucket's 2.0)",
        "!3.0 (expected <count> equal to the +Inf bucket's 1.0)",
        "<positive>",
        "!7.0 (no normalisation rule)",
    ]
