"""Grid intensity end to end: the real daemon process against loopback fakes of Electricity Maps, WattTime and the
GB Carbon Intensity API (each served from a thread of this process), scraped over HTTP like Prometheus does."""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from carbond.intensity.persist import FILE_NAME
from carbond.intensity.static import lookup
from carbond.testing.provider_fakes import FakeElectricityMaps, FakeInThread, FakeUkGrid, FakeWattTime
from tests.harness.daemon import Daemon
from tests.harness.wait import eventually

pytestmark = pytest.mark.e2e

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]

HOST = "e2e-intensity"
PUE = 1.5
GRID = "carbond_grid_intensity_grams_per_kwh"
AGE = "carbond_grid_intensity_age_seconds"
UP = "carbond_intensity_provider_up"
ERRORS = "carbond_intensity_provider_errors_total"
LOWEST = "carbond_grid_intensity_forecast_lowest_grams_per_kwh"
LOWEST_IN = "carbond_grid_intensity_forecast_lowest_starts_in_seconds"
#: A provider timeout longer than any wait of a loaded machine: a start or stop held up by a hung request shows.
TIMEOUT_S = 60.0
EM_TOKEN_ENV = "CARBOND_E2E_EM_TOKEN"
WT_PASSWORD_ENV = "CARBOND_E2E_WT_PASSWORD"


def series(m: Metrics, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(lab), v)
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    ]


def value(m: Metrics, name: str, **labels: str) -> float:
    hits = series(m, name, **labels)
    assert len(hits) == 1, (name, labels, hits)
    return hits[0][1]


def has(m: Metrics, name: str, **labels: str) -> bool:
    return bool(series(m, name, **labels))


def intensity_series(m: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {n: series(m, n) for n in (GRID, AGE, UP, ERRORS)}


def wait_for(d: Daemon, ready: Callable[[Metrics], bool], what: str) -> Metrics:
    """Scrape until ``ready(metrics)`` and return that scrape; the last intensity series in the failure message."""
    return d.wait_for(lambda m: m if ready(m) else None, what=what, show=intensity_series)


def config(intensity: dict[str, Any]) -> dict[str, Any]:
    return {"measure_power_secs": 0.5, "sensors": ["fake"], "pue": PUE, "host_name": HOST, "intensity": intensity}


def secret(kind: str) -> str:
    return f"{kind}-secret-{uuid.uuid4().hex}"


def em_section(em: FakeInThread[FakeElectricityMaps]) -> dict[str, Any]:
    return {"base_url": em.url, "token_env": EM_TOKEN_ENV}


def emissions_delta(a: Metrics, b: Metrics) -> tuple[float, float]:
    """(node energy J, node emissions g) between two scrapes."""
    d_energy = value(b, "carbond_node_energy_joules_total") - value(a, "carbond_node_energy_joules_total")
    d_em = value(b, "carbond_emissions_grams_total") - value(a, "carbond_emissions_grams_total")
    assert d_energy > 40.0  # the fake sensor's 46 W over at least one 0.5 s tick
    return d_energy, d_em


@contextmanager
def electricitymaps(token: str, g_per_kwh: float = 103.0) -> Iterator[FakeInThread[FakeElectricityMaps]]:
    with FakeInThread(FakeElectricityMaps(token=token, g_per_kwh=g_per_kwh)) as em:
        yield em


# ---- 1. each provider's value reaches /metrics with its labels and units ---------------------------------------


def test_electricitymaps_value_labels_forecast_and_emissions(tmp_path: Path) -> None:
    token = secret("em")
    with electricitymaps(token) as em:
        em.set(factor_type="direct")  # the label must come from the response, not from a default
        cfg = config(
            {
                "zone": "FR",
                "providers": ["electricitymaps", "static"],
                "refresh_secs": 2,
                "max_age_secs": 60,
                "electricitymaps": em_section(em),
            }
        )
        with Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token}) as d:
            a = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), "the Electricity Maps value")
            # one average value in force: the static one of the same signal is not exported beside it
            [(labels, g)] = series(a, GRID)
            assert labels == {
                "host": HOST,
                "zone": "FR",
                "provider": "electricitymaps",
                "signal": "average",
                "factor_type": "direct",
                "source": "electricitymaps",
                "year": "",
            }
            assert g == 103.0
            assert 0.0 <= value(a, AGE, zone="FR", provider="electricitymaps") < 2.5
            assert value(a, UP, provider="electricitymaps") == 1.0
            assert value(a, ERRORS, provider="electricitymaps") == 0.0
            # the fake's forecast is 120, 110, 95, 60, ... per hour from the current one: lowest 60, 3 h from its start
            a = wait_for(d, lambda m: has(m, LOWEST), "the forecast")
            assert value(a, LOWEST, zone="FR", provider="electricitymaps", signal="average") == 60.0
            assert 2 * 3600 <= value(a, LOWEST_IN, provider="electricitymaps") <= 3 * 3600

            # emissions integrate the value in force: energy x PUE x 103 g/kWh
            b = d.wait_for_ticks(2)
            assert value(b, GRID, provider="electricitymaps") == 103.0
            d_energy, d_em = emissions_delta(a, b)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * 103.0, rel=1e-3)

            # a new value reaches /metrics with the next refresh: the first fetch after the change is served
            fetched = em.count("/v3/carbon-intensity/latest")
            em.set(g_per_kwh=150.0)
            wait_for(d, lambda m: value(m, GRID, provider="electricitymaps") == 150.0, "the new value")
            assert em.count("/v3/carbon-intensity/latest") <= fetched + 2  # one fetch, and at most the next begun
        assert em.count("/v3/carbon-intensity/latest") >= 2


def test_watttime_is_exported_as_marginal_and_never_summed(tmp_path: Path) -> None:
    password = secret("wt")
    lbs = 800.0
    with FakeInThread(FakeWattTime(username="carbond", password=password, lbs_per_mwh=lbs)) as wt:
        cfg = config(
            {
                "zone": "US-CA",
                "providers": ["watttime", "static"],
                "refresh_secs": 30,
                "max_age_secs": 60,
                "watttime": {
                    "base_url": wt.url,
                    "username": "carbond",
                    "password_env": WT_PASSWORD_ENV,
                    "region": "CAISO_NORTH",
                },
            }
        )
        with Daemon(tmp_path, cfg, env={WT_PASSWORD_ENV: password}) as d:
            a = wait_for(d, lambda m: has(m, GRID, signal="marginal"), "the WattTime value")
            [(labels, marginal)] = series(a, GRID, signal="marginal")
            assert labels == {
                "host": HOST,
                "zone": "CAISO_NORTH",
                "provider": "watttime",
                "signal": "marginal",
                "factor_type": "direct",
                "source": "watttime",
                "year": "",
            }
            assert marginal == pytest.approx(lbs * 0.45359237, rel=1e-9)  # lb/MWh -> g/kWh
            assert value(a, AGE, provider="watttime") >= 0.0
            assert value(a, UP, provider="watttime") == 1.0
            # the average value in force stays the static one
            static = lookup("US-CA")
            assert static is not None
            [(labels, average)] = series(a, GRID, signal="average")
            assert labels["provider"] == "static"
            assert labels["zone"] == "US-CA"
            assert labels["source"] == static.source
            assert labels["year"] == str(static.year)
            assert average == static.g_per_kwh

            b = d.wait_for_ticks(2)
            assert wt.count("horizon_hours=24") >= 1  # the forecast was fetched, and
            assert not has(b, LOWEST)  # a marginal forecast does not stand in for the (absent) average one
            d_energy, d_em = emissions_delta(a, b)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * static.g_per_kwh, rel=1e-3)
            assert d_em != pytest.approx(d_energy / 3.6e6 * PUE * marginal, rel=0.1)
        assert wt.count("/login") == 1  # one token for the value and the forecast


def test_ukgrid_actual_value_is_direct(tmp_path: Path) -> None:
    with FakeInThread(FakeUkGrid(forecast=266.0, actual=263.0)) as uk:
        cfg = config(
            {
                "zone": "GB",
                "providers": ["ukgrid", "static"],
                "refresh_secs": 30,
                "max_age_secs": 60,
                "ukgrid": {"base_url": uk.url},
            }
        )
        with Daemon(tmp_path, cfg) as d:
            a = wait_for(d, lambda m: has(m, GRID, provider="ukgrid") and has(m, LOWEST), "the GB value")
            [(labels, g)] = series(a, GRID)
            assert labels == {
                "host": HOST,
                "zone": "GB",
                "provider": "ukgrid",
                "signal": "average",
                "factor_type": "direct",
                "source": "ukgrid",
                "year": "",
            }
            assert g == 263.0  # the measured actual, not the 266 forecast
            assert value(a, UP, provider="ukgrid") == 1.0
            assert value(a, LOWEST, zone="GB", provider="ukgrid") == 150.0  # the third half-hour
            b = d.wait_for_ticks(2)
            d_energy, d_em = emissions_delta(a, b)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * 263.0, rel=1e-3)


# ---- 2. a provider goes down: the last value ages, then the chain falls back ----------------------------------------


@pytest.mark.parametrize("outage", ["http-500", "stopped"])
def test_provider_down_keeps_last_value_then_falls_back_to_static(tmp_path: Path, outage: str) -> None:
    token = secret("em")
    max_age = 4.0
    with electricitymaps(token) as em:
        cfg = config(
            {
                "zone": "FR",
                "providers": ["electricitymaps", "static"],
                "refresh_secs": 1,
                "max_age_secs": max_age,
                "retry_min_secs": 0.2,
                "forecast": False,
                "electricitymaps": em_section(em),
            }
        )
        with Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token}) as d:
            wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), "the Electricity Maps value")
            if outage == "http-500":
                em.fail(500)
            else:
                em.stop()

            m1 = wait_for(d, lambda m: value(m, UP, provider="electricitymaps") == 0.0, "provider_up 0")
            assert value(m1, GRID, provider="electricitymaps", zone="FR") == 103.0  # the last good value, still
            assert value(m1, ERRORS, provider="electricitymaps") >= 1.0
            age1 = value(m1, AGE, provider="electricitymaps")

            def aged() -> tuple[float, Metrics] | None:
                """(when the scrape began, the scrape) once the last good value is served 0.5 s older: it ages in
                the open (a fallback meanwhile fails here: its series is gone)."""
                began = time.monotonic()
                m = d.scrape()
                return (began, m) if value(m, AGE, provider="electricitymaps") >= age1 + 0.5 else None

            t2, m2 = eventually(aged, what="the last good value ageing")
            age2 = value(m2, AGE, provider="electricitymaps")
            assert value(m2, GRID, provider="electricitymaps") == 103.0
            assert value(m2, UP, provider="electricitymaps") == 0.0

            m3 = wait_for(d, lambda m: has(m, GRID, provider="static"), "the fallback to static")
            fell_back = time.monotonic()
            # not before the last good value was max_age old: a served snapshot is at most a 0.5 s tick old, plus
            # the daemon's lateness on its slot (half a tick allowed), so m2's age may lag the truth by a second
            assert fell_back >= t2 + (max_age - age2) - 1.0
            static = lookup("FR")
            assert static is not None
            [(labels, g)] = series(m3, GRID)
            assert (labels["provider"], labels["zone"], labels["signal"]) == ("static", "FR", "average")
            assert g == static.g_per_kwh
            assert value(m3, AGE, provider="static") == 0.0
            assert not has(m3, AGE, provider="electricitymaps")
            assert value(m3, UP, provider="electricitymaps") == 0.0
            assert value(m3, ERRORS, provider="electricitymaps") >= 2.0  # retried meanwhile

            # emissions now accrue at the static value
            m4 = d.wait_for_ticks(2)
            assert value(m4, GRID, provider="static") == static.g_per_kwh
            d_energy, d_em = emissions_delta(m3, m4)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * static.g_per_kwh, rel=1e-3)

            if outage == "http-500":  # recovery within one (capped) backoff: at most refresh_secs
                em.ok()
                m5 = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), "the recovery")
                assert value(m5, UP, provider="electricitymaps") == 1.0
                assert not has(m5, GRID, provider="static")
        log = d.log()
    assert log.count('"event": "intensity_provider_failed"') == 1  # once per failure streak, not per retry
    assert '"event": "intensity_source_changed"' in log
    if outage == "http-500":
        assert '"event": "intensity_provider_recovered"' in log


# ---- 3. a restart serves the persisted value at once ------------------------------------------------------------


@pytest.mark.parametrize("outage", ["hang", "stopped"])
def test_restart_serves_the_persisted_value_at_once(tmp_path: Path, outage: str) -> None:
    token = secret("em")
    with electricitymaps(token) as em:
        cfg = config(
            {
                "zone": "FR",
                "providers": ["electricitymaps", "static"],
                "refresh_secs": 600,
                "max_age_secs": 1200,
                "timeout_secs": TIMEOUT_S,
                "electricitymaps": em_section(em),
            }
        )
        d = Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token})
        try:
            first_start = time.time()
            d.start()
            wait_for(d, lambda m: has(m, GRID, provider="electricitymaps") and has(m, LOWEST), "the first good fetch")
            cache = tmp_path / "state" / FILE_NAME
            eventually(lambda: cache.exists() and "electricitymaps" in cache.read_text(), what=f"the value in {cache}")
            assert d.stop() == 0
            stopped = time.time()

            fetches = em.count("/v3/carbon-intensity/latest")
            if outage == "hang":
                em.hang()
            else:
                em.stop()
            time.sleep(1.0)  # the downtime under test: the served age must be the true one, not 0

            restarting = time.time()
            started = time.monotonic()
            d.start()
            ready_s = time.monotonic() - started
            m = d.scrape()  # the very first scrape
            scraped = time.time()
            [(labels, g)] = series(m, GRID)
            assert (labels["provider"], labels["zone"], labels["factor_type"]) == ("electricitymaps", "FR", "lifecycle")
            assert g == 103.0
            age = value(m, AGE, provider="electricitymaps")
            # fetched before the stop, served after the restart began: at least the downtime measured
            assert restarting - stopped <= age <= scraped - first_start
            assert value(m, LOWEST, provider="electricitymaps") == 60.0  # the persisted forecast, too
            assert ready_s < TIMEOUT_S / 2  # not held up by the provider's timeout
            if outage == "hang":  # it did ask again, and the request is still pending
                eventually(
                    lambda: em.count("/v3/carbon-intensity/latest") > fetches,
                    what="the restarted daemon asking the provider",
                )
            stopping = time.monotonic()
            assert d.stop() == 0
            assert time.monotonic() - stopping < TIMEOUT_S / 2  # a pending provider request does not hold up SIGTERM
        finally:
            d.stop()
    assert '"event": "intensity_cache_loaded"' in d.log()


def test_numbers_too_large_for_a_float_are_skipped_not_fatal(tmp_path: Path) -> None:
    """A cache entry that does not decode (a number too large for a float) is skipped: the daemon starts and
    refetches, instead of crash-looping on a file that nothing would ever rewrite. Such a forecast point is skipped
    too, not the whole forecast."""
    token = secret("em")
    (tmp_path / "state").mkdir()
    value_doc = {
        "g_per_kwh": 99,
        "provider": "electricitymaps",
        "zone": "FR",
        "observed_at": 0,
        "signal": "average",
        "factor_type": "lifecycle",
    }
    entry = {"key": "electricitymaps:FR", "fetched_at": 10**400, "value": value_doc, "forecast": []}
    doc = json.dumps({"version": 1, "providers": {"electricitymaps": entry}})  # Python writes the integer as is
    (tmp_path / "state" / FILE_NAME).write_text(doc)
    with electricitymaps(token) as em:
        em.set(forecast=[120, 10**400, 95, 60, 80] + [130] * 19)
        cfg = config({"zone": "FR", "providers": ["electricitymaps", "static"], "electricitymaps": em_section(em)})
        with Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token}) as d:
            m = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), "a fresh value")
            assert value(m, GRID, provider="electricitymaps") == 103.0
            m = wait_for(d, lambda m: has(m, LOWEST), "the forecast without its absurd point")
            assert value(m, LOWEST, provider="electricitymaps") == 60.0
    assert '"event": "intensity_cache_entry_ignored"' in d.log()
    assert "Traceback" not in d.log()


# ---- 4. a hanging provider slows neither scrapes nor readiness ------------------------------------------------------


def scrape_latencies(daemons: tuple[Daemon, Daemon], n: int = 100) -> tuple[list[float], list[float]]:
    """``n`` scrapes of each daemon, taken in turn, so that whatever else the machine does slows both alike."""
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for d, lat in zip(daemons, out, strict=True):
            t0 = time.perf_counter()
            status, body = d.get("/metrics")
            lat.append(time.perf_counter() - t0)
            assert status == 200
            assert b"carbond_grid_intensity_grams_per_kwh" in body
    return out


def test_hanging_provider_delays_neither_scrapes_nor_readiness(tmp_path: Path) -> None:
    token = secret("em")
    with electricitymaps(token) as em:
        cfg = config(
            {
                "zone": "FR",
                "providers": ["electricitymaps", "static"],
                "refresh_secs": 600,
                "timeout_secs": TIMEOUT_S,
                "electricitymaps": em_section(em),
            }
        )
        (tmp_path / "healthy").mkdir()
        (tmp_path / "hanging").mkdir()
        with Daemon(tmp_path / "healthy", cfg, env={EM_TOKEN_ENV: token}) as healthy:
            wait_for(healthy, lambda m: has(m, GRID, provider="electricitymaps"), "the Electricity Maps value")
            em.hang()  # longer than the test; the healthy daemon does not ask again (600 s refresh)
            asked = em.count("/v3/carbon-intensity/latest")
            hanging = Daemon(tmp_path / "hanging", cfg, env={EM_TOKEN_ENV: token})
            started = time.monotonic()
            with hanging:
                ready_hang = time.monotonic() - started
                assert ready_hang < TIMEOUT_S / 2, ready_hang  # not held up by the provider's timeout
                eventually(  # its request is pending from now on
                    lambda: em.count("/v3/carbon-intensity/latest") > asked, what="the daemon asking the provider"
                )
                lat_ok, lat_hang = scrape_latencies((healthy, hanging))
                m = hanging.scrape()
                assert value(m, GRID, provider="static", zone="FR") > 0  # nothing fetched yet: static serves
                assert value(m, UP, provider="electricitymaps") == 0.0
                assert value(m, ERRORS, provider="electricitymaps") == 0.0  # still waiting: no timeout yet
                stopping = time.monotonic()
                assert hanging.stop() == 0
                assert time.monotonic() - stopping < TIMEOUT_S / 2  # a pending request does not hold up SIGTERM

    p50_ok, p50_hang = statistics.median(lat_ok), statistics.median(lat_hang)
    max_ok, max_hang = max(lat_ok), max(lat_hang)
    report = f"p50 {p50_ok * 1e3:.2f} -> {p50_hang * 1e3:.2f} ms, max {max_ok * 1e3:.1f} -> {max_hang * 1e3:.1f} ms"
    assert max_hang < max(0.5, 3 * max_ok), report
    assert p50_hang < max(0.010, 3 * p50_ok), report


# ---- 5. secrets appear nowhere ------------------------------------------------------------------------------------


def test_secrets_never_reach_the_log_metrics_or_state(tmp_path: Path) -> None:
    token, password = secret("em"), secret("wt")
    with (
        electricitymaps(token) as em,
        FakeInThread(FakeWattTime(username="carbond", password=password)) as wt,
    ):
        cfg = config(
            {
                "zone": "US-CA",
                "providers": ["electricitymaps", "watttime", "static"],
                "refresh_secs": 1,
                "retry_min_secs": 0.2,
                "max_age_secs": 60,
                "electricitymaps": em_section(em),
                "watttime": {
                    "base_url": wt.url,
                    "username": "carbond",
                    "password_env": WT_PASSWORD_ENV,
                    "region": "CAISO_NORTH",
                },
            }
        )
        with Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token, WT_PASSWORD_ENV: password}) as d:
            wait_for(
                d,
                lambda m: has(m, GRID, provider="electricitymaps") and has(m, GRID, provider="watttime"),
                "both live values",
            )
            good = d.get("/metrics")[1].decode()
            # the credentials are revoked upstream: every request now answers 401
            em.set(token=secret("rotated"))
            wt.set(password=secret("rotated"))
            wt.call(wt.fake.expire_tokens)
            m = wait_for(
                d,
                lambda m: value(m, UP, provider="electricitymaps") == 0 and value(m, UP, provider="watttime") == 0,
                "both providers down on 401",
            )
            assert value(m, ERRORS, provider="electricitymaps") >= 1
            assert value(m, ERRORS, provider="watttime") >= 1
            errors = value(m, ERRORS, provider="electricitymaps") + value(m, ERRORS, provider="watttime")
            wait_for(  # a few more failed retries
                d,
                lambda m: (
                    value(m, ERRORS, provider="electricitymaps") + value(m, ERRORS, provider="watttime") >= errors + 2
                ),
                "more failed retries",
            )
            bad = d.get("/metrics")[1].decode()
            om = d.get("/metrics", headers={"Accept": "application/openmetrics-text"})[1].decode()
        bearer = sorted(wt.call(lambda: {h.get("Authorization", "") for h in wt.fake.headers}) - {""})
    log = d.log()
    basic = base64.b64encode(f"carbond:{password}".encode()).decode()
    secrets = [token, password, basic, *(h.split(" ", 1)[1] for h in bearer)]
    assert any(s.startswith("wt-token-") for s in secrets)  # the issued WattTime tokens are checked, too
    state = "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert "electricitymaps" in state
    for where, text in (("log", log), ("metrics", good + bad + om), ("state dir", state)):
        for s in secrets:
            assert s not in text, f"a secret ({s[:12]}...) in the {where}"
    assert '"reason": "HTTP 401"' in log
    assert '"reason": "login: HTTP 401"' in log
