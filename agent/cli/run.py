"""`run`: the live sidecar next to an inference engine, configured by THROTTLLEM_* variables and flags."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from agent.cli.common import CliError
from agent.cli.logs import configure_logging
from agent.config import Settings, env_name, load_settings
from agent.engines.base import EngineError
from agent.gpus import GpuControlError
from agent.sidecar.app import run_sidecar

# The settings a stack started by hand needs most. Each flag sets the field its variable sets and
# wins over it; both go through load_settings, so a bad value is refused in one place, naming the
# flag. The rest come from the environment only.
FLAG_SETTINGS = (
    "engine",
    "engine_url",
    "engine_metrics_url",
    "gpu",
    "model",
    "tp",
    "max_batch_size",
    "max_num_tokens",
    "actuator",
    "meter",
    "twin_url",
    "policy",
    "slo",
    "models_dir",
    "gateway_host",
    "gateway_port",
    "sidecar_host",
    "sidecar_port",
    "log_level",
)
METAVARS = {"_url": "URL", "_host": "HOST", "_port": "PORT", "_dir": "DIR"}  # by the field's name
EXAMPLE = """\
example, a sidecar steering `throttllem twin serve` on its default ports (8000 HTTP, 8002 metrics):
  throttllem run --engine triton --engine-url http://127.0.0.1:8000 \\
      --engine-metrics-url http://127.0.0.1:8002/metrics \\
      --actuator twin --meter twin --twin-url http://127.0.0.1:8000 \\
      --policy throttllem --gateway-port 9000 --sidecar-port 9401
then send requests to the gateway, e.g. `throttllem load --url http://127.0.0.1:9000 --duration 30`."""


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the settings together, then serve until SIGTERM/SIGINT."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in FLAG_SETTINGS if getattr(args, name) is not None
    }
    settings = load_settings(overrides, sidecar=True)
    configure_logging(settings.log_level, args.json_logs)
    try:
        return run_sidecar(settings)
    except (GpuControlError, EngineError) as exc:
        raise CliError(str(exc)) from None


def flag_help(field: str, settings: Settings) -> str:
    """The field's own description, the variable the flag mirrors and the value it has now."""
    value = getattr(settings, field)
    description = Settings.model_fields[field].description or field
    now = "unset" if value is None else str(value)
    return f"{description} ({env_name(field)}; now {now})".replace("%", "%%")


def flag_metavar(field: str) -> str | None:
    """The words a field takes one of, else what kind of value it is; None: argparse's default."""
    words = get_args(Settings.model_fields[field].annotation)
    if words and all(isinstance(word, str) for word in words):
        return "|".join(words)
    return next((kind for suffix, kind in METAVARS.items() if field.endswith(suffix)), None)


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `run`."""
    run = sub.add_parser(
        "run",
        help="run the sidecar: control loop, optional gateway, /healthz /readyz /metrics",
        description="Configuration comes from THROTTLLEM_* environment variables (the README lists them\n"
        "all); each flag below sets one of them for this run and wins over the variable. Prints one\n"
        "JSON line with the bound ports at start; stops on SIGINT or SIGTERM, resetting the clocks.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--json-logs", action="store_true", help="log one JSON object per line on stderr")
    for field in FLAG_SETTINGS:
        run.add_argument(
            f"--{field.replace('_', '-')}",
            dest=field,
            metavar=flag_metavar(field),
            help=flag_help(field, settings),
        )
    run.set_defaults(func=cmd_run)
