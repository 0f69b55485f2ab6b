"""``carbond healthcheck`` (or ``python -m carbond.healthcheck``): exit 0 when the local daemon answers ``/healthz``
with 200, else 1; 2 when its config cannot be read.

It is the container image's HEALTHCHECK, so it asks the address the daemon really listens on: ``--listen``, else
the ``listen_address`` of ``--config``; with neither, the command line of the carbond process it runs beside (PID 1
of the container: its ``--listen``, else its ``--config``, relative to that process's working directory), else
/etc/carbond/config.yaml, else the default address. A wildcard host (0.0.0.0, ::) is asked on loopback. When the
web config has ``tls_server_config`` it speaks https without verifying the certificate (it checks that the local
daemon is alive, not who it is); a daemon that requires client certificates cannot be checked this way.

It runs every 30 s beside the daemon, so it stays light: it reads the two keys it needs with yaml instead of
validating the whole config (the daemon did that when it started), and imports nothing else of carbond's
(``python -m carbond.healthcheck``: about 0.09 CPU-seconds a check, a quarter of the full command line's).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from carbond.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/carbond/config.yaml")
# Every-address listeners (dual stack for "::" and ""), asked through IPv4 loopback, which the socket answers
# on whichever family it fell back to.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "": "127.0.0.1", "*": "127.0.0.1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="the daemon's config (default: that of the carbond of PID 1)")
    p.add_argument("--listen", metavar="ADDR", help="the daemon's listen address, overriding the config's")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    p.add_argument("--pid", type=int, default=1, help=argparse.SUPPRESS)


def add_cli(subparsers: Any) -> None:
    add_arguments(subparsers.add_parser("healthcheck", help="exit 0 if the local daemon answers /healthz"))


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


def _process(pid: int) -> tuple[list[str], Path]:
    """The command line and working directory of a process (empty and / when they cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return [], Path("/")
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part], cwd


def _yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(source, [("", f"cannot read {path}: {exc}")]) from None
    return doc if isinstance(doc, dict) else {}


def url_for(listen: str, tls: bool) -> str:
    host, sep, port = listen.rpartition(":")
    if not (sep and host and port.isdigit()):
        from carbond.config import split_listen_address  # the full check, for its message

        try:
            split_listen_address(listen)
        except ValueError as exc:
            raise ConfigError("--listen", [("listen_address", str(exc))]) from None
    host = host.removeprefix("[").removesuffix("]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/healthz"


def resolve(config_path: str | None, listen: str | None, pid: int) -> str:
    """The /healthz URL of the daemon (ConfigError when its config cannot be read)."""
    config = Path(config_path) if config_path else None
    if config is None and listen is None:
        cmdline, cwd = _process(pid)
        found = daemon_args(cmdline)
        if found is not None:
            config = cwd / found[0] if found[0] else None
            listen = found[1]
        elif DEFAULT_CONFIG.is_file():
            config = DEFAULT_CONFIG
    doc = _yaml(config, str(config)) if config is not None else {}
    if listen is None:
        listen = doc.get("listen_address")
    if listen is None:
        from carbond.config import DEFAULT_LISTEN

        listen = DEFAULT_LISTEN
    web_file = (doc.get("web") or {}).get("config_file")
    tls = web_file is not None and _yaml(Path(str(web_file)), str(config)).get("tls_server_config") is not None
    return url_for(str(listen), tls)


def run_cli(args: Any) -> int:
    url = resolve(args.config, args.listen, args.pid)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m carbond.healthcheck", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        return run_cli(p.parse_args(argv))
    except ConfigError as exc:
        for line in exc.lines():
            print(f"carbond: config error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
