"""TLS, basic auth and response headers for /metrics from a web config file in the exporter-toolkit format.

What is supported (anything else is an error naming the key, never silently ignored)::

  tls_server_config:
    cert_file, key_file            PEM files (re-read when they change, see carbond.exporter.live)
    client_ca_file                 PEM CA bundle for client certificates
    client_auth_type               NoClientCert (default), RequestClientCert, RequireAnyClientCert (or its older
                                   name RequireClientCert), VerifyClientCertIfGiven, RequireAndVerifyClientCert:
                                   Go's crypto/tls meanings. The two that ask for a certificate without verifying
                                   it reach into CPython's ssl internals, checked in a child process first: where
                                   the check fails they are refused with the reason, never a crash
    min_version, max_version       TLS10, TLS11, TLS12 (default minimum), TLS13
    cipher_suites                  Go's names (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 ...); as in Go, TLS 1.2 and
                                   lower only
    prefer_server_cipher_suites    accepted; the server's order is used (Go has ignored the key since 1.18)
    client_allowed_sans            a client certificate must carry one of these DNS, IP, email or URI SANs
  http_server_config:
    headers                        Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options,
                                   X-XSS-Protection, Content-Security-Policy: added to every response
    http2                          accepted; carbond speaks HTTP/1.1 only
  basic_auth_users                 user: bcrypt hash ($2a$, $2b$, $2y$)

Not supported, and said so: ``curve_preferences`` (OpenSSL's defaults are used), inline ``cert``/``key``/
``client_ca`` and ``rate_limit`` (carbond rate-limits failed logins itself, see carbond.exporter.auth).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from carbond.config import load_model
from carbond.errors import ConfigError

ClientAuth = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # exporter-toolkit's older name of RequireAnyClientCert, which it still accepts
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TlsVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: Go's (IANA) cipher suite names and OpenSSL's for the same suite.
CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
#: The response headers exporter-toolkit lets a web config set (lower-case name -> allowed values, None: any).
HEADERS: dict[str, frozenset[str] | None] = {
    "strict-transport-security": None,
    "x-content-type-options": frozenset({"nosniff"}),
    "x-frame-options": frozenset({"deny", "sameorigin"}),
    "x-xss-protection": None,
    "content-security-policy": None,
}
UNSUPPORTED = {
    "curve_preferences": "not supported: OpenSSL's default curves are used",
    "cert": "inline certificates are not supported: use cert_file",
    "key": "inline keys are not supported: use key_file",
    "client_ca": "inline CAs are not supported: use client_ca_file",
    "rate_limit": "not supported: carbond limits failed logins itself",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in UNSUPPORTED and key not in cls.model_fields:
                    raise ValueError(f"{key}: {UNSUPPORTED[key]}")
        return data


class TlsServerConfig(_Strict):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: ClientAuth = "NoClientCert"
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    cipher_suites: list[str] = []
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: list[str] = []


class HttpServerConfig(_Strict):
    http2: bool = True
    headers: dict[str, str] = {}


class WebConfig(_Strict):
    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig = HttpServerConfig()
    basic_auth_users: dict[str, str] = {}


def load(path: Path) -> WebConfig:
    source = str(path)
    cfg = load_model(path, WebConfig, "web config")
    for user, hashed in cfg.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or not hashed[4:6].isdigit():
            raise ConfigError(source, [(f"basic_auth_users.{user}", "not a bcrypt hash")])
        if not 4 <= int(hashed[4:6]) <= 31:
            raise ConfigError(source, [(f"basic_auth_users.{user}", "a bcrypt cost is 4 to 31")])
    for name, value in cfg.http_server_config.headers.items():
        allowed = HEADERS.get(name.lower(), frozenset())
        if name.lower() not in HEADERS:
            raise ConfigError(source, [(f"http_server_config.headers.{name}", "this header cannot be configured")])
        if allowed is not None and value.lower() not in allowed:
            raise ConfigError(
                source, [(f"http_server_config.headers.{name}", f"must be one of {', '.join(sorted(allowed))}")]
            )
    if cfg.basic_auth_users:
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            raise ConfigError(
                source, [("basic_auth_users", "needs the bcrypt package (pip install 'carbond[web]')")]
            ) from None
    if cfg.tls_server_config is not None:
        ssl_context(cfg.tls_server_config, source)  # fail at start (or reload), naming the file
    return cfg


def ssl_context(tls: TlsServerConfig, source: str = "web config") -> ssl.SSLContext:
    key = "tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = VERSIONS[tls.min_version]
        ctx.maximum_version = VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(source, [(f"{key}.min_version", str(exc))]) from None
    if VERSIONS[tls.min_version] > VERSIONS[tls.max_version]:
        raise ConfigError(source, [(f"{key}.max_version", "is below min_version")])
    if tls.cipher_suites:
        unknown = [c for c in tls.cipher_suites if c not in CIPHERS]
        if unknown:
            raise ConfigError(source, [(f"{key}.cipher_suites", f"unknown or insecure suite {unknown[0]!r}")])
        try:
            ctx.set_ciphers(":".join(CIPHERS[c] for c in tls.cipher_suites))
        except ssl.SSLError:
            raise ConfigError(source, [(f"{key}.cipher_suites", "none of these suites is available")]) from None
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, [(key, f"cannot load certificate or key: {exc}")]) from None
    mode = "RequireAnyClientCert" if tls.client_auth_type == "RequireClientCert" else tls.client_auth_type
    if mode in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and tls.client_ca_file is None:
        raise ConfigError(source, [(f"{key}.client_ca_file", f"required by {mode}")])
    if mode == "NoClientCert" and tls.client_ca_file is not None:
        raise ConfigError(source, [(f"{key}.client_auth_type", "client_ca_file is set but no certificate is asked")])
    if tls.client_allowed_sans and mode != "RequireAndVerifyClientCert":
        raise ConfigError(source, [(f"{key}.client_allowed_sans", "needs RequireAndVerifyClientCert")])
    if mode == "RequireAndVerifyClientCert":
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif mode == "VerifyClientCertIfGiven":
        ctx.verify_mode = ssl.CERT_OPTIONAL
    elif mode == "NoClientCert":
        ctx.verify_mode = ssl.CERT_NONE
    else:
        why = hook_unavailable()
        if why is not None or not _ask_without_verifying(ctx, required=mode == "RequireAnyClientCert"):
            raise ConfigError(
                source,
                [
                    (
                        f"{key}.client_auth_type",
                        f"{mode} is not available: {why or 'the context check failed'}; VerifyClientCertIfGiven or "
                        "RequireAndVerifyClientCert (with client_ca_file) work everywhere",
                    )
                ],
            )
    return ctx


#: OpenSSL's SSL_VERIFY_PEER and SSL_VERIFY_FAIL_IF_NO_PEER_CERT.
_VERIFY_PEER, _FAIL_IF_NO_PEER_CERT = 1, 2
#: Where CPython's context object keeps its ``SSL_CTX *``: the first field after the object header (true of every
#: CPython from 3.2 to 3.14); checked in a child process before this process relies on it.
_CTX_OFFSET = object.__basicsize__
#: The check, run by ``sys.executable -I -c``: the same steps :func:`_ask_without_verifying` takes, on a throwaway
#: context. It imports nothing of carbond. Exit 0: the layout and OpenSSL's answers are as expected.
_PROBE = """
import ctypes, ssl, sys, _ssl
lib = ctypes.CDLL(_ssl.__file__)
get_mode, set_verify = lib.SSL_CTX_get_verify_mode, lib.SSL_CTX_set_verify
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
get_mode.argtypes, get_mode.restype = [ctypes.c_void_p], ctypes.c_int
set_verify.argtypes, set_verify.restype = [ctypes.c_void_p, ctypes.c_int, callback], None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
assert type(ctx).__basicsize__ >= {offset} + ctypes.sizeof(ctypes.c_void_p)
ctx.verify_mode = ssl.CERT_OPTIONAL
pointer = ctypes.c_void_p.from_address(id(ctx) + {offset}).value
assert pointer and get_mode(pointer) == 1
ctx.verify_mode = ssl.CERT_REQUIRED
assert get_mode(pointer) == 3
accept = callback(lambda ok, store: 1)
set_verify(pointer, 1, accept)
assert get_mode(pointer) == 1 and ctx.verify_mode == ssl.CERT_OPTIONAL
sys.exit(0)
"""


def hook_unavailable(offset: int | None = None) -> str | None:
    """Why RequestClientCert and RequireAnyClientCert cannot be offered in this process, or None when they can.

    Those modes reach into CPython's private context object (see :func:`_ask_without_verifying`); were the layout
    not the expected one, OpenSSL would be handed a wrong pointer and the process could crash. So the exact steps
    run first in a child process with this interpreter: a crash there costs the child, and this process refuses
    the modes. The answer for the default offset is computed once per process.
    """
    if offset is None:
        return _default_hook_unavailable()
    if sys.implementation.name != "cpython":
        return f"needs CPython, this is {sys.implementation.name}"
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _PROBE.format(offset=offset)], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"its check could not run: {exc}"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        try:
            how = f"crashed ({signal.Signals(-done.returncode).name})"
        except ValueError:
            how = f"crashed (signal {-done.returncode})"
    else:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        how = f"failed ({lines[-1] if lines else f'exit {done.returncode}'})"
    return f"this Python's ssl module is not the layout it was checked against: the check {how}"


@functools.cache
def _default_hook_unavailable() -> str | None:
    return hook_unavailable(_CTX_OFFSET)


_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


@functools.cache
def _accept_any() -> Any:
    """OpenSSL's verify callback that accepts every certificate; made once, on first use, and kept for the life of
    the process (OpenSSL may call it as long as a context that has it lives)."""
    return _VerifyCallback(lambda _preverify, _store: 1)


def _ask_without_verifying(ctx: ssl.SSLContext, *, required: bool) -> bool:
    """Ask the client for a certificate and accept any it sends (RequestClientCert, RequireAnyClientCert).

    Python's ssl verifies every certificate it asks for; these two modes need OpenSSL's verify callback, set here
    on the context's SSL_CTX, found at ``_CTX_OFFSET`` in CPython's context object. Nothing is touched unless the
    same steps succeeded in a child process (:func:`hook_unavailable`); the pointer is then checked again through
    SSL_CTX_get_verify_mode before anything is set. False when any check fails.
    """
    import _ssl

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        get_mode, set_verify = lib.SSL_CTX_get_verify_mode, lib.SSL_CTX_set_verify
    except (OSError, AttributeError):
        return False
    get_mode.argtypes, get_mode.restype = [ctypes.c_void_p], ctypes.c_int
    set_verify.argtypes, set_verify.restype = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback], None
    ctx.verify_mode = ssl.CERT_OPTIONAL  # SSL_VERIFY_PEER, to recognise the SSL_CTX pointer
    pointer = ctypes.c_void_p.from_address(id(ctx) + _CTX_OFFSET).value
    if not pointer or get_mode(pointer) != _VERIFY_PEER:
        return False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if get_mode(pointer) != _VERIFY_PEER | _FAIL_IF_NO_PEER_CERT:
        return False
    try:
        callback = _accept_any()
    except (MemoryError, OSError):  # no executable memory for the callback (a hardened runtime)
        return False
    set_verify(pointer, _VERIFY_PEER | (_FAIL_IF_NO_PEER_CERT if required else 0), callback)
    return True


def allowed_san(peer_cert: dict[str, Any], allowed: list[str]) -> bool:
    """Whether a verified client certificate (``SSLObject.getpeercert()``) carries one of the allowed SANs."""
    names = {str(value) for _, value in peer_cert.get("subjectAltName", ())}
    return any(name in names for name in allowed)
