"""`throttllem` command line: parse, build objects, call; each command group in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from agent.cli import bench, coordinator, demo, load, models, node, pool, replay, run, simulate, twin
from agent.cli.common import CliError, stderr
from agent.config import load_settings

COMMAND_GROUPS = (simulate, demo, replay, twin, models, pool, bench, run, coordinator, load, node)
DISTRIBUTION = "throttllem"


def installed_version() -> str:
    """The version pip installed; a source tree on PYTHONPATH without installing has none."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed: pip install the package for its version)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="throttllem", description="SLO-aware GPU clock control for LLM serving"
    )
    parser.add_argument(
        "--version", action="version", version=f"throttllem {installed_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    settings = load_settings()
    for group in COMMAND_GROUPS:
        group.register(sub, settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `throttllem` console script."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        stderr.print("throttllem: interrupted")
        return 130
    except (CliError, ValueError, OSError) as exc:
        print(f"throttllem: error: {exc}", file=sys.stderr)
        return 1
