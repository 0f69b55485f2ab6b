"""exporter-toolkit's own test web configs (tests/fixtures/exporter-toolkit) with the checks of its
tls_config_test.go: which configs start, which are refused and with what words, and what its test client gets.

Its client trusts the CA chain of the test data; OpenSSL 3.0 refuses that chain for a TLS server (its CAs carry
anyExtendedKeyUsage only, which Go accepts), so the client here trusts the server certificate itself, and checks
the host name ``localhost`` as Go's client does.
"""

# ruff: noqa: F811 (the shared fixture serve is imported from test_webconfig and named as an argument)
from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from carbond.errors import ConfigError
from carbond.exporter import webconfig
from tests.exporter.test_webconfig import serve  # noqa: F401 (fixture)
from tests.harness.wait import eventually_async

TESTDATA = Path(__file__).parents[1] / "fixtures" / "exporter-toolkit"
Setup = Callable[[ssl.SSLContext], None]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A copy of the test data, so configs name their certificates by relative paths as in exporter-toolkit."""
    out = tmp_path / "testdata"
    shutil.copytree(TESTDATA, out)
    return out


# TestYAMLFiles: every config that must be refused, with exporter-toolkit's expected error (its regular expression)
REFUSED = [
    ("somefile", r"no such file"),
    ("web_config_noAuth_certPath_empty.bad.yml", r"missing cert_file"),
    ("web_config_noAuth_keyPath_empty.bad.yml", r"missing key_file"),
    ("web_config_noAuth_certPath_keyPath_empty.bad.yml", r"missing cert_file"),
    ("web_config_noAuth_certPath_invalid.bad.yml", r"no such file"),
    ("web_config_noAuth_keyPath_invalid.bad.yml", r"no such file"),
    ("web_config_noAuth_certPath_keyPath_invalid.bad.yml", r"no such file"),
    ("web_config_noAuth.bad.yml", r"Client CA's have been configured without a Client Auth Policy"),
    ("web_config_auth_clientCAs_invalid.bad.yml", r"no such file"),
    ("web_config_auth_user_list_invalid.bad.yml", r"hashedSecret too short to be a bcrypted password"),
    ("web_config_noAuth_inventedCiphers.bad.yml", r"unknown cipher"),
    ("web_config_noAuth_inventedCurves.bad.yml", r"unknown curve"),
    ("web_config_noAuth_wrongTLSVersion.bad.yml", r"unknown TLS version"),
    ("web_config_headers_content_type_options.bad.yml", r"invalid value for"),
    ("web_config_headers_frame_options.bad.yml", r"invalid value for"),
    ("web_config_headers_extra_header.bad.yml", r"HTTP header .* can not be configured"),
    ("web_config_noAuth_noHTTP2Cipher.bad.yml", r"TLSConfig.CipherSuites is missing an HTTP/2-required"),
    # Go's YAML decoder words these "yaml: ..."; carbond names the key (or the document) that is wrong
    ("web_config_junk.yml", r"valid dictionary"),
    ("web_config_junk_key.yml", r"cert_filse"),
]


@pytest.mark.parametrize(("name", "expected"), REFUSED)
def test_bad_configs_are_refused_with_exporter_toolkits_reason(data: Path, name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        webconfig.load(data / name)


GOOD = [*sorted(p.name for p in TESTDATA.glob("*.yml") if ".good" in p.name), "web_config_empty.yml"]


@pytest.mark.parametrize("name", GOOD)
def test_good_configs_load(data: Path, name: str) -> None:
    cfg = webconfig.load(data / name)
    assert (cfg.tls_server_config is None) is (name in ("web_config_empty.yml", "web_config_headers.good.yml",
                                                         "web_config_users_noTLS.good.yml"))  # fmt: skip


def client(data: Path, cert: str | None = None, setup: Setup | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(data / "server.crt"))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the server certificate is the trust anchor
    if cert is not None:
        ctx.load_cert_chain(data / f"{cert}.pem", data / f"{cert}.key")
    if setup is not None:
        setup(ctx)
    return ctx


async def outcome(port: int, ctx: ssl.SSLContext | None, auth: str = "") -> str:
    """``<status> <cipher>`` (the status alone over plain HTTP), or ``SSL:<OpenSSL's reason>``, or ``closed``."""
    head = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if auth:
        head += f"Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None), 10
        )
        writer.write(f"{head}\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 30)
        tls = writer.get_extra_info("ssl_object")
        writer.close()
    except ssl.SSLError as exc:
        return f"SSL:{exc.reason}"
    except (OSError, asyncio.IncompleteReadError):
        return "closed"
    if not line:
        return "closed"
    status = line.split()[1].decode()
    return f"{status} {tls.cipher()[0]}" if tls is not None else status


def ciphers(names: str) -> Setup:
    def setup(ctx: ssl.SSLContext) -> None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # Go's CipherSuites apply to TLS 1.2 and lower
        ctx.set_ciphers(names)

    return setup


def curve(name: str) -> Setup:
    return lambda ctx: ctx.set_ecdh_curve(name)


def tls11(ctx: ssl.SSLContext) -> None:
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this OpenSSL offer TLS 1.1 at all
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point of the check
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1


NO_CERT = {"SSL:TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSL:SSLV3_ALERT_HANDSHAKE_FAILURE"}
BAD_CERT = {"SSL:TLSV1_ALERT_UNKNOWN_CA", "SSL:SSLV3_ALERT_BAD_CERTIFICATE", "SSL:SSLV3_ALERT_CERTIFICATE_UNKNOWN"}
HANDSHAKE_FAILURE = {"SSL:SSLV3_ALERT_HANDSHAKE_FAILURE"}
AES128 = "ECDHE-RSA-AES128-GCM-SHA256"

# TestServerBehaviour: config, TLS client?, its certificate, its setup -> the outcomes that match Go's expectation
BEHAVIOUR: list[tuple[str, bool, str | None, Setup | None, set[str] | str]] = [
    ("", False, None, None, "200"),
    ("", True, None, None, {"SSL:WRONG_VERSION_NUMBER"}),  # "server gave HTTP response to HTTPS client"
    ("web_config_noAuth.good.yml", False, None, None, "400"),  # "Client sent an HTTP request to an HTTPS server"
    ("web_config_noAuth.good.yml", True, None, None, "200"),
    ("web_config_noAuth.good.yml", True, None, tls11, {"SSL:TLSV1_ALERT_PROTOCOL_VERSION"}),
    ("web_config_noAuth_allCiphers.good.yml", True, None, None, "200"),
    ("web_config_noAuth_someCiphers.good.yml", True, None, ciphers(AES128), f"200 {AES128}"),
    ("web_config_noAuth_someCiphers.good.yml", True, None, ciphers("ECDHE-RSA-AES256-SHA"), HANDSHAKE_FAILURE),
    ("web_config_noAuth_someCiphers.good.yml", True, None, ciphers(f"AES128-SHA:{AES128}"), f"200 {AES128}"),
    (
        "web_config_noAuth_someCiphers_noOrder.good.yml",
        True,
        None,
        ciphers(f"{AES128}:ECDHE-RSA-AES256-GCM-SHA384"),
        f"200 {AES128}",
    ),
    ("web_config_noAuth_allCurves.good.yml", True, None, None, "200"),
    ("web_config_noAuth_someCurves.good.yml", True, None, curve("secp521r1"), "200"),
    ("web_config_noAuth_someCurves.good.yml", True, None, curve("secp384r1"), HANDSHAKE_FAILURE),
    ("web_config_noAuth_noHTTP2.good.yml", True, None, ciphers("AES128-SHA:@SECLEVEL=0"), "200 AES128-SHA"),
    ("tls_config_noAuth.requireanyclientcert.good.yml", True, None, None, NO_CERT),
    ("web_config_headers.good.yml", False, None, None, "200"),
    ("tls_config_noAuth.requireanyclientcert.good.yml", True, "client_selfsigned", None, "200"),
    ("tls_config_noAuth.requireandverifyclientcert.good.yml", True, None, None, NO_CERT),
    ("tls_config_noAuth.requireandverifyclientcert.good.yml", True, "client_selfsigned", None, "200"),
    ("tls_config_noAuth.requireandverifyclientcert.good.yml", True, "client2_selfsigned", None, BAD_CERT),
]


def matches(got: str, expected: set[str] | str) -> bool:
    if isinstance(expected, set):
        return got in expected
    return got == expected or (" " not in expected and got.split(" ")[0] == expected)


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "tls", "cert", "setup", "expected"), BEHAVIOUR)
async def test_server_behaviour_matches_exporter_toolkits(  # type: ignore[no-untyped-def]
    data: Path, serve, name: str, tls: bool, cert: str | None, setup: Setup | None, expected: set[str] | str
) -> None:
    path = data / (name or "web_config_empty.yml")
    port = await serve(path)
    got = await outcome(port, client(data, cert, setup) if tls else None)
    assert matches(got, expected), got


@pytest.mark.asyncio
async def test_headers_config_adds_its_headers(data: Path, serve) -> None:  # type: ignore[no-untyped-def]
    port = await serve(data / "web_config_headers.good.yml")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    head = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")[0].decode()
    writer.close()
    for line in ("X-Frame-Options: deny", "Strict-Transport-Security: max-age=31536000; includeSubDomains",
                 "X-Content-Type-Options: nosniff", "X-XSS-Protection: 1",
                 "Content-Security-Policy: default-src 'self' *.test.example.net"):  # fmt: skip
        assert f"\r\n{line}\r\n" in head


# TestUsers: config, TLS client?, credentials -> status
USERS = [
    ("web_config_users_noTLS.good.yml", False, "", "401"),
    ("web_config_users_noTLS.good.yml", False, "dave:dave123", "200"),
    ("web_config_users.good.yml", True, "", "401"),
    ("web_config_users.good.yml", True, "dave:dave123", "200"),
    ("web_config_users.good.yml", True, "carol:carol123", "200"),
    ("web_config_users.good.yml", True, "dave:bad", "401"),
    ("web_config_users.good.yml", True, "nonexistent:nonexistent", "401"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "tls", "auth", "expected"), USERS)
async def test_users(data: Path, serve, name: str, tls: bool, auth: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    port = await serve(data / name)
    got = await outcome(port, client(data) if tls else None, auth)
    assert got.split(" ")[0] == expected, got


@pytest.mark.asyncio
async def test_config_reloading_from_blocking_to_good(data: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """TestConfigReloading: RequireAndVerifyClientCert refuses a client without a certificate; once the file holds
    the good config, the same client is served, with no restart."""
    path = data / "web.yml"
    path.write_text((data / "web_config_noAuth.good.blocking.yml").read_text())
    port = await serve(path)
    assert await outcome(port, client(data)) in NO_CERT
    path.write_text((data / "web_config_noAuth.good.yml").read_text())

    async def served() -> bool:
        return (await outcome(port, client(data))).startswith("200 ")

    await eventually_async(served, what="the good config served after the file changed")
