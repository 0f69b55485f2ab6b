"""TLS and basic auth for /metrics from a web config file in the Prometheus exporter-toolkit format.

```yaml
tls_server_config:
  cert_file: /etc/carbond/tls.crt
  key_file: /etc/carbond/tls.key
  client_ca_file: /etc/carbond/ca.crt         # optional
  client_auth_type: RequireAndVerifyClientCert  # NoClientCert (default), RequestClientCert, RequireAnyClientCert,
                                                # VerifyClientCertIfGiven, RequireAndVerifyClientCert
  min_version: TLS12                            # TLS12 (default) or TLS13
basic_auth_users:
  prometheus: $2y$10$...                        # bcrypt hashes, as for node_exporter
```

Existing Prometheus setups reuse their file as is. Wrong or missing credentials get the same 401 whatever was
wrong, after the same bcrypt work (an unknown user is checked against a dummy hash). Good credentials are cached
(by a SHA-256 of user and password) so a scrape every few seconds does not pay bcrypt's cost each time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ssl
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from carbond.config import load_model
from carbond.errors import ConfigError

ClientAuth = Literal[
    "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Strict):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: ClientAuth = "NoClientCert"
    min_version: Literal["TLS12", "TLS13"] = "TLS12"


class WebConfig(_Strict):
    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[str, str] = {}


def load(path: Path) -> WebConfig:
    source = str(path)
    cfg = load_model(path, WebConfig, "web config")
    for user, hashed in cfg.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(source, [(f"basic_auth_users.{user}", "not a bcrypt hash")])
    if cfg.basic_auth_users:
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            raise ConfigError(
                source, [("basic_auth_users", "needs the bcrypt package (pip install 'carbond[web]')")]
            ) from None
    if cfg.tls_server_config is not None:
        ssl_context(cfg.tls_server_config, source)  # fail at start, naming the file, not at the first scrape
    return cfg


def ssl_context(tls: TlsServerConfig, source: str = "web config") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLS13" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, [("tls_server_config", f"cannot load certificate or key: {exc}")]) from None
    needs_ca = tls.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
    if needs_ca and tls.client_ca_file is None:
        raise ConfigError(source, [("tls_server_config.client_ca_file", f"required by {tls.client_auth_type}")])
    if tls.client_auth_type == "RequireAndVerifyClientCert":
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.client_auth_type == "NoClientCert":
        ctx.verify_mode = ssl.CERT_NONE
    else:  # Python's ssl cannot ask for a certificate without verifying one it gets: verify when given
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.client_ca_file is not None else ssl.CERT_NONE
    return ctx


class BasicAuth:
    """Checks an ``Authorization`` header against the users' bcrypt hashes (off the event loop)."""

    def __init__(self, users: dict[str, str]) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._hashes = {u: h.encode() for u, h in users.items()}
        self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(10))  # unknown users cost the same work
        self._good: set[bytes] = set()

    def _check(self, user: str, password: bytes) -> bool:
        key = hashlib.sha256(user.encode() + b"\0" + password).digest()
        if key in self._good:
            return True
        ok = self._bcrypt.checkpw(password, self._hashes.get(user, self._dummy)) and user in self._hashes
        if ok and len(self._good) < 1024:
            self._good.add(key)
        return ok

    async def authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        raw_user, _, password = decoded.partition(b":")
        user = raw_user.decode("utf-8", "replace")
        if not user:
            return False
        key = hashlib.sha256(user.encode() + b"\0" + password).digest()
        if key in self._good:  # the common case, a scrape with good credentials: no thread hop
            return True
        return await asyncio.to_thread(self._check, user, password)
