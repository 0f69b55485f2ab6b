"""Golden end to end, node_exporter style (its ``collector/fixtures`` + ``e2e-output.txt``): the real ``carbond run``
process on a whole fixture host (:mod:`carbond.testing.fixture_host`: powercap psys/package/core/dram, /proc, a
cgroup v2 tree with systemd services, a docker container and a Kubernetes pod, two fake NVML GPUs), the GB Carbon
Intensity API and a Kubernetes API server faked on loopback. After at least three 1 s ticks its whole ``/metrics``
body is normalised and diffed against ``tests/golden/e2e-metrics.txt``; a failure prints a unified diff.

Rewrite the golden after an intended change, then review its diff like code::

    CARBOND_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e/test_golden.py
    .venv/bin/python -m pytest tests/e2e/test_golden.py --update-golden

Normalisation (what the golden pins, and what it leaves to timing):

- ``# HELP`` and ``# TYPE`` lines, sample names, full label sets (names, values, order) and the order of the
  series are kept exactly as served.
- Values kept exactly: those the fixture or the build fixes, i.e. ``carbond_pue``, ``carbond_build_info``, every
  ``*_up`` and ``*_info`` gauge, the error counters (``carbond_sensor_errors_total``,
  ``carbond_intensity_provider_errors_total``, ``carbond_pod_names_refresh_errors_total``,
  ``carbond_state_persist_errors_total``: every fake is healthy, so 0), the grid intensity and the lowest forecast
  value (the fake's canned numbers), the age of a ``static`` intensity (0), and the histogram's ``le`` labels.
- ``~X``: power the fixture drives at constant watts (``carbond_device_power_watts``, ``carbond_node_power_watts``)
  is within ``POWER_TOLERANCE`` (5 %) of ``X``, the watts :class:`FixtureHost` sets (node: psys plus the GPUs,
  as carbond counts the node when psys is present). 5 %, not less: a RAPL counter carries the value of the writer
  thread's last write, so a 10 ms scheduling delay on a busy 2-core machine already moves a 1 s power by 1 %
  (0.7 % at worst over 32 scrapes on a quiet machine, with the counters rewritten every 5 ms).
- ``<positive>``: finite and > 0; energy, emissions and embodied counters, every cgroup series (the split follows
  CPU-time deltas read at slightly different moments) and the histogram's ``_sum``.
- ``<count>``: a histogram ``_bucket`` or ``_count``: a whole number >= 0; the buckets never decrease and ``+Inf``
  equals ``_count``, which is at least ``MIN_TICKS``.
- ``<lo..hi>``: within [lo, hi]: the age of a live intensity value (``<0..60>``) and the seconds until the lowest
  forecast window starts (``<0..3600>``: the fake's lowest half-hour is the third from the current one).
- A value that fails its check is written ``!<value> (expected ...)``, and a family without a rule
  ``!<value> (no normalisation rule)``, so the diff shows it; the golden is never rewritten with either.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carbond.testing.fixture_host import NODE, FixtureHost, ServedInThread
from carbond.testing.provider_fakes import FakeInThread, FakeUkGrid
from tests.harness.daemon import Daemon, parse_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests" / "golden" / "e2e-metrics.txt"
README = ROOT / "README.md"
UPDATE_ENV = "CARBOND_UPDATE_GOLDEN"
POWER_TOLERANCE = 0.05
MIN_TICKS = 3
READY_TIMEOUT_S = 12.0

# ---- normalisation ---------------------------------------------------------------------------------------------

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
}
RANGES = {
    "carbond_grid_intensity_age_seconds": (0.0, 60.0),
    "carbond_grid_intensity_forecast_lowest_starts_in_seconds": (0.0, 3600.0),
}
HISTOGRAMS = {"carbond_tick_duration_seconds"}

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


def normalise(body: str, expected_power: Expected) -> list[str]:
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
        canon = _canonical(family, name, labels, value, raw, expected_power, histograms)
        out.append(f"{name}{label_text} {canon}")
    return out


def _canonical(
    family: str,
    name: str,
    labels: dict[str, str],
    value: float,
    raw: str,
    expected_power: Expected,
    histograms: dict[str, _Histogram],
) -> str:
    if family in EXACT or (family == "carbond_grid_intensity_age_seconds" and labels.get("provider") == "static"):
        return raw
    if family in APPROX:
        want = expected_power(family, labels)
        if want is None:
            return _failed(raw, "a power the fixture sets")
        if math.isfinite(value) and abs(value - want) <= POWER_TOLERANCE * want:
            return f"~{_fmt(want)}"
        return _failed(raw, f"~{_fmt(want)} within {POWER_TOLERANCE:.0%}")
    if family in POSITIVE:
        return "<positive>" if math.isfinite(value) and value > 0 else _failed(raw, "<positive>")
    if family in RANGES:
        lo, hi = RANGES[family]
        span = f"<{lo:g}..{hi:g}>"
        return span if lo <= value <= hi else _failed(raw, span)
    if family in HISTOGRAMS:
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
    return f"!{raw} (no normalisation rule)"


def expected_power(host: FixtureHost) -> Expected:
    devices = {**host.rapl_watts(), **host.gpu_watts()}
    # the node when psys is present: psys (the whole platform: package and dram are inside it) plus the GPUs
    node = host.rapl_watts()["psys"] + sum(host.gpu_watts().values())

    def lookup(family: str, labels: dict[str, str]) -> float | None:
        if family == "carbond_node_power_watts":
            return node
        return devices.get(labels.get("device", ""))

    return lookup


# ---- the run ---------------------------------------------------------------------------------------------------

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _ready(m: Metrics) -> bool:
    """Enough ticks, the pod names fetched, the live intensity value and its forecast in force."""
    ticks = [v for (n, _), v in m.items() if n == "carbond_tick_duration_seconds_count"]
    return (
        bool(ticks)
        and ticks[0] >= MIN_TICKS
        and any(n == "carbond_cgroup_energy_joules_total" and dict(lab).get("pod_name") for (n, lab) in m)
        and any(n == "carbond_grid_intensity_forecast_lowest_grams_per_kwh" for (n, _) in m)
        and any(n == "carbond_grid_intensity_grams_per_kwh" and ("provider", "ukgrid") in lab for (n, lab) in m)
    )


def _scrape_when_ready(d: Daemon) -> str:
    """The /metrics body once :func:`_ready`, or the last one at the deadline (the diff then shows what lacks)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status, raw = d.get("/metrics")
        body = raw.decode()
        if status == 200 and (_ready(parse_metrics(body)) or time.monotonic() > deadline):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"/metrics answered {status}: {body[:500]}\n{d.log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return os.environ.get(UPDATE_ENV, "") not in ("", "0") or bool(request.config.getoption("--update-golden"))


def test_metrics_match_golden(tmp_path: Path, update_golden: bool) -> None:
    host = FixtureHost(tmp_path / "host")
    with (
        ServedInThread(host.kubernetes()) as kube,
        FakeInThread(FakeUkGrid(forecast=266.0, actual=263.0)) as uk,
        host.running(),
    ):
        cfg = {
            "host_name": NODE,
            "measure_power_secs": 1,
            "pue": 1.2,
            "sensors": ["rapl", "nvml"],
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
    actual = normalise(body, expected_power(host))
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


# ---- the golden covers the README's metric table ---------------------------------------------------------------


@dataclass(frozen=True)
class ReadmeMetric:
    name: str
    type: str
    labels: frozenset[str]  # besides host


def readme_metrics(text: str) -> list[ReadmeMetric]:
    """The rows of the README's "Metrics" table: ``| `a` / `..._b` | gauge / counter | labels | meaning |``.

    ``..._suffix`` abbreviates the previous name of the cell: its last words (as many as the suffix has) are
    replaced. A labels cell of "the same" repeats the previous row's, "the same without X" drops X from them.
    """
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    out: list[ReadmeMetric] = []
    previous: frozenset[str] = frozenset()
    for row in section.splitlines():
        if not row.startswith("| `carbond_"):
            continue
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names: list[str] = []
        for token in re.findall(r"`([^`]+)`", cells[0]):
            if token.startswith("..._"):
                suffix = token[len("...") :]
                words = names[-1].split("_")
                token = "_".join(words[: -(suffix.count("_"))]) + suffix
            names.append(token)
        types = [t.strip() for t in cells[1].split("/")]
        types = types if len(types) == len(names) else types[:1] * len(names)
        label_cell = cells[2]
        if label_cell.startswith("the same"):
            dropped = label_cell.removeprefix("the same").strip().removeprefix("without").strip()
            labels = previous - {x.strip() for x in dropped.split(",") if x.strip()}
        else:
            labels = frozenset(x.strip() for x in label_cell.split(",") if x.strip())
        previous = labels
        out.extend(ReadmeMetric(n, t, labels) for n, t in zip(names, types, strict=True))
    return out


def golden_families(lines: list[str]) -> Iterator[tuple[str, str, frozenset[str]]]:
    """(family, type, label names of its samples but host and le) of each ``# TYPE`` line of the golden."""
    family, kind = "", ""
    labels: set[str] = set()
    for line in [*lines, "# TYPE end end"]:
        if line.startswith("# TYPE "):
            if family:
                yield family, kind, frozenset(labels)
            _, _, family, kind = line.split()
            labels = set()
        elif not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m is not None, line
            labels |= {k for k, _ in _LABEL.findall(m["labels"] or "")} - {"host", "le"}


def test_golden_covers_every_readme_metric() -> None:
    documented = readme_metrics(README.read_text())
    assert len(documented) >= 25, [m.name for m in documented]  # the table parsed, not an empty match
    golden = {name: (kind, labels) for name, kind, labels in golden_families(GOLDEN.read_text().splitlines())}
    missing = [m.name for m in documented if m.name not in golden]
    assert not missing, f"families in the README's Metrics table but not in {GOLDEN.name}: {missing}"
    wrong = [
        (m.name, (m.type, sorted(m.labels)), (golden[m.name][0], sorted(golden[m.name][1])))
        for m in documented
        if (m.type, m.labels) != golden[m.name]
    ]
    assert not wrong, f"type or labels differ between the README (first) and the golden (second): {wrong}"
    undocumented = sorted(golden.keys() - {m.name for m in documented})
    assert not undocumented, f"families in {GOLDEN.name} that the README's Metrics table does not list: {undocumented}"


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
        "!330.0 (expected ~300.0 within 5%)",
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
