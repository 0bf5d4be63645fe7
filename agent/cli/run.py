"""`run`: the live sidecar next to an inference engine, configured by THROTTLLEM_* variables."""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.common import CliError
from agent.cli.logs import configure_logging
from agent.config import Settings, load_settings
from agent.engines.base import EngineError
from agent.gpus import GpuControlError
from agent.sidecar.app import run_sidecar

# The few settings worth overriding per invocation; the rest come from the environment.
OVERRIDES = ("policy", "actuator", "sidecar_port", "gateway_port", "log_level")


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the settings together, then serve until SIGTERM/SIGINT."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None
    }
    settings = load_settings(overrides, sidecar=True)
    configure_logging(settings.log_level, args.json_logs)
    try:
        return run_sidecar(settings)
    except (GpuControlError, EngineError) as exc:
        raise CliError(str(exc)) from None


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `run`."""
    run = sub.add_parser(
        "run",
        help="run the sidecar: control loop, optional gateway, /healthz /readyz /metrics",
        description="Configuration comes from THROTTLLEM_* environment variables (see the README); "
        "the flags override a few of them.",
    )
    run.add_argument("--json-logs", action="store_true", help="log one JSON object per line on stderr")
    run.add_argument("--policy", help=f"clock policy (THROTTLLEM_POLICY, now {settings.policy})")
    run.add_argument(
        "--actuator", help=f"nvml | twin | dryrun | node (THROTTLLEM_ACTUATOR, now {settings.actuator})"
    )
    run.add_argument(
        "--sidecar-port",
        type=int,
        help=f"health/metrics port (THROTTLLEM_SIDECAR_PORT, now {settings.sidecar_port})",
    )
    run.add_argument(
        "--gateway-port",
        type=int,
        help=f"gateway port, 0: off (THROTTLLEM_GATEWAY_PORT, now {settings.gateway_port})",
    )
    run.add_argument(
        "--log-level", help=f"DEBUG | INFO | WARNING | ERROR (THROTTLLEM_LOG_LEVEL, now {settings.log_level})"
    )
    run.set_defaults(func=cmd_run)
