"""Command line: ``carbond run | check-config | probe | zones | budgets | slurm | healthcheck | measure | report |
--version``.

Exit codes: 0 ok, 2 usage or config error, 1 runtime failure. User errors never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from carbond import __version__, budgets, config, healthcheck, job, zones
from carbond.errors import ConfigError
from carbond.exporter.webconfig import WebConfig
from carbond.exporter.webconfig import load as load_web_config
from carbond.slurm import cli as slurm_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="carbond", description="Energy and carbon footprint of this machine, for Prometheus."
    )
    p.add_argument("--version", action="version", version=f"carbond {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", metavar="FILE", help="YAML config (default: embedded defaults)")
    run.add_argument("--listen", metavar="ADDR", help="override listen_address, e.g. 0.0.0.0:9875")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")

    check = sub.add_parser("check-config", help="validate a config file; exit 0 or 2")
    check.add_argument("file", metavar="FILE")

    probe = sub.add_parser("probe", help="try every sensor backend and show what it finds")
    probe.add_argument("--config", metavar="FILE")
    probe.add_argument(
        "--seconds", type=job.positive_float, default=1.0, help="sample length for the power column (default 1)"
    )
    budgets.add_cli(sub)
    slurm_cli.add_cli(sub)
    healthcheck.add_cli(sub)
    job.add_cli(sub)
    zones.add_cli(sub)
    return p


def _load(path: str | None, listen: str | None = None) -> config.Config:
    cfg = config.load(path)
    if listen is not None:
        try:
            config.split_listen_address(listen)
        except ValueError as exc:
            raise ConfigError("--listen", [("listen_address", str(exc))]) from None
        cfg = cfg.model_copy(update={"listen_address": listen})
    return cfg


def web_config(cfg: config.Config, source: str | None) -> WebConfig | None:
    """The web config file the config names, validated (ConfigError naming that file otherwise)."""
    path = cfg.web.config_file
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(source or "<defaults>", [("web.config_file", f"{path}: no such file")])
    return load_web_config(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "budgets":
            return budgets.run_cli(args)
        if args.command == "slurm":
            return slurm_cli.run_cli(args)
        if args.command == "healthcheck":
            return healthcheck.run_cli(args)
        if args.command == "zones":
            return zones.run_cli(args)
        if args.command in job.COMMANDS:
            return job.run_cli(args)
        if args.command == "check-config":
            checked = config.load(args.file)
            web_config(checked, args.file)
            for advice in checked.advisories():
                print(f"carbond: warning: {args.file}: {advice}", file=sys.stderr)
            print(f"{args.file}: ok")
            return 0
        cfg = _load(args.config, vars(args).get("listen"))
        web = web_config(cfg, args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"carbond: config error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:  # `report -o`, `budgets render -o`: an output file that cannot be written
        output = vars(args).get("output")
        if not output or exc.filename != output:
            raise
        print(f"carbond: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    from carbond import logs

    if args.command == "probe":
        logs.configure("error", "console")
        from carbond.probe import probe

        print(asyncio.run(probe(cfg, args.seconds)))
        return 0
    logs.configure(args.log_level, args.log_format)
    from carbond import app

    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(app.run(cfg, web=web, config_path=args.config))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        code = 130
    # No asyncio.run: its shutdown joins the worker threads, and one may be stuck for good in a hung driver or
    # sysfs call (the sensor was timed out and marked down long ago). The state is flushed; leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
