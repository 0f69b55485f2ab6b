"""The web config (exporter-toolkit format): TLS with every client_auth_type, basic auth, headers, what is refused."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import pytest_asyncio

from carbond.errors import ConfigError
from carbond.exporter import webconfig
from carbond.exporter.live import LiveWebConfig
from carbond.exporter.server import start_server
from tests.exporter import certs
from tests.harness.snapshots import frozen_snapshot


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 (also used by tests/deploy/test_image.py)."""
    pair = certs.self_signed(tmp, "tls")
    return pair.cert, pair.key


def write_web_config(tmp: Path, cert: Path, key: Path) -> Path:
    """TLS with ``cert`` and the user prom with password s3cret (also used by tests/deploy/test_image.py)."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    p = tmp / "web.yml"
    p.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prom: '{hashed}'\n")
    return p


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, certs.Pair]:
    tmp = tmp_path_factory.mktemp("pki")
    ca = certs.ca(tmp)
    return {
        "ca": ca,
        "server": certs.signed(tmp, "server", ca, "localhost", "IP:127.0.0.1"),
        "client": certs.signed(tmp, "client", ca, "prometheus", "DNS:prometheus.monitoring"),
        "other": certs.signed(tmp, "other", ca, "intruder", "DNS:intruder.example"),
        "stranger": certs.self_signed(tmp, "stranger", "stranger", "DNS:stranger"),
    }


def write(tmp: Path, text: str) -> Path:
    p = tmp / "web.yml"
    p.write_text(text)
    return p


def tls_yaml(pki: dict[str, certs.Pair], extra: str = "") -> str:
    s = pki["server"]
    return f"tls_server_config:\n  cert_file: {s.cert}\n  key_file: {s.key}\n{extra}"


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[object]:
    servers = []
    snap = await frozen_snapshot()

    async def start(path: Path) -> int:
        live = LiveWebConfig(path, check_interval_s=0)
        server = await start_server(lambda: snap, "127.0.0.1", 0, live)
        servers.append((server, live))
        return server.port

    yield start
    for server, live in servers:
        await server.close()
        live.close()


async def fetch(port: int, pki: dict[str, certs.Pair], client: str | None, path: str = "/healthz") -> int | str:
    """The status of a GET over TLS presenting ``client``'s certificate, or the error's class name."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if client is not None:
        ctx.load_cert_chain(pki[client].cert, pki[client].key)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return int(line.split()[1]) if line else "closed"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__


OK = 200
MODES = {  # client: none, signed by the CA, self-signed stranger -> served?
    "NoClientCert": (True, True, True),
    "RequestClientCert": (True, True, True),
    "RequireAnyClientCert": (False, True, True),
    "RequireClientCert": (False, True, True),  # exporter-toolkit's older name of RequireAnyClientCert
    "VerifyClientCertIfGiven": (True, True, False),
    "RequireAndVerifyClientCert": (False, True, False),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(MODES))
async def test_client_auth_type_has_go_semantics(tmp_path: Path, pki: dict[str, certs.Pair], serve, mode: str) -> None:  # type: ignore[no-untyped-def]
    ca = f"  client_ca_file: {pki['ca'].cert}\n" if mode != "NoClientCert" else ""
    port = await serve(write(tmp_path, tls_yaml(pki, f"{ca}  client_auth_type: {mode}\n")))
    got = [await fetch(port, pki, client) == OK for client in (None, "client", "stranger")]
    assert tuple(got) == MODES[mode]


@pytest.mark.asyncio
async def test_client_allowed_sans(tmp_path: Path, pki: dict[str, certs.Pair], serve) -> None:  # type: ignore[no-untyped-def]
    extra = (
        f"  client_ca_file: {pki['ca'].cert}\n  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_allowed_sans: [prometheus.monitoring]\n"
    )
    port = await serve(write(tmp_path, tls_yaml(pki, extra)))
    assert await fetch(port, pki, "client") == OK
    assert await fetch(port, pki, "other") != OK  # signed by the CA, but not a name on the list


@pytest.mark.asyncio
async def test_tls_basic_auth_and_headers(tmp_path: Path, pki: dict[str, certs.Pair], serve) -> None:  # type: ignore[no-untyped-def]
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    text = tls_yaml(pki) + (
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        "    Strict-Transport-Security: max-age=31536000\n"
        f"basic_auth_users:\n  prom: '{hashed}'\n"
    )
    port = await serve(write(tmp_path, text))
    client_ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    url = f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics", ssl=client_ctx) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Basic")
            assert r.headers["X-Content-Type-Options"] == "nosniff"  # on errors too
            no_creds = await r.text()
        async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("prom", "wrong")) as r:
            assert r.status == 401
            assert await r.text() == no_creds
        async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("nobody", "s3cret")) as r:
            assert r.status == 401
            assert await r.text() == no_creds
        for _ in range(2):  # the second time from the credential cache
            async with s.get(url + "/metrics", ssl=client_ctx, headers=basic("prom", "s3cret")) as r:
                assert r.status == 200
                assert "carbond_node_power_watts" in await r.text()
                assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
        async with s.get(url + "/healthz", ssl=client_ctx) as r:
            assert r.status == 200  # probes need no credentials
    # plain HTTP on the TLS port: a readable 400, not a reset or a hang
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert b"https://" in answer
    writer.close()


@pytest.mark.asyncio
async def test_min_version_and_cipher_suites(tmp_path: Path, pki: dict[str, certs.Pair], serve) -> None:  # type: ignore[no-untyped-def]
    extra = "  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n"
    no_http2 = "http_server_config:\n  http2: false\n"  # with HTTP/2 on, Go needs an AES_128_GCM suite listed
    port = await serve(write(tmp_path, tls_yaml(pki, extra) + no_http2))
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.2"
    assert ssl_object.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    writer.close()
    port13 = await serve(write(tmp_path, tls_yaml(pki, "  min_version: TLS13\n")))
    old = ssl.create_default_context(cafile=str(pki["ca"].cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port13, ssl=old), 5)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("basic_auth_users:\n  prom: plaintext\n", "basic_auth_users.prom"),
        # bcrypt's costs are 4 to 31: beyond, the dummy hash failed on its thread and every unknown user got a 500
        ("basic_auth_users:\n  prom: $2b$99$" + "a" * 53 + "\n", "basic_auth_users.prom"),
        ("basic_auth_users:\n  prom: $2b$03$" + "a" * 53 + "\n", "basic_auth_users.prom"),
        ("tls_server_config:\n  cert_file: /nope\n  key_file: /nope\n", "tls_server_config"),
        ("tls_srv_config: {}\n", "tls_srv_config"),
        ("http_server_config:\n  headers:\n    Set-Cookie: x\n", "http_server_config.headers.Set-Cookie"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "http_server_config.headers.X-Frame-Options"),
        ("rate_limit: {interval: soon}\n", "rate_limit.interval"),
    ],
)
def test_bad_web_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        webconfig.load(write(tmp_path, text))
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("  client_ca: 'no certificate here'\n  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config"),
        ("  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "cipher_suites"),
        ("  min_version: TLS13\n  max_version: TLS12\n", "max_version"),
        ("  curve_preferences: [Curve25519]\n", "curve_preferences"),
        ("  client_allowed_sans: [x]\n", "client_allowed_sans"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused(
    tmp_path: Path, pki: dict[str, certs.Pair], extra: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        webconfig.load(write(tmp_path, tls_yaml(pki, extra)))


def test_the_example_config_web_section_lists_only_supported_keys() -> None:
    """config.example.yaml documents the web config file; every key it shows is one this module accepts."""
    text = (Path(__file__).parents[2] / "config.example.yaml").read_text()
    for key in ("min_version", "cipher_suites", "headers", "client_auth_type", "client_allowed_sans"):
        assert key in text
    fields = set(webconfig.TlsServerConfig.model_fields) | set(webconfig.HttpServerConfig.model_fields)
    assert {"min_version", "max_version", "cipher_suites", "client_allowed_sans", "headers"} <= fields
