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


def wait_for(d: Daemon, ready: Callable[[Metrics], bool], timeout: float, what: str) -> Metrics:
    """Scrape every 50 ms until ``ready(metrics)``; the last intensity series in the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        m = d.scrape()
        if ready(m):
            return m
        if time.monotonic() > deadline:
            shown = {n: series(m, n) for n in (GRID, AGE, UP, ERRORS)}
            pytest.fail(f"not within {timeout} s: {what}; last scrape: {shown}")
        time.sleep(0.05)


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
            a = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), 5, "the Electricity Maps value")
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
            a = wait_for(d, lambda m: has(m, LOWEST), 3, "the forecast")
            assert value(a, LOWEST, zone="FR", provider="electricitymaps", signal="average") == 60.0
            assert 2 * 3600 <= value(a, LOWEST_IN, provider="electricitymaps") <= 3 * 3600

            # emissions integrate the value in force: energy x PUE x 103 g/kWh
            time.sleep(1.6)
            b = d.scrape()
            assert value(b, GRID, provider="electricitymaps") == 103.0
            d_energy, d_em = emissions_delta(a, b)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * 103.0, rel=1e-3)

            # a new value reaches /metrics within one refresh (2 s +10 % jitter, plus a tick)
            em.set(g_per_kwh=150.0)
            wait_for(d, lambda m: value(m, GRID, provider="electricitymaps") == 150.0, 2.2 + 0.8, "the new value")
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
            a = wait_for(d, lambda m: has(m, GRID, signal="marginal"), 5, "the WattTime value")
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
            assert labels["provider"] == "static" and labels["zone"] == "US-CA"
            assert labels["source"] == static.source and labels["year"] == str(static.year)
            assert average == static.g_per_kwh

            time.sleep(1.6)
            b = d.scrape()
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
            a = wait_for(d, lambda m: has(m, GRID, provider="ukgrid") and has(m, LOWEST), 5, "the GB value")
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
            time.sleep(1.1)
            b = d.scrape()
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
            wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), 5, "the Electricity Maps value")
            if outage == "http-500":
                em.fail(500)
            else:
                em.stop()

            m1 = wait_for(d, lambda m: value(m, UP, provider="electricitymaps") == 0.0, 3, "provider_up 0")
            assert value(m1, GRID, provider="electricitymaps", zone="FR") == 103.0  # the last good value, still
            assert value(m1, ERRORS, provider="electricitymaps") >= 1.0
            age1 = value(m1, AGE, provider="electricitymaps")
            time.sleep(1.2)  # each scrape's snapshot may be up to one 0.5 s tick old: the age grows >= 0.7 s
            t2 = time.monotonic()
            m2 = d.scrape()
            age2 = value(m2, AGE, provider="electricitymaps")
            assert value(m2, GRID, provider="electricitymaps") == 103.0
            assert age2 >= age1 + 0.5  # it ages in the open
            assert value(m2, UP, provider="electricitymaps") == 0.0

            m3 = wait_for(d, lambda m: has(m, GRID, provider="static"), max_age + 3, "the fallback to static")
            fell_back = time.monotonic()
            # not before the last good value was max_age old (the served snapshot may be one 0.5 s tick old)
            assert fell_back >= t2 + (max_age - age2) - 0.7
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
            time.sleep(1.1)
            m4 = d.scrape()
            assert value(m4, GRID, provider="static") == static.g_per_kwh
            d_energy, d_em = emissions_delta(m3, m4)
            assert d_em == pytest.approx(d_energy / 3.6e6 * PUE * static.g_per_kwh, rel=1e-3)

            if outage == "http-500":  # recovery within one (capped) backoff: at most refresh_secs
                em.ok()
                m5 = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), 1.1 + 1.5, "the recovery")
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
                "refresh_secs": 60,
                "max_age_secs": 120,
                "electricitymaps": em_section(em),
            }
        )
        d = Daemon(tmp_path, cfg, env={EM_TOKEN_ENV: token})
        try:
            first_start = time.time()
            d.start()
            wait_for(
                d, lambda m: has(m, GRID, provider="electricitymaps") and has(m, LOWEST), 5, "the first good fetch"
            )
            cache = tmp_path / "state" / FILE_NAME
            deadline = time.monotonic() + 3
            while not (cache.exists() and "electricitymaps" in cache.read_text()):
                assert time.monotonic() < deadline, f"no {cache}"
                time.sleep(0.05)
            assert d.stop() == 0

            fetches = em.count("/v3/carbon-intensity/latest")
            if outage == "hang":
                em.hang()
            else:
                em.stop()
            time.sleep(1.0)  # so that the age is clearly the true one, not 0

            started = time.monotonic()
            d.start()
            ready_s = time.monotonic() - started
            m = d.scrape()  # the very first scrape
            scraped = time.time()
            [(labels, g)] = series(m, GRID)
            assert (labels["provider"], labels["zone"], labels["factor_type"]) == ("electricitymaps", "FR", "lifecycle")
            assert g == 103.0
            age = value(m, AGE, provider="electricitymaps")
            assert 1.0 <= age <= scraped - first_start
            assert value(m, LOWEST, provider="electricitymaps") == 60.0  # the persisted forecast, too
            assert ready_s < 5.0  # not held up by the provider (its timeout is 10 s)
            if outage == "hang":  # it did ask again, and the request is still pending
                deadline = time.monotonic() + 3
                while em.count("/v3/carbon-intensity/latest") <= fetches:
                    assert time.monotonic() < deadline, "the restarted daemon never asked the provider"
                    time.sleep(0.05)
            stopping = time.monotonic()
            assert d.stop() == 0
            assert time.monotonic() - stopping < 5.0  # a pending provider request does not hold up SIGTERM
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
            m = wait_for(d, lambda m: has(m, GRID, provider="electricitymaps"), 5, "a fresh value")
            assert value(m, GRID, provider="electricitymaps") == 103.0
            m = wait_for(d, lambda m: has(m, LOWEST), 3, "the forecast without its absurd point")
            assert value(m, LOWEST, provider="electricitymaps") == 60.0
    assert '"event": "intensity_cache_entry_ignored"' in d.log()
    assert "Traceback" not in d.log()


# ---- 4. a hanging provider slows neither scrapes nor readiness ------------------------------------------------------


def scrape_latencies(d: Daemon, n: int = 50) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = d.get("/metrics")
        out.append(time.perf_counter() - t0)
        assert status == 200 and b"carbond_grid_intensity_grams_per_kwh" in body
        time.sleep(0.02)
    return out


def test_hanging_provider_delays_neither_scrapes_nor_readiness(tmp_path: Path) -> None:
    token = secret("em")
    with electricitymaps(token) as em:
        cfg = config(
            {
                "zone": "FR",
                "providers": ["electricitymaps", "static"],
                "refresh_secs": 60,
                "timeout_secs": 10,
                "electricitymaps": em_section(em),
            }
        )
        (tmp_path / "healthy").mkdir()
        (tmp_path / "hanging").mkdir()
        healthy = Daemon(tmp_path / "healthy", cfg, env={EM_TOKEN_ENV: token})
        started = time.monotonic()
        with healthy:
            ready_ok = time.monotonic() - started
            wait_for(healthy, lambda m: has(m, GRID, provider="electricitymaps"), 5, "the Electricity Maps value")
            lat_ok = scrape_latencies(healthy)

        em.hang()  # longer than the test
        asked = em.count("/v3/carbon-intensity/latest")
        hanging = Daemon(tmp_path / "hanging", cfg, env={EM_TOKEN_ENV: token})
        started = time.monotonic()
        with hanging:
            ready_hang = time.monotonic() - started
            assert ready_hang < 5.0 and ready_hang < ready_ok + 2.0, (ready_ok, ready_hang)  # the timeout is 10 s
            deadline = time.monotonic() + 3
            while em.count("/v3/carbon-intensity/latest") <= asked:  # its request is pending from now on
                assert time.monotonic() < deadline, "the daemon never asked the provider"
                time.sleep(0.02)
            lat_hang = scrape_latencies(hanging)
            m = hanging.scrape()
            assert value(m, GRID, provider="static", zone="FR") > 0  # nothing fetched yet: static serves
            assert value(m, UP, provider="electricitymaps") == 0.0
            assert value(m, ERRORS, provider="electricitymaps") == 0.0  # still waiting: no timeout yet
            stopping = time.monotonic()
            assert hanging.stop() == 0
            assert time.monotonic() - stopping < 5.0

    p50_ok, p50_hang = statistics.median(lat_ok), statistics.median(lat_hang)
    report = f"p50 {p50_ok * 1e3:.2f} -> {p50_hang * 1e3:.2f} ms, max {max(lat_hang) * 1e3:.1f} ms"
    assert max(lat_hang) < 0.5, report
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
                5,
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
                4,
                "both providers down on 401",
            )
            assert value(m, ERRORS, provider="electricitymaps") >= 1
            assert value(m, ERRORS, provider="watttime") >= 1
            time.sleep(0.5)  # a few more failed retries
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
    assert '"reason": "HTTP 401"' in log and '"reason": "login: HTTP 401"' in log  # the failures were logged
