from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from carbond.errors import ConfigError
from carbond.exporter import webconfig
from carbond.exporter.server import start_server
from tests.harness.daemon import free_port
from tests.harness.snapshots import frozen_snapshot
from tests.harness.tools import require_tool


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_cert(tmp: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl")
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def write_web_config(tmp: Path, cert: Path, key: Path) -> Path:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    p = tmp / "web.yml"
    p.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prom: '{hashed}'\n")
    return p


@pytest.mark.asyncio
async def test_tls_and_basic_auth(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    cfg = webconfig.load(write_web_config(tmp_path, cert, key))
    snap = await frozen_snapshot()
    port = free_port()
    assert cfg.tls_server_config is not None
    server = await start_server(
        lambda: snap, "127.0.0.1", port, webconfig.ssl_context(cfg.tls_server_config), cfg.basic_auth_users
    )
    client_ctx = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics", ssl=client_ctx) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
                no_creds = await r.text()
            async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("prom", "wrong")) as r:
                assert r.status == 401 and await r.text() == no_creds
            async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("nobody", "s3cret")) as r:
                assert r.status == 401 and await r.text() == no_creds  # which part was wrong is not revealed
            for _ in range(2):  # the second time from the credential cache
                async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("prom", "s3cret")) as r:
                    assert r.status == 200 and "carbond_node_power_watts" in await r.text()
            async with s.get(url + "/healthz", ssl=client_ctx) as r:
                assert r.status == 200  # probes need no credentials
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    assert r.status != 200  # pragma: no cover - plain HTTP never gets an answer
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("basic_auth_users:\n  prom: plaintext\n", "basic_auth_users.prom"),
        ("tls_server_config:\n  cert_file: /nope\n  key_file: /nope\n", "tls_server_config"),
        ("tls_srv_config: {}\n", "tls_srv_config"),
    ],
)
def test_bad_web_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "web.yml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        webconfig.load(p)
    assert key in [k for k, _ in info.value.problems]


def test_require_client_cert_needs_a_ca(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    p = tmp_path / "web.yml"
    p.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: RequireAndVerifyClientCert\n"
    )
    with pytest.raises(ConfigError, match="client_ca_file"):
        webconfig.load(p)


@pytest.mark.asyncio
async def test_oversized_headers_are_refused() -> None:
    snap = await frozen_snapshot()
    port = free_port()
    server = await start_server(lambda: snap, "127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers = "".join(f"X-H{i}: v\r\n" for i in range(100))
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.split()[1] in (b"400", b"431")
        writer.close()
    finally:
        await server.close()
