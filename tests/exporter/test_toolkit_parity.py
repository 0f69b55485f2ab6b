"""Web configs that exporter-toolkit accepts start and behave as it does (configs modelled on its test configs).

Each config is written here, in the shape of exporter-toolkit's web/testdata files (relative cert_file beside the
web config, inline PEM, curves, TLS 1.3 suite names, numeric header values ...), and served over real TLS.
"""

# ruff: noqa: F811 (the shared fixtures pki and serve are imported from test_webconfig and named as arguments)
from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import pytest

from carbond.exporter import webconfig
from tests.exporter import certs
from tests.exporter.test_webconfig import fetch, pki, serve, write  # noqa: F401 (fixtures)

Pki = dict[str, certs.Pair]


def beside(tmp: Path, pki: Pki) -> None:
    """server.crt and server.key next to the web config, as exporter-toolkit's testdata has them."""
    shutil.copy(pki["server"].cert, tmp / "server.crt")
    shutil.copy(pki["server"].key, tmp / "server.key")


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


async def handshake(port: int, pki: Pki, setup: object = None) -> str:
    """The cipher suite or group outcome of a TLS handshake, or the error's class name."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if callable(setup):
        setup(ctx)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__
    obj = writer.get_extra_info("ssl_object")
    cipher = obj.cipher()[0] if obj is not None and obj.cipher() else "?"
    writer.close()
    return str(cipher)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["VerifyClientCertIfGiven", "RequireAndVerifyClientCert"])
async def test_verify_modes_without_client_ca_file_use_the_system_roots(
    tmp_path: Path, pki: Pki, serve, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca"].cert))  # OpenSSL's system roots, for this test: our CA
    beside(tmp_path, pki)
    port = await serve(write(tmp_path, f'tls_server_config:\n  cert_file: "server.crt"\n  key_file: "server.key"\n'
                                       f'  client_auth_type: "{mode}"\n'))  # fmt: skip
    assert await fetch(port, pki, "client") == 200  # verified against the system roots
    assert await fetch(port, pki, "stranger") != 200  # a certificate no root signed
    assert (await fetch(port, pki, None) == 200) is (mode == "VerifyClientCertIfGiven")


@pytest.mark.asyncio
async def test_relative_paths_are_resolved_against_the_web_config_directory(
    tmp_path: Path, pki: Pki, serve, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    beside(tmp_path, pki)
    shutil.copy(pki["ca"].cert, tmp_path / "client_ca.pem")
    monkeypatch.chdir("/")  # nothing is relative to the working directory
    text = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: client_ca.pem\n"
    port = await serve(write(tmp_path, text + "  client_auth_type: RequireAndVerifyClientCert\n"))
    assert await fetch(port, pki, "client") == 200
    assert await fetch(port, pki, None) != 200


@pytest.mark.asyncio
@pytest.mark.parametrize("inline", ["key", "cert", "both"])
async def test_inline_cert_and_key_beside_the_file_keys(tmp_path: Path, pki: Pki, serve, inline: str) -> None:  # type: ignore[no-untyped-def]
    beside(tmp_path, pki)
    cert = f"  cert: |\n{indent(pki['server'].cert.read_text())}" if inline != "key" else "  cert_file: server.crt\n"
    key = f"  key: |\n{indent(pki['server'].key.read_text())}" if inline != "cert" else "  key_file: server.key\n"
    ca = f"  client_ca: |\n{indent(pki['ca'].cert.read_text())}  client_auth_type: RequireAndVerifyClientCert\n"
    port = await serve(write(tmp_path, "tls_server_config:\n" + cert + key + ca))
    assert await fetch(port, pki, "client") == 200
    assert await fetch(port, pki, "stranger") != 200


@pytest.mark.asyncio
async def test_curve_preferences_are_applied(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    beside(tmp_path, pki)
    base = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"  # TLS 1.3: groups only key exchange
    port = await serve(write(tmp_path, base + "  curve_preferences: [CurveP384]\n"))
    assert await handshake(port, pki, lambda c: c.set_ecdh_curve("secp384r1")) != "SSLError"
    assert await handshake(port, pki, lambda c: c.set_ecdh_curve("prime256v1")) == "SSLError"  # not offered
    other = tmp_path / "two"
    other.mkdir()
    beside(other, pki)
    port = await serve(write(other, base + "  curve_preferences: [CurveP521, X25519]\n"))
    if webconfig.hook_unavailable() is None:  # the whole list is offered
        assert await handshake(port, pki, lambda c: c.set_ecdh_curve("X25519")) != "SSLError"
    assert await handshake(port, pki, lambda c: c.set_ecdh_curve("secp521r1")) != "SSLError"
    assert await handshake(port, pki, lambda c: c.set_ecdh_curve("prime256v1")) == "SSLError"


@pytest.mark.asyncio
async def test_tls13_suite_names_are_accepted_and_leave_tls13_alone(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    beside(tmp_path, pki)
    suites = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
              "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]  # fmt: skip
    no_http2 = "http_server_config:\n  http2: false\n"  # with HTTP/2 on, Go needs an AES_128_GCM suite listed
    port = await serve(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                       f"  cipher_suites: [{', '.join(suites)}]\n" + no_http2))  # fmt: skip
    assert await fetch(port, pki, None) == 200
    tls12 = await handshake(port, pki, lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_2))
    assert tls12 == "ECDHE-ECDSA-AES256-GCM-SHA384"  # the one TLS 1.2 suite listed
    only13 = tmp_path / "only13"
    only13.mkdir()
    beside(only13, pki)
    port = await serve(write(only13, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                     "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n" + no_http2))  # fmt: skip
    assert await handshake(port, pki) == "TLS_AES_256_GCM_SHA384"  # not restricted, as in Go
    assert await handshake(port, pki, lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_2)) == "SSLError"


@pytest.mark.asyncio
@pytest.mark.parametrize(("prefer", "expected"), [(True, "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                                  (False, "ECDHE-ECDSA-AES128-GCM-SHA256")])  # fmt: skip
async def test_prefer_server_cipher_suites(tmp_path: Path, pki: Pki, serve, prefer: bool, expected: str) -> None:  # type: ignore[no-untyped-def]
    beside(tmp_path, pki)
    suites = "[TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]"
    text = f"  max_version: TLS12\n  cipher_suites: {suites}\n  prefer_server_cipher_suites: {str(prefer).lower()}\n"
    port = await serve(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" + text))

    def client_prefers_128(ctx: ssl.SSLContext) -> None:
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")

    assert await handshake(port, pki, client_prefers_128) == expected


@pytest.mark.asyncio
async def test_header_values_written_as_yaml_numbers(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    port = await serve(write(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
                                       "    X-XSS-Protection: 1\n    X-Content-Type-Options: nosniff\n"))  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    assert "X-XSS-Protection: 1\r\n" in head
    assert "X-Frame-Options: deny\r\n" in head


@pytest.mark.parametrize(
    ("cert_san", "allowed", "ok"),
    [
        ("IP:2001:db8::1", "2001:db8::1", True),
        ("IP:2001:db8::1", "2001:DB8:0:0:0:0:0:1", True),
        ("IP:2001:db8::1", "2001:0db8::0001", True),
        ("IP:2001:db8::1", "2001:db8::2", False),
        ("IP:10.0.0.1", "10.0.0.1", True),
        ("DNS:prometheus", "prometheus", True),
    ],
)
def test_client_allowed_sans_compare_ip_addresses_in_any_form(
    tmp_path: Path, pki: Pki, cert_san: str, allowed: str, ok: bool
) -> None:
    client = certs.signed(tmp_path, "c", pki["ca"], "c", cert_san)
    # getpeercert()'s form of the certificate, as the server sees it
    decoded = ssl._ssl._test_decode_cert(str(client.cert))  # type: ignore[attr-defined]
    assert webconfig.allowed_san(decoded, [allowed]) is ok


@pytest.mark.asyncio
async def test_client_allowed_sans_with_require_any_client_cert(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    if webconfig.hook_unavailable() is not None:
        pytest.fail("the client certificate hook is checked available on CPython")
    beside(tmp_path, pki)
    text = "  client_auth_type: RequireAnyClientCert\n  client_allowed_sans: [stranger]\n"
    port = await serve(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" + text))
    assert await fetch(port, pki, "stranger") == 200
    assert await fetch(port, pki, "client") != 200


@pytest.mark.asyncio
async def test_rate_limit_answers_429_beyond_the_burst(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    port = await serve(write(tmp_path, "rate_limit:\n  burst: 2\n  interval: 1h\n"))
    statuses = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        statuses.append(int((await asyncio.wait_for(reader.readline(), 5)).split()[1]))
        writer.close()
    assert statuses == [200, 200, 429, 429]


def test_go_durations() -> None:
    assert webconfig.go_duration("1m30s") == 90
    assert webconfig.go_duration("100ms") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not a duration"):
        webconfig.go_duration("1 s")
