"""`coordinator`: size the tensor-parallel engine from load (THROTTLLEM_COORDINATOR_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from agent.cli.common import CliError
from agent.cli.logs import configure_logging
from agent.config import Settings, warn_unknown_variables
from agent.coordinator.settings import CoordinatorSettings, load_coordinator_settings, parse_capacities

OVERRIDES = ("port", "router_port", "sizes", "capacities", "period_s", "log_level")
DEFAULT_LOG_DIR = Path(tempfile.gettempdir()) / "throttllem-coordinator"


def capacities_of(settings: CoordinatorSettings) -> dict[int, float]:
    """Each size's capacity: given, or from its capacity.json profile beside the IPS model."""
    from agent.bench.capacities import CapacityProfileError, load_capacities
    from agent.cli.simulate import PREDICTIVE_MAX_TOKENS
    from agent.slo_presets import load_slo_preset

    if settings.capacities is not None:
        return parse_capacities(settings.capacities)
    preset = load_slo_preset(settings.slo, settings.model)
    try:
        profiles = load_capacities(
            settings.models_dir, setups_of(settings), settings.capacity_trace, preset, PREDICTIVE_MAX_TOKENS
        )
    except CapacityProfileError as err:
        raise CliError(f"{err}; or set THROTTLLEM_COORDINATOR_CAPACITIES") from err
    return {size: profile.slo_rps for size, profile in profiles.items()}


def setups_of(settings: CoordinatorSettings, *, check_policy: bool = False) -> dict[int, Any]:
    """The twin of every size (for capacity keys, and what the local backend serves).

    With `check_policy`, a sidecar policy that cannot run on some size is refused up front.
    """
    from agent.catalog import gpu_spec, model_spec
    from agent.policy_registry import ServedEngine, check_live_policy
    from agent.twin.setup import TwinSetup

    setups = {
        size: TwinSetup(gpu_spec(settings.gpu), model_spec(settings.model), tp=size)
        for size in settings.tp_sizes
    }
    for size, setup in setups.items():
        setup.kv_blocks()  # refuses a size the model does not fit
        if not check_policy:
            continue
        try:
            check_live_policy(
                settings.policy, ServedEngine(setup.gpu, settings.model, size, settings.models_dir)
            )
        except ValueError as err:
            raise CliError(f"THROTTLLEM_COORDINATOR_POLICY={settings.policy!r} on tp{size}: {err}") from None
    return setups


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Validate the settings, then size engines until SIGTERM/SIGINT."""
    from agent.bench.processes import cancel_on_sigterm
    from agent.control.scaling import ScalingConfig
    from agent.telemetry import resource_with, tracing_for

    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    settings = load_coordinator_settings(overrides)
    configure_logging(settings.log_level, args.json_logs)
    warn_unknown_variables()
    scaling = ScalingConfig(
        tuple(capacities_of(settings).items()), settings.headroom, settings.grace_s, settings.shadow_timeout_s
    )
    tracing = tracing_for(
        lambda: resource_with({"service.name": "throttllem-coordinator", "throttllem.model": settings.model})
    )

    def announce(ports: dict[str, Any]) -> None:
        print(json.dumps({"event": "listening", **ports}), flush=True)

    if settings.backend == "kubernetes":
        from agent.coordinator.app import serve_kubernetes

        work = serve_kubernetes(settings, scaling, tracing.provider, announce)
    else:
        work = _local(settings, scaling, tracing.provider, args.log_dir, announce)
    try:
        asyncio.run(cancel_on_sigterm(work))
    except asyncio.CancelledError:
        pass
    except Exception as err:  # the API server's or kubeconfig's errors: one line, not a traceback
        from kubernetes_asyncio.config.config_exception import ConfigException

        if isinstance(err, ConfigException):
            raise CliError(str(err)) from None
        raise
    finally:
        tracing.shutdown()
    return 0


def _local(
    settings: CoordinatorSettings, scaling: Any, tracer_provider: Any, log_dir: Path, announce: Any
) -> Any:
    """The local backend's serve coroutine: a twin + sidecar pair per size behind a router."""
    from agent.bench.local_backend import serve_local
    from agent.bench.processes import SidecarSpec
    from agent.coordinator.app import build_coordinator
    from agent.coordinator.service import Coordinator

    setups = setups_of(settings, check_policy=True)

    def coordinator_for(backend: Any) -> Coordinator:
        return build_coordinator(settings, backend, scaling, tracer_provider)

    spec = SidecarSpec(policy=settings.policy, slo=settings.slo, models_dir=settings.models_dir)
    return serve_local(
        coordinator_for,
        setups,
        spec,
        log_dir=log_dir,
        period_s=settings.period_s,
        ready_poll_s=settings.ready_poll_s,
        host=settings.host,
        port=settings.port,
        router_host=settings.router_host,
        router_port=settings.router_port,
        announce=announce,
    )


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `coordinator`."""
    coord = sub.add_parser(
        "coordinator",
        help="size the tensor-parallel engine from load: shadow engines, switch, drain (local backend)",
        description="Configuration comes from THROTTLLEM_COORDINATOR_* environment variables (see the "
        "README); the flags override a few of them.",
    )
    coord.add_argument("--json-logs", action="store_true", help="log one JSON object per line on stderr")
    coord.add_argument("--port", type=int, help="port of /healthz and /metrics (THROTTLLEM_COORDINATOR_PORT)")
    coord.add_argument("--router-port", type=int, help="where clients send requests (local backend)")
    coord.add_argument("--sizes", help="TP sizes, comma-separated (THROTTLLEM_COORDINATOR_SIZES)")
    coord.add_argument("--capacities", help="req/s per size, size:rps,... (default: capacity.json profiles)")
    coord.add_argument(
        "--period-s", type=float, help="seconds between decisions (THROTTLLEM_COORDINATOR_PERIOD_S)"
    )
    coord.add_argument("--log-level", help="DEBUG | INFO | WARNING | ERROR")
    coord.add_argument(
        "--log-dir",
        type=Path,
        default=DEFAULT_LOG_DIR,
        help="where each engine process logs (default %(default)s)",
    )
    coord.set_defaults(func=cmd_coordinator)
