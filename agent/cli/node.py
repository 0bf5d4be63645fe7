"""`node`: the node agent, the one process that holds CAP_SYS_ADMIN and steers the node's GPUs.

Configuration comes from THROTTLLEM_NODE_* variables (`agent.node.settings`); the flags override
a few. Runs until SIGTERM/SIGINT, resetting every leased GPU on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from agent.cli.common import CliError
from agent.cli.logs import configure_logging
from agent.config import Settings, warn_unknown_variables
from agent.gpus import GpuControlError
from agent.node.settings import NODE_PREFIX, NodeSettings, load_node_settings

OVERRIDES = ("socket", "gpu_backend", "twin_urls", "lease_ttl_s", "pod_check", "log_level")


def cmd_node(args: argparse.Namespace) -> int:
    """Validate the settings, open the GPUs, serve leases until SIGTERM/SIGINT."""
    from agent.bench.processes import cancel_on_sigterm
    from agent.node.server import AgentStartError

    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    settings = load_node_settings(overrides)
    if args.status:
        print(json.dumps(asyncio.run(query_status(settings.socket)), indent=2))
        return 0
    configure_logging(settings.log_level, args.json_logs)
    warn_unknown_variables()
    try:
        asyncio.run(cancel_on_sigterm(_serve(settings)))
    except asyncio.CancelledError:
        pass
    except (GpuControlError, AgentStartError) as err:
        raise CliError(str(err)) from None
    return 0


async def _serve(settings: NodeSettings) -> None:
    from agent.node.authorize import AnyPod, Authorizer, KubeletCheck
    from agent.node.gpu_backends import NodeGpu, open_nvml_gpus, open_twin_gpus
    from agent.node.pod_resources import PodResourcesClient
    from agent.node.server import NodeAgent

    gpus: list[NodeGpu] = list(
        await open_twin_gpus(settings.twin_url_list)
        if settings.gpu_backend == "twin"
        else await open_nvml_gpus()
    )
    authorizer: Authorizer = (
        KubeletCheck(
            PodResourcesClient(settings.pod_resources_socket), settings.pod_logs_dir, settings.proc_root
        )
        if settings.pod_check == "kubelet"
        else AnyPod()
    )
    agent = NodeAgent(
        gpus,
        authorizer,
        lease_ttl_s=settings.lease_ttl_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_connections=settings.max_connections,
    )

    def announce(event: dict[str, Any]) -> None:
        print(json.dumps(event), flush=True)

    await agent.run(settings.socket, settings.socket_gid, announce)


async def query_status(path: Path, timeout_s: float = 2.0) -> dict[str, Any]:
    """The running agent's leases and GPUs, as its `status` request answers them."""
    from agent.gpus.node_agent import NodeAgentTarget, agent_status

    try:
        return await agent_status(NodeAgentTarget(path, timeout_s=timeout_s))
    except GpuControlError as err:
        raise CliError(f"no node agent answered on {path} ({err}): is `throttllem node` running?") from None


def _variables() -> str:
    lines = ["environment (flags override):"]
    for field, info in NodeSettings.model_fields.items():
        default = "unset" if info.default is None else info.default
        lines.append(f"  {NODE_PREFIX}{field.upper()} (default {default}): {info.description}")
    return "\n".join(lines).replace("%", "%%")


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `node`."""
    node = sub.add_parser(
        "node",
        help="node agent: lease GPU clocks to unprivileged sidecars over a Unix socket, reset on lapse",
        description="The only process that needs CAP_SYS_ADMIN: sidecars (THROTTLLEM_ACTUATOR=node) "
        "lease their pod's GPUs from it; a lease that lapses (sidecar killed, frozen or gone) resets "
        "the GPU to stock clocks and power limit.",
        epilog=_variables(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    node.add_argument("--json-logs", action="store_true", help="log one JSON object per line on stderr")
    node.add_argument(
        "--status", action="store_true", help="print the running agent's GPUs and leases as JSON, and exit"
    )
    node.add_argument("--socket", help="Unix socket to listen on (THROTTLLEM_NODE_SOCKET)")
    node.add_argument("--gpu-backend", help="nvml | twin (THROTTLLEM_NODE_GPU_BACKEND)")
    node.add_argument("--twin-urls", help="twin base URLs, comma-separated (THROTTLLEM_NODE_TWIN_URLS)")
    node.add_argument("--lease-ttl-s", type=float, help="lease TTL in seconds (THROTTLLEM_NODE_LEASE_TTL_S)")
    node.add_argument("--pod-check", help="kubelet | none (THROTTLLEM_NODE_POD_CHECK)")
    node.add_argument("--log-level", help="DEBUG | INFO | WARNING | ERROR (THROTTLLEM_NODE_LOG_LEVEL)")
    node.set_defaults(func=cmd_node)
