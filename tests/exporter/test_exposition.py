from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from carbond.exporter.families import FAMILIES
from carbond.exporter.family import FromOwner
from carbond.exporter.server import MetricsCache, start_server
from carbond.model import Snapshot
from tests.harness.snapshots import frozen_snapshot

GOLDEN = Path(__file__).parent.parent / "golden" / "metrics.txt"


def render(snap: Snapshot, openmetrics: bool = False) -> str:
    body = MetricsCache(lambda: snap).body(openmetrics, gzipped=False)
    assert body is not None
    return body.decode()


@pytest.mark.asyncio
async def test_golden_metrics() -> None:
    text = render(await frozen_snapshot())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


@pytest.mark.asyncio
async def test_contract_names_types_and_values() -> None:
    snap = await frozen_snapshot()
    fams = {f.name: f for f in text_string_to_metric_families(render(snap))}
    served = [f for f in FAMILIES if f.served(snap) and not isinstance(f.source, FromOwner)]
    assert len(served) >= 25
    assert [f.name.removesuffix("_total") for f in served] == list(fams)  # every one, in the declared order
    for fam in served:
        assert fams[fam.name.removesuffix("_total")].type == fam.type, fam.name
        for sample in fams[fam.name.removesuffix("_total")].samples:
            assert sample.labels["host"] == "node-a"
    node = fams["carbond_node_power_watts"].samples[0]
    assert node.value == pytest.approx(46.0)
    em = fams["carbond_emissions_grams"].samples[0]
    assert em.name == "carbond_emissions_grams_total"
    assert em.value == pytest.approx(46 * 60 / 3.6e6 * 1.25 * 56.0, rel=1e-9)
    grid = fams["carbond_grid_intensity_grams_per_kwh"].samples[0]
    assert grid.labels == {
        "host": "node-a",
        "zone": "FR",
        "provider": "static",
        "signal": "average",
        "factor_type": "lifecycle",
        "source": "owid",
        "year": "2023",
    }
    embodied = fams["carbond_embodied_emissions_grams"].samples[0]
    assert embodied.labels == {"host": "node-a", "device": "server"}
    assert embodied.value == pytest.approx(1000 * 1000 * 60 / (4 * 365.25 * 86400), rel=1e-9)  # 4-year life, 60 s
    core = [s for s in fams["carbond_device_power_watts"].samples if s.labels["device"] == "core-0"]
    assert core[0].labels == {"host": "node-a", "device": "core-0", "kind": "core", "sensor": "fake"}


@pytest.mark.asyncio
async def test_promtool_check_metrics_prints_nothing(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "check", "metrics"],
        input=render(await frozen_snapshot()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", out.stdout
    assert out.stderr.strip() == "", out.stderr


@pytest.mark.asyncio
async def test_openmetrics_parses_strictly() -> None:
    # promtool reads only the text format; OpenMetrics is checked by the reference parser
    fams = {f.name: f for f in om_parse(render(await frozen_snapshot(), openmetrics=True))}
    assert fams["carbond_node_energy_joules"].type == "counter"
    assert fams["carbond_node_energy_joules"].samples[0].name == "carbond_node_energy_joules_total"


@pytest.mark.asyncio
async def test_render_happens_once_per_snapshot() -> None:
    snap = await frozen_snapshot()
    cache = MetricsCache(lambda: snap)
    first = cache.body(False, False)
    assert cache.body(False, False) is first  # the same bytes object: not rendered again


@pytest.mark.asyncio
async def test_http_endpoints() -> None:
    state: dict[str, Snapshot | None] = {"snap": None}
    server = await start_server(lambda: state["snap"], "127.0.0.1", 0)
    client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}")
    try:
        r = await client.get("/readyz")
        assert r.status == 503
        r = await client.get("/metrics")
        assert r.status == 503
        assert (await client.get("/healthz")).status == 200
        state["snap"] = await frozen_snapshot()
        assert (await client.get("/readyz")).status == 200
        r = await client.get("/metrics")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "carbond_node_power_watts" in await r.text()
        r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await r.text()).endswith("# EOF\n")
        r = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"carbond_pue" in gzip.decompress(await r.read())
        r = await client.get("/")
        assert r.status == 200
        assert 'href="metrics"' in await r.text()
        assert (await client.post("/metrics")).status == 405
        assert (await client.get("/nope")).status == 404
        assert (await client.head("/metrics")).status == 200
    finally:
        await client.close()
        await server.close()


@pytest.mark.asyncio
async def test_cache_follows_the_snapshot_not_its_seq() -> None:
    a = await frozen_snapshot()
    b = dataclasses.replace(a, node=dataclasses.replace(a.node, pue=1.5))  # same seq, as after a reload
    current = [a]
    cache = MetricsCache(lambda: current[0])
    assert b'carbond_pue{host="node-a"} 1.25' in (cache.body(False, False) or b"")
    current[0] = b
    assert b'carbond_pue{host="node-a"} 1.5' in (cache.body(False, False) or b"")
