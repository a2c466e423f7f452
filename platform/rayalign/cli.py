"""``rayalign`` command line, and the argument handling every recipe shares.

    rayalign plugins                 loaded plugins with package, version and hooks
    rayalign run CONFIG [key=value]  run a recipe config's stages as one job
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

from rayalign.config import RunConfig, load_config
from rayalign.errors import RayalignError


def exits_cleanly(fn: Callable) -> Callable:
    """User errors become one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RayalignError as exc:
            print(f"rayalign: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper


def recipe_config(default_config: Path, argv: list[str]) -> RunConfig:
    """A recipe's config: its YAML (or ``--config FILE``) plus ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=f"run {default_config.stem}")
    parser.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model=/models/x dpo.beta=0.2")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def cmd_plugins(args) -> None:
    from rayalign.plugins import get_plugin_manager

    pm = get_plugin_manager()
    for info in sorted(pm.info.values(), key=lambda i: i.name):
        print(f"{info.name:<24} {info.package} {info.version}  hooks: {', '.join(info.hooks)}")
    for kind, registry in (("stages", pm.stages), ("losses", pm.losses), ("metrics", pm.metrics),
                           ("rewards", pm.rewards), ("formats", pm.formats)):
        print(f"{kind}: {', '.join(f'{n} ({registry.owner[n]})' for n in registry) or '-'}")


def cmd_run(args) -> None:
    from rayalign.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.resume = True
    run_pipeline(cfg, source=args.config)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rayalign")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded plugins").set_defaults(fn=cmd_plugins)
    run = sub.add_parser("run", help="run a config's stages")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*")
    run.add_argument("--resume", action="store_true", help="skip stages already finished in output_dir")
    run.set_defaults(fn=cmd_run)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
