"""TLS, basic auth and response headers for /metrics from a web config file in the exporter-toolkit format.

What is supported (anything else is an error naming the key, never silently ignored); the meanings are
exporter-toolkit's (its web-configuration.md)::

  tls_server_config:
    cert_file, key_file            PEM files (re-read when they change, see carbond.exporter.live); a relative path
                                   is relative to the web config file's directory
    cert, key                      the same PEM inline; a *_file key wins over its inline twin, as in exporter-toolkit
    client_ca_file, client_ca      CA bundle for client certificates (file or inline); without either, the two
                                   Verify modes verify against the system's roots, as Go does
    client_auth_type               NoClientCert (default), RequestClientCert, RequireAnyClientCert (or its older
                                   name RequireClientCert), VerifyClientCertIfGiven, RequireAndVerifyClientCert:
                                   Go's crypto/tls meanings. The two that ask for a certificate without verifying
                                   it reach into CPython's ssl internals, checked in a child process first: where
                                   the check fails they are refused with the reason, never a crash
    min_version, max_version       TLS10, TLS11, TLS12 (default minimum), TLS13
    cipher_suites                  Go's names (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 ...) for TLS 1.2 and lower; the
                                   TLS 1.3 names are accepted and, as in Go, do not restrict TLS 1.3 (a list of
                                   TLS 1.3 names only leaves no suite below 1.3, so TLS 1.3 becomes the minimum)
    prefer_server_cipher_suites    true (default): the server's order; false: the client's
    curve_preferences              CurveP256, CurveP384, CurveP521, X25519: the key exchange groups offered, in
                                   order (through the same checked hook as the client modes; where it is not
                                   available only the first is used)
    client_allowed_sans            with RequireAnyClientCert or RequireAndVerifyClientCert: the client certificate
                                   must carry one of these DNS, IP (any textual form), email or URI SANs
  http_server_config:
    headers                        Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options,
                                   X-XSS-Protection, Content-Security-Policy: added to every response (YAML numbers
                                   and booleans are taken as their text, as Go's YAML does for a string map)
    http2                          carbond speaks HTTP/1.1 only; true (the default) refuses a TLS 1.2 cipher_suites
                                   list without an HTTP/2-required suite, as exporter-toolkit does
  rate_limit                       burst, interval (Go durations: 100ms, 1s, 1m): requests beyond get 429
  basic_auth_users                 user: bcrypt hash ($2a$, $2b$, $2y$)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

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
#: The TLS 1.3 suites Go lists among its secure ones; Go does not let them be configured (nor does carbond).
TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})
#: exporter-toolkit's curve names and OpenSSL's group names for them.
CURVES = {"CurveP256": "P-256", "CurveP384": "P-384", "CurveP521": "P-521", "X25519": "X25519"}
#: The same groups by the short names ``SSLContext.set_ecdh_curve`` takes (the fallback, one group only).
ECDH_NAMES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
#: The response headers exporter-toolkit lets a web config set (lower-case name -> allowed values, None: any).
HEADERS: dict[str, frozenset[str] | None] = {
    "strict-transport-security": None,
    "x-content-type-options": frozenset({"nosniff"}),
    "x-frame-options": frozenset({"deny", "sameorigin"}),
    "x-xss-protection": None,
    "content-security-policy": None,
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds of a Go duration (``1s``, ``100ms``, ``1m30s``, ``0``); ValueError otherwise."""
    if text == "0":
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (e.g. 1s, 100ms, 1m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Strict):
    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = None
    key: str | None = None
    client_ca_file: Path | None = None
    client_ca: str | None = None
    client_auth_type: ClientAuth = "NoClientCert"
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    cipher_suites: list[str] = []
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[str] = []
    client_allowed_sans: list[str] = []

    _blank = field_validator("cert_file", "key_file", "cert", "key", "client_ca_file", "client_ca", mode="before")(
        _blank_is_none
    )

    @model_validator(mode="before")
    @classmethod
    def _cert_and_key(cls, data: Any) -> Any:
        """A certificate and a key are asked for first, with exporter-toolkit's words."""
        if isinstance(data, dict) and set(data) <= set(cls.model_fields):  # an unknown key is named first
            if data.get("cert_file") in (None, "") and data.get("cert") in (None, ""):
                raise ValueError("missing cert_file (or cert)")
            if data.get("key_file") in (None, "") and data.get("key") in (None, ""):
                raise ValueError("missing key_file (or key)")
        return data

    @field_validator("client_auth_type", mode="before")
    @classmethod
    def _empty_auth(cls, value: Any) -> Any:
        return "NoClientCert" if value == "" else value

    @field_validator("min_version", "max_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if value not in VERSIONS:
            raise ValueError(f"unknown TLS version: {value!r} (one of {', '.join(VERSIONS)})")
        return value

    @field_validator("curve_preferences")
    @classmethod
    def _curves(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CURVES:
                raise ValueError(f"unknown curve {name!r} (one of {', '.join(CURVES)})")
        return value

    def in_directory(self, base: Path) -> TlsServerConfig:
        """The same config with relative file paths joined to ``base`` (the web config file's directory)."""
        update = {
            name: base / value
            for name in ("cert_file", "key_file", "client_ca_file")
            if (value := getattr(self, name)) is not None and not value.is_absolute()
        }
        return self.model_copy(update=update) if update else self

    def files(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None]


class HttpServerConfig(_Strict):
    http2: bool = True
    headers: dict[str, str] = {}

    @field_validator("headers", mode="before")
    @classmethod
    def _scalars_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):  # Go's YAML reads `X-XSS-Protection: 1` into a string map as "1"
            return {k: _text(v) for k, v in value.items()}
        return value


def _text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class RateLimit(_Strict):
    burst: int = 0
    interval: float = 0.0  # seconds; 0: no limit

    @field_validator("interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return go_duration(value) if isinstance(value, str) else value


class WebConfig(_Strict):
    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig = HttpServerConfig()
    rate_limit: RateLimit = RateLimit()
    basic_auth_users: dict[str, str] = {}

    @field_validator("tls_server_config", mode="before")
    @classmethod
    def _tls_unset(cls, value: Any) -> Any:
        """exporter-toolkit serves plain HTTP when no TLS key is set (an empty or all-blank section)."""
        if isinstance(value, dict) and not any(v not in (None, "", []) for v in value.values()):
            return None
        return value


def load(path: Path) -> WebConfig:
    source = str(path)
    if not path.exists():
        raise ConfigError(source, [("", f"open {path}: no such file or directory")])
    cfg = load_model(path, WebConfig, "web config")
    if cfg.tls_server_config is not None:
        cfg = cfg.model_copy(update={"tls_server_config": cfg.tls_server_config.in_directory(path.parent)})
    for user, hashed in cfg.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or not hashed[4:6].isdigit():
            raise ConfigError(
                source,
                [(f"basic_auth_users.{user}", "not a bcrypt hash (hashedSecret too short to be a bcrypted password)")],
            )
        if not 4 <= int(hashed[4:6]) <= 31:
            raise ConfigError(source, [(f"basic_auth_users.{user}", "a bcrypt cost is 4 to 31")])
    for name, value in cfg.http_server_config.headers.items():
        allowed = HEADERS.get(name.lower(), frozenset())
        if name.lower() not in HEADERS:
            raise ConfigError(
                source, [(f"http_server_config.headers.{name}", f"HTTP header {name!r} can not be configured")]
            )
        if allowed is not None and value.lower() not in allowed:
            expected = ", ".join(sorted(allowed))
            raise ConfigError(
                source,
                [(f"http_server_config.headers.{name}", f"invalid value for {name}: expected one of {expected}")],
            )
    if cfg.rate_limit.interval < 0 or cfg.rate_limit.burst < 0:
        raise ConfigError(source, [("rate_limit", "burst and interval cannot be negative")])
    if cfg.basic_auth_users:
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            raise ConfigError(
                source, [("basic_auth_users", "needs the bcrypt package (pip install 'carbond[web]')")]
            ) from None
    if cfg.tls_server_config is not None:
        ssl_context(cfg.tls_server_config, source)  # fail at start (or reload), naming the file
        _http2_suites(cfg, source)
    return cfg


#: The suites Go's HTTP/2 server requires in a TLS 1.2 suite list (golang.org/x/net/http2's ConfigureServer).
HTTP2_REQUIRED = frozenset({"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"})


def _http2_suites(cfg: WebConfig, source: str) -> None:
    """exporter-toolkit (node_exporter) refuses to start with ``http2`` on (the default), a suite list, TLS below
    1.3 allowed and neither HTTP/2-required suite listed. carbond speaks HTTP/1.1 only, but refuses the same
    files, so that a web config carbond accepts also starts node_exporter; ``http2: false`` lifts it."""
    tls = cfg.tls_server_config
    if tls is None or not cfg.http_server_config.http2 or not tls.cipher_suites or tls.min_version == "TLS13":
        return
    if not HTTP2_REQUIRED.intersection(tls.cipher_suites):
        raise ConfigError(
            source,
            [
                (
                    "tls_server_config.cipher_suites",
                    "http2: TLSConfig.CipherSuites is missing an HTTP/2-required AES_128_GCM_SHA256 cipher (list "
                    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, or set "
                    "http_server_config.http2: false)",
                )
            ],
        )


@contextlib.contextmanager
def _pem_file(text: str) -> Iterator[str]:
    """A path to inline PEM for OpenSSL's file loaders: an anonymous memory file where the kernel has them (the
    key never touches a disk), else a file in a private temporary directory, removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("carbond-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="carbond-pem-") as tmp:
        path = Path(tmp) / "pem"
        path.touch(0o600)
        path.write_text(text)
        yield str(path)


def _load_cert(ctx: ssl.SSLContext, tls: TlsServerConfig) -> None:
    with contextlib.ExitStack() as stack:
        cert = str(tls.cert_file) if tls.cert_file is not None else stack.enter_context(_pem_file(tls.cert or ""))
        key = str(tls.key_file) if tls.key_file is not None else stack.enter_context(_pem_file(tls.key or ""))
        ctx.load_cert_chain(cert, key)


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
    _set_suites(ctx, tls, source)
    mode = "RequireAnyClientCert" if tls.client_auth_type == "RequireClientCert" else tls.client_auth_type
    has_ca = tls.client_ca_file is not None or tls.client_ca is not None
    for path in tls.files():  # exporter-toolkit's order and words: the files, then the policy
        if not path.exists():
            raise ConfigError(source, [(key, f"open {path}: no such file or directory")])
    if mode == "NoClientCert" and has_ca:  # before the CA is parsed: an empty bundle is not the problem
        raise ConfigError(source, [(key, "Client CA's have been configured without a Client Auth Policy")])
    try:
        _load_cert(ctx, tls)
        if tls.client_ca_file is not None:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        elif tls.client_ca is not None:
            ctx.load_verify_locations(cadata=tls.client_ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(source, [(key, f"cannot load certificate or key: {exc}")]) from None
    if tls.curve_preferences and not _set_groups(ctx, [CURVES[c] for c in tls.curve_preferences]):
        try:
            ctx.set_ecdh_curve(ECDH_NAMES[tls.curve_preferences[0]])
        except (ValueError, ssl.SSLError) as exc:
            raise ConfigError(source, [(f"{key}.curve_preferences", str(exc))]) from None
    if mode in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # Go verifies against the system roots
    if tls.client_allowed_sans and mode not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        raise ConfigError(
            source, [(f"{key}.client_allowed_sans", "needs RequireAnyClientCert or RequireAndVerifyClientCert")]
        )
    _set_client_auth(ctx, mode, source)
    return ctx


def _set_suites(ctx: ssl.SSLContext, tls: TlsServerConfig, source: str) -> None:
    """cipher_suites (Go's names; TLS 1.3 ones do not restrict TLS 1.3) and prefer_server_cipher_suites."""
    key = "tls_server_config.cipher_suites"
    if tls.cipher_suites:
        unknown = [c for c in tls.cipher_suites if c not in CIPHERS and c not in TLS13_SUITES]
        if unknown:
            raise ConfigError(source, [(key, f"unknown cipher: {unknown[0]!r} (or an insecure one)")])
        below13 = [CIPHERS[c] for c in tls.cipher_suites if c in CIPHERS]
        if not below13:  # as in Go: nothing left for TLS 1.2 and lower
            if VERSIONS[tls.max_version] < ssl.TLSVersion.TLSv1_3:
                raise ConfigError(source, [(key, "TLS 1.3 suites only, but max_version is lower")])
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            try:
                ctx.set_ciphers(":".join(below13))
            except ssl.SSLError:
                raise ConfigError(source, [(key, "none of these suites is available")]) from None
    if not tls.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE


def _set_client_auth(ctx: ssl.SSLContext, mode: str, source: str) -> None:
    if mode == "RequireAndVerifyClientCert":
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif mode == "VerifyClientCertIfGiven":
        ctx.verify_mode = ssl.CERT_OPTIONAL
    elif mode == "NoClientCert":
        ctx.verify_mode = ssl.CERT_NONE
    else:
        why = hook_unavailable()
        if why is not None or not _ask_without_verifying(ctx, required=mode == "RequireAnyClientCert"):
            problem = (
                f"{mode} is not available: {why or 'the context check failed'}; VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert work everywhere"
            )
            raise ConfigError(source, [("tls_server_config.client_auth_type", problem)])


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


#: OpenSSL's SSL_CTRL_SET_GROUPS_LIST (SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl).
_SET_GROUPS_LIST = 92


def _ssl_ctx(ctx: ssl.SSLContext) -> tuple[Any, int] | None:
    """OpenSSL's library and the context's ``SSL_CTX *``, found at ``_CTX_OFFSET`` in CPython's context object and
    recognised through SSL_CTX_get_verify_mode; None when the child-process check (:func:`hook_unavailable`) or
    any check here fails. Leaves ``verify_mode`` at CERT_OPTIONAL: the caller sets the mode it wants after."""
    if hook_unavailable() is not None:
        return None
    import _ssl

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        get_mode, set_verify, ctrl = lib.SSL_CTX_get_verify_mode, lib.SSL_CTX_set_verify, lib.SSL_CTX_ctrl
    except (OSError, AttributeError):
        return None
    get_mode.argtypes, get_mode.restype = [ctypes.c_void_p], ctypes.c_int
    set_verify.argtypes, set_verify.restype = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback], None
    ctrl.argtypes, ctrl.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p], ctypes.c_long
    ctx.verify_mode = ssl.CERT_OPTIONAL  # SSL_VERIFY_PEER, to recognise the SSL_CTX pointer
    pointer = ctypes.c_void_p.from_address(id(ctx) + _CTX_OFFSET).value
    if not pointer or get_mode(pointer) != _VERIFY_PEER:
        return None
    ctx.verify_mode = ssl.CERT_REQUIRED
    if get_mode(pointer) != _VERIFY_PEER | _FAIL_IF_NO_PEER_CERT:
        return None
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return lib, pointer


def _set_groups(ctx: ssl.SSLContext, groups: list[str]) -> bool:
    """Offer these key exchange groups, in this order (Python's ssl sets one curve only); False when the hook is
    not available or OpenSSL refuses the list. The context's verify mode is left at CERT_NONE."""
    found = _ssl_ctx(ctx)
    ctx.verify_mode = ssl.CERT_NONE
    if found is None:
        return False
    lib, pointer = found
    return bool(lib.SSL_CTX_ctrl(pointer, _SET_GROUPS_LIST, 0, ":".join(groups).encode()) == 1)


def _ask_without_verifying(ctx: ssl.SSLContext, *, required: bool) -> bool:
    """Ask the client for a certificate and accept any it sends (RequestClientCert, RequireAnyClientCert).

    Python's ssl verifies every certificate it asks for; these two modes need OpenSSL's verify callback, set here
    on the context's SSL_CTX (see :func:`_ssl_ctx`). False when any check fails.
    """
    found = _ssl_ctx(ctx)
    if found is None:
        return False
    lib, pointer = found
    try:
        callback = _accept_any()
    except (MemoryError, OSError):  # no executable memory for the callback (a hardened runtime)
        return False
    lib.SSL_CTX_set_verify(pointer, _VERIFY_PEER | (_FAIL_IF_NO_PEER_CERT if required else 0), callback)
    return True


def _san_key(kind: str, value: str) -> str:
    """A SAN as compared: IP addresses in their canonical form, so ``2001:db8::1`` matches ``2001:DB8:0:0:0:0:0:1``."""
    value = value.strip()
    if kind in ("", "IP Address"):  # "": a configured name, of any kind
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value


def allowed_san(peer_cert: dict[str, Any], allowed: list[str]) -> bool:
    """Whether a verified client certificate (``SSLObject.getpeercert()``) carries one of the allowed SANs."""
    names = {_san_key(str(kind), str(value)) for kind, value in peer_cert.get("subjectAltName", ())}
    return any(_san_key("", name) in names for name in allowed)
