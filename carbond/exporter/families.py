"""Every metric family carbond serves, declared once, in the order of the exposition (:mod:`carbond.exporter.family`
says what a declaration holds and what is derived from it).

The groups follow the body of ``/metrics``: :data:`HEAD` (devices, node, intensity, embodied, uncertainty,
sensors), then the HTTP server's counters (:data:`HTTP`, rendered by :mod:`carbond.exporter.server`), the cgroup
families (:data:`CGROUP`, rendered on the scrape path by :mod:`carbond.exporter.cgroup_lines`), and :data:`TAIL`.

Each entry reads: name, type, unit, ``# HELP``, labels besides host, where the values come from, the README's
meaning; then ``when`` (served only for snapshots where it holds) and ``same_row`` (shares the README row above).
``python -m carbond.exporter.families --markdown`` prints the README's metric table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from carbond import __version__
from carbond.exporter.family import (
    DEVICE,
    Family,
    FromCgroups,
    FromHistogram,
    FromOwner,
    FromSnapshot,
    Sample,
    finite,
    markdown_rows,
)
from carbond.exporter.uncertainty import UNCERTAINTY
from carbond.model import Intensity, Snapshot


def _device_up(s: Snapshot) -> Iterator[Sample]:
    for d in s.devices.states:
        yield (d.device, d.kind, d.sensor), 0.0 if not finite(d.power_w) else 1.0
    for down, sensor in s.devices.unread:
        yield (down.device, down.kind, sensor), 0.0


def _has_platform(s: Snapshot) -> bool:
    return any(d.kind == "platform" for d in s.devices.states)


def _platform_active(s: Snapshot) -> Iterator[Sample]:
    for name in sorted({d.sensor for d in s.devices.states if d.kind == "platform"}):
        yield (name,), 1.0 if s.node.platform == name else 0.0


DEVICES = (
    Family(
        "carbond_device_power_watts", "gauge", "watts", "Mean power over the last interval.", DEVICE,
        FromSnapshot(lambda s: (((d.device, d.kind, d.sensor), d.power_w) for d in s.devices.states
                                if finite(d.power_w))),
        "mean power over the last interval (absent while the device cannot be read: never a stale value or a silent "
        "0); kinds `cpu`, `dram`, `gpu`, `ram`, `soc` and `other` add up to the node exactly; `core`/`uncore` (inside "
        "their package), `psys` (RAPL's platform domain) and `platform` (what the machine draws at the wall) are kinds "
        "of their own, so "
        '`sum by (host) (carbond_device_power_watts{kind=~"cpu\\|dram\\|gpu\\|ram\\|soc\\|other"})` is the node',
    ),
    Family(
        "carbond_device_energy_joules_total", "counter", "joules",
        "IT energy of the device, monotonic across counter wraps.", DEVICE,
        FromSnapshot(lambda s: (((d.device, d.kind, d.sensor), d.energy_j_total) for d in s.devices.states)),
        "IT energy, monotonic across counter wraps",
    ),
    Family(
        "carbond_device_emissions_grams_total", "counter", "grams",
        "Operational emissions of the device: energy x PUE x grid intensity (g CO2e).", ("device", "kind"),
        FromSnapshot(lambda s: (((d.device, d.kind), d.emissions_g_total) for d in s.devices.states)),
        "the device's energy x PUE x grid intensity, tick by tick",
    ),
    Family(
        "carbond_device_up", "gauge", "", "1 while the device was read within the last intervals, else 0.", DEVICE,
        FromSnapshot(_device_up),
        "1 while the device is read, 0 while it is not (beyond the contract)",
    ),
    Family(
        "carbond_device_info", "gauge", "",
        "Model, UUID and how the energy of a device is found (method, and the inputs of a model); always 1.",
        ("device", "model", "uuid", "sensor", "method", "detail"),
        FromSnapshot(lambda s: (((i.device, i.model, i.uuid, i.sensor, i.method, i.detail), 1.0)
                                for i in s.devices.info)),
        "1, for devices a sensor describes: GPUs (method `energy counter` or `power integration`) and the CPU model "
        "(method `tdp`, `tdp-vcpu-share`, `ccf-vcpu` or `per-thread-default`, with its inputs and their source in "
        "`detail`)",
        when=lambda s: bool(s.devices.info),
    ),
)  # fmt: skip

NODE = (
    Family(
        "carbond_node_power_watts", "gauge", "watts",
        "Node IT power without double counting: at the wall where a platform sensor reads, else the components' sum.",
        (), FromSnapshot(lambda s: [((), s.node.power_w)] if finite(s.node.power_w) else []),
        "the node without double counting: at the wall where a platform sensor reads fresh (the components plus "
        "`other`); else psys when present, else packages + DRAM + GPUs; never core/uncore on top of their package, "
        "never a mirrored die twice; the total never steps back when the source changes",
    ),
    Family(
        "carbond_node_energy_joules_total", "counter", "joules", "Node IT energy without double counting.", (),
        FromSnapshot(lambda s: [((), s.node.energy_j_total)]), "", same_row=True,
    ),
    Family(
        "carbond_node_platform_active", "gauge", "",
        "1 when this tick's node figure is what the machine draws at the wall, 0 for the components' sum or the "
        "calibration's model.",
        ("sensor",), FromSnapshot(_platform_active),
        "with a platform sensor: 1 when this tick's node figure is what the machine draws at the wall, 0 when it is "
        "the components' sum or the calibration's model",
        when=_has_platform,
    ),
    Family(
        "carbond_platform_clamped_total", "counter", "",
        "Ticks where the measured components exceeded the platform reading (other held at 0).", (),
        FromSnapshot(lambda s: [((), s.node.platform_clamped_total)]),
        "ticks where the measured components exceeded the wall reading (`other` held at 0, the node is the "
        "components' sum)",
        when=_has_platform,
    ),
    Family(
        "carbond_pue", "gauge", "", "Power usage effectiveness in force.", (),
        FromSnapshot(lambda s: [((), s.node.pue)]), "the PUE in force",
    ),
    Family(
        "carbond_emissions_grams_total", "counter", "grams",
        "Node operational emissions: IT energy x PUE x average grid intensity, integrated tick by tick (g CO2e).", (),
        FromSnapshot(lambda s: [((), s.node.emissions_g_total)]),
        "node IT energy (kWh) x PUE x grid intensity (g/kWh), integrated tick by tick",
    ),
)  # fmt: skip


def _intensities(s: Snapshot) -> Iterator[tuple[Intensity, float]]:
    """The value in force (if any) and those of the other signals, each with its age."""
    if s.intensity.value is not None:
        yield s.intensity.value, s.intensity.age_s
    yield from s.intensity.other


def _intensity(s: Snapshot) -> Iterator[Sample]:
    for i, _ in _intensities(s):
        year = str(i.year) if i.year is not None else ""
        yield (i.zone, i.provider, i.signal, i.factor_type, i.source, year), i.g_per_kwh


def _forecast(s: Snapshot, starts: bool) -> list[Sample]:
    f = s.intensity.forecast
    return [] if f is None else [((f.zone, f.provider, f.signal), f.starts_in_s if starts else f.g_per_kwh)]


FORECAST = ("zone", "provider", "signal")

INTENSITY = (
    Family(
        "carbond_grid_intensity_grams_per_kwh", "gauge", "grams_per_kwh",
        "Grid carbon intensity in force per signal (g CO2e per kWh); emissions use the configured signal (average).",
        ("zone", "provider", "signal", "factor_type", "source", "year"), FromSnapshot(_intensity),
        "the intensity in force for each signal: `average` (what emissions use) and, with WattTime, `marginal` beside "
        "it (never summed with it)",
    ),
    Family(
        "carbond_grid_intensity_age_seconds", "gauge", "seconds",
        "Age of the grid intensity value (time since it was fetched).", ("zone", "provider"),
        FromSnapshot(lambda s: (((i.zone, i.provider), age) for i, age in _intensities(s))),
        "time since that value was fetched (0 for static tables)",
    ),
    Family(
        "carbond_location_info", "gauge", "",
        "The intensity zone in use and where it came from: config, metadata (zone: auto), fallback "
        "(intensity.fallback_zone), timezone (the system time zone's country) or default (world); always 1.",
        ("zone", "source"), FromSnapshot(lambda s: [((s.intensity.zone, s.intensity.zone_source), 1.0)]),
        "1; the zone in use and where it came from: `config` (`intensity.zone`), `metadata` (`zone: auto`), "
        "`fallback` (`intensity.fallback_zone`), `timezone` (the system time zone's country) or `default` (the world "
        "average)",
        when=lambda s: bool(s.intensity.zone_source),
    ),
    Family(
        "carbond_grid_intensity_forecast_lowest_grams_per_kwh", "gauge", "grams_per_kwh",
        "Lowest forecast grid intensity within the next 24 h (g CO2e per kWh).", FORECAST,
        FromSnapshot(lambda s: _forecast(s, starts=False)),
        "lowest forecast value within 24 h and seconds until that window starts (0: now), where a provider forecasts",
        when=lambda s: s.intensity.forecast is not None,
    ),
    Family(
        "carbond_grid_intensity_forecast_lowest_starts_in_seconds", "gauge", "seconds",
        "Seconds until the window of lowest forecast intensity starts (0: it is the current one).", FORECAST,
        FromSnapshot(lambda s: _forecast(s, starts=True)), "",
        when=lambda s: s.intensity.forecast is not None, same_row=True,
    ),
    Family(
        "carbond_intensity_provider_up", "gauge", "",
        "1 while the live intensity provider's last refresh worked, 0 while it fails.", ("provider",),
        FromSnapshot(lambda s: (((p.provider,), 1.0 if p.up else 0.0) for p in s.intensity.providers)),
        "health of each live provider of the chain",
        when=lambda s: bool(s.intensity.providers),
    ),
    Family(
        "carbond_intensity_provider_errors_total", "counter", "", "Failed refreshes of a live intensity provider.",
        ("provider",), FromSnapshot(lambda s: (((p.provider,), p.errors_total) for p in s.intensity.providers)),
        "", when=lambda s: bool(s.intensity.providers), same_row=True,
    ),
)  # fmt: skip

EMBODIED = (
    Family(
        "carbond_embodied_emissions_grams_total", "counter", "grams",
        "Embodied (manufacturing) emissions amortised linearly over the hardware's life while measured (g CO2e).",
        ("device",), FromSnapshot(lambda s: (((device,), grams) for device, grams in s.node.embodied_g_total)),
        "manufacturing emissions amortised over the hardware's life (`server`, and each GPU)",
        when=lambda s: bool(s.node.embodied_g_total),
    ),
)  # fmt: skip

SENSORS = (
    Family(
        "carbond_sensor_up", "gauge", "", "1 while the sensor reads, 0 while it fails.", ("sensor",),
        FromSnapshot(lambda s: (((x.name,), 1.0 if x.up else 0.0) for x in s.health.sensors)),
        "sensor health (errors include one device of several failing)",
    ),
    Family(
        "carbond_sensor_errors_total", "counter", "", "Failed sensor reads.", ("sensor",),
        FromSnapshot(lambda s: (((x.name,), x.errors_total) for x in s.health.sensors)), "", same_row=True,
    ),
)  # fmt: skip

HEAD = (*DEVICES, *NODE, *INTENSITY, *EMBODIED, *UNCERTAINTY, *SENSORS)

SERVER = FromOwner("carbond.exporter.server: the HTTP server's counters, as fresh as the last tick")

HTTP = (
    Family(
        "carbond_http_connections_evicted_total", "counter", "",
        "Connections dropped to make room for a new one, by the limit reached (web.max_connections, or TLS "
        "handshakes in progress).",
        ("limit",), SERVER,
        "connections dropped for a new one at `web.max_connections` (`connections`) or at the TLS handshake limit "
        "(`handshakes`)",
    ),
    Family(
        "carbond_http_connections_refused_total", "counter", "",
        "New connections closed at once because every open one was being answered.", (), SERVER,
        "new connections closed at once because every open one was being answered",
    ),
    Family(
        "carbond_http_tls_handshake_timeouts_total", "counter", "",
        "TLS handshakes not finished in time (the connection is dropped).", (), SERVER,
        "TLS handshakes not finished within 10 s",
    ),
    Family(
        "carbond_http_logins_refused_total", "counter", "",
        "Requests refused by basic auth or the web config's rate_limit, by reason: missing (no or malformed "
        "credentials), wrong (user or password), rate_limited (the client's failed-login budget is spent), "
        "busy (no bcrypt check could start in time), rate_limit (the web config's request rate).",
        ("reason",), SERVER,
        "refused requests (0 without basic auth) by `missing` (no or malformed credentials), `wrong` (user or "
        "password), `rate_limited` (the address's failed-login budget is spent), `busy` (no bcrypt check could start "
        "within 10 s), `rate_limit` (the web config's `rate_limit`); the HTTP counters are as fresh as the last tick",
    ),
)  # fmt: skip

#: For :mod:`carbond.exporter.server`, which renders them with :func:`carbond.exporter.family.to_metric`.
HTTP_EVICTED, HTTP_REFUSED, HTTP_TLS_TIMEOUTS, HTTP_LOGINS_REFUSED = HTTP

CGROUP_IDS = ("unit", "pod_uid", "pod_namespace", "pod_name", "container_id", "container_name", "team", "project")

CGROUP = (
    Family(
        "carbond_cgroup_power_watts", "gauge", "watts", "Power attributed to a cgroup.",
        ("cgroup", "kind", *CGROUP_IDS), FromCgroups("power_w"),
        "power attributed to a cgroup (or to `(idle)`, `(unattributed)`, `(other)`; at `attribution.granularity` pod "
        "or namespace, to a pod or a namespace); `team`/`project` from copied Kubernetes labels or "
        "`attribution.units`, plus a `label_<name>` for each other allowlisted label (`attribution.labels`)",
        when=lambda s: bool(s.cgroups),
    ),
    Family(
        "carbond_cgroup_energy_joules_total", "counter", "joules", "Energy attributed to a cgroup.",
        ("cgroup", "kind", *CGROUP_IDS), FromCgroups("energy_j"),
        "energy attributed to it; per kind, the cgroups plus the pseudo-cgroups sum to the node's energy",
        when=lambda s: bool(s.cgroups),
    ),
    Family(
        "carbond_cgroup_emissions_grams_total", "counter", "grams",
        "Operational emissions attributed to a cgroup (g CO2e).", ("cgroup", *CGROUP_IDS),
        FromCgroups("emissions_g_total"), "its energy x PUE x intensity, tick by tick",
        when=lambda s: bool(s.cgroups),
    ),
)  # fmt: skip

TAIL = (
    Family(
        "carbond_pod_names_refresh_errors_total", "counter", "",
        "Failed refreshes of the Kubernetes pod names (the last good names stay in use).", (),
        FromSnapshot(lambda s: [((), s.health.pod_names_errors or 0)]),
        "failed refreshes of Kubernetes pod names (only with `attribution.kubernetes`)",
        when=lambda s: s.health.pod_names_errors is not None,
    ),
    Family(
        "carbond_tick_duration_seconds", "histogram", "seconds", "Time to take one measurement.", (),
        FromHistogram(lambda s: s.health.tick_duration), "time to take one measurement",
    ),
    Family(
        "carbond_state_persist_errors_total", "counter", "",
        "Failed writes of the persisted counters and intensity cache.", (),
        FromSnapshot(lambda s: [((), s.health.state_persist_errors or 0)]),
        "failed writes of the persisted counters and of the intensity cache",
        when=lambda s: s.health.state_persist_errors is not None,
    ),
    Family(
        "carbond_build_info", "gauge", "", "carbond version; always 1.", ("version",),
        FromSnapshot(lambda s: [((__version__,), 1.0)]), "1",
    ),
)  # fmt: skip

#: Every family, in the order of the exposition.
FAMILIES = (*HEAD, *HTTP, *CGROUP, *TAIL)
BY_NAME = {f.name: f for f in FAMILIES}


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m carbond.exporter.families --markdown", file=sys.stderr)
        return 2
    print("\n".join(markdown_rows(FAMILIES)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
