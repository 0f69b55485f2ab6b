"""The web config in force, re-read on SIGHUP and when its file or the certificate files change.

As node_exporter does, a rotated certificate serves the next handshake without a restart: each new connection asks
:meth:`LiveWebConfig.tls` for the context, and the files' identities (inode, size, modification time) are compared
at most every ``check_interval_s``. A changed file is re-read whole; an invalid one is logged and the running
config kept. Every change builds a new :class:`BasicAuth`; remembered good logins are keyed by the stored hash, so
none outlives a revocation. ``rate_limit`` is exporter-toolkit's: a token bucket over every request to a protected
path (``burst`` at once, one more each ``interval``), 429 beyond.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from carbond.errors import ConfigError
from carbond.exporter.auth import REASONS, BasicAuth, BcryptPool, FailureLimiter
from carbond.exporter.http import Request, Response
from carbond.exporter.webconfig import WebConfig, allowed_san, load, ssl_context
from carbond.logs import get_logger

log = get_logger("carbond.web")

TOO_MANY_REQUESTS = Response(429, b"Too Many Requests\n", headers=(("Retry-After", "1"),))
Signature = tuple[tuple[int, int, int] | None, ...]


class LiveWebConfig:
    def __init__(
        self,
        path: Path | None,
        cfg: WebConfig | None = None,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._interval = check_interval_s
        self._clock = clock
        self._pool = BcryptPool()
        self._limiter = FailureLimiter()
        self._bucket = (0.0, clock())  # rate_limit's tokens and when they were counted
        if cfg is None:
            cfg = load(path) if path is not None else WebConfig()
        self._apply(cfg)
        self._checked = clock()
        self._signature = self._files()

    def _apply(self, cfg: WebConfig) -> None:
        tls = cfg.tls_server_config
        context = ssl_context(tls, str(self.path)) if tls is not None else None
        users = cfg.basic_auth_users
        self.config, self._context = cfg, context
        self._sans = tls.client_allowed_sans if tls is not None else []
        self.auth = BasicAuth(users, self._pool, self._limiter) if users else None
        self.headers = tuple(cfg.http_server_config.headers.items())
        limit = cfg.rate_limit
        self._rate = (limit.burst, 1.0 / limit.interval) if limit.interval > 0 else None
        if self._rate is not None:
            self._bucket = (float(limit.burst), self._clock())

    def _files(self) -> Signature:
        paths: list[Path] = [] if self.path is None else [self.path]
        tls = self.config.tls_server_config
        if tls is not None:
            paths += tls.files()
        out: list[tuple[int, int, int] | None] = []
        for p in paths:
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def reload(self, reason: str = "sighup") -> bool:
        """Re-read the file; True when the new config is in force (an invalid one is logged and ignored)."""
        self._checked = self._clock()
        if self.path is None:
            return False
        try:
            cfg = load(self.path)
            self._apply(cfg)
        except ConfigError as exc:
            log.error("web_config_reload_rejected", reason=reason, problems=exc.lines(), kept="the running config")
            return False
        finally:
            self._signature = self._files()  # a broken file is tried again once it changes again
        log.info("web_config_reloaded", reason=reason, tls=self._context is not None, users=len(cfg.basic_auth_users))
        return True

    def _maybe_reload(self) -> None:
        if self.path is None or self._clock() - self._checked < self._interval:
            return
        self._checked = self._clock()
        if self._files() != self._signature:
            self.reload("files changed")

    def tls(self) -> ssl.SSLContext | None:
        self._maybe_reload()
        return self._context

    def peer_allowed(self, tls: ssl.SSLObject) -> bool:
        """client_allowed_sans: the verified client certificate carries one of them (always true without)."""
        if not self._sans:
            return True
        cert = tls.getpeercert()
        return cert is not None and allowed_san(dict(cert), self._sans)

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return self.headers

    def _rate_limited(self) -> bool:
        if self._rate is None:
            return False
        burst, per_s = self._rate
        tokens, at = self._bucket
        now = self._clock()
        tokens = min(float(burst), tokens + (now - at) * per_s)
        if tokens < 1:
            self._bucket = (tokens, now)
            return True
        self._bucket = (tokens - 1, now)
        return False

    async def check(self, request: Request) -> Response | None:
        self._maybe_reload()
        if self._rate_limited():
            self._pool.refused["rate_limit"] += 1
            return TOO_MANY_REQUESTS
        return None if self.auth is None else await self.auth.check(request)

    def refused_logins(self) -> dict[str, int]:
        """Requests refused by basic auth or rate_limit since start, by reason (see carbond.exporter.auth)."""
        return {reason: self._pool.refused[reason] for reason in REASONS}

    def close(self) -> None:
        self._pool.close()
