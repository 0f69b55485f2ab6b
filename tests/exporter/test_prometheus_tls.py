"""The real Prometheus scrapes the daemon over mutual TLS with RequireAnyClientCert and a client certificate the
configured CA did not sign (Go accepts any certificate in that mode; carbond used to verify it and refuse)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.exporter import certs
from tests.harness.daemon import Daemon, free_port
from tests.harness.tools import require_tool
from tests.harness.wait import eventually

pytestmark = pytest.mark.e2e


def targets(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
        active: list[dict[str, Any]] = json.load(r)["data"]["activeTargets"]
        return active


def test_prometheus_scrapes_over_mutual_tls(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", "prometheus")
    ca = certs.ca(tmp_path)
    server = certs.signed(tmp_path, "server", ca, "localhost", "IP:127.0.0.1")
    client = certs.self_signed(tmp_path, "client", "prometheus", "DNS:prometheus")
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {server.cert}\n  key_file: {server.key}\n"
        f"  client_ca_file: {ca.cert}\n  client_auth_type: RequireAnyClientCert\n"  # the CA does not sign it
    )
    daemon = Daemon(tmp_path, {"sensors": ["tdp"], "measure_power_secs": 0.5, "web": {"config_file": str(web)}})
    daemon.url = daemon.url.replace("http://", "https://")
    with contextlib.suppress(RuntimeError):  # the harness's probe does not trust this CA: wait for the port only
        daemon.start(ready_timeout=2)
    api = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 500ms, scrape_timeout: 400ms}\nscrape_configs:\n- job_name: carbond\n"
        f"  scheme: https\n  tls_config: {{ca_file: {ca.cert}, cert_file: {client.cert}, key_file: {client.key}}}\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{daemon.port}']}}]\n"
    )
    args = [
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{api}",
    ]
    prom = subprocess.Popen([prometheus, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def scraped() -> list[dict[str, Any]] | None:
            found = targets(api)
            return found if found and found[0]["health"] != "unknown" else None

        found = eventually(scraped, 60, what="a first scrape by Prometheus", ignore=(OSError,))
        assert found[0]["health"] == "up", found
        assert found[0]["lastError"] == ""
    finally:
        prom.terminate()
        prom.wait(10)
        daemon.stop()
