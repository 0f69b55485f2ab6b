"""``carbond healthcheck``: exit 0 when the local daemon answers ``/healthz`` with 200, else 1.

It is the container image's HEALTHCHECK, so it asks the address the daemon really listens on: ``--listen``, else
the ``listen_address`` of ``--config``; with neither, the command line of the carbond process it runs beside (PID 1
of the container: its ``--listen``, else its ``--config``), else the embedded default. A wildcard host (0.0.0.0,
::) is asked on loopback. When the web config has ``tls_server_config`` it speaks https without verifying the
certificate (it checks that the local daemon is alive, not who it is); a daemon that requires client certificates
cannot be checked this way.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from carbond import config
from carbond.exporter.webconfig import load as load_web_config

DEFAULT_CONFIG = Path("/etc/carbond/config.yaml")
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}


def add_cli(subparsers: Any) -> None:
    hc = subparsers.add_parser("healthcheck", help="exit 0 if the local daemon answers /healthz (a HEALTHCHECK)")
    hc.add_argument("--config", metavar="FILE", help="the daemon's config (default: that of the carbond of PID 1)")
    hc.add_argument("--listen", metavar="ADDR", help="the daemon's listen address, overriding the config's")
    hc.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    hc.add_argument("--pid", type=int, default=1, help=argparse.SUPPRESS)


def daemon_args(cmdline: Sequence[str]) -> tuple[str | None, str | None] | None:
    """(--config, --listen) of a ``carbond run`` command line, or None when it is not one."""
    for i, arg in enumerate(cmdline):
        is_carbond = Path(arg).name == "carbond" or (arg == "carbond" and i > 0 and cmdline[i - 1] == "-m")
        if is_carbond and cmdline[i + 1 : i + 2] == ["run"]:
            p = argparse.ArgumentParser(add_help=False)
            p.add_argument("--config")
            p.add_argument("--listen")
            known, _ = p.parse_known_args(list(cmdline[i + 2 :]))
            return known.config, known.listen
    return None


def _process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def url_for(listen: str, tls: bool) -> str:
    host, port = config.split_listen_address(listen)
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/healthz"


Loader = Callable[[str | None, str | None], config.Config]


def resolve(config_path: str | None, listen: str | None, pid: int, load: Loader) -> str:
    """The /healthz URL of the daemon; ``load(config, listen)`` is the CLI's (ConfigError when the config is bad)."""
    if config_path is None and listen is None:
        found = daemon_args(_process_cmdline(pid))
        if found is not None:
            config_path, listen = found
        elif DEFAULT_CONFIG.is_file():
            config_path = str(DEFAULT_CONFIG)
    cfg = load(config_path, listen)
    web_file = cfg.web.config_file
    tls = web_file is not None and web_file.is_file() and load_web_config(web_file).tls_server_config is not None
    return url_for(cfg.listen_address, tls)


def run_cli(args: Any, load: Loader) -> int:
    url = resolve(args.config, args.listen, args.pid, load)
    ctx = None
    if url.startswith("https:"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=ctx) as r:
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"carbond healthcheck: {url}: {reason}", file=sys.stderr)
        return 1
    print(f"carbond healthcheck: {url}: {status}")
    return 0 if status == 200 else 1
