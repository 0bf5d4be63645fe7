"""`throttllem coordinator` wiring: the coordinator from its settings, and the Kubernetes run.

On Kubernetes: the API client, the backend, the Lease and the loop. In a pod the service
account's credentials and namespace are used (in-cluster config); outside one, the current
kubeconfig context. The coordinator acts only while it holds the Lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException
from opentelemetry import trace

from agent.control.scaling import ScalingConfig
from agent.coordinator.backend import ScaleBackend
from agent.coordinator.http_api import build_coordinator_app
from agent.coordinator.kubernetes import KubernetesBackend
from agent.coordinator.lease import LeaseElector
from agent.coordinator.service import Coordinator, lead
from agent.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


async def api_client() -> client.ApiClient:
    """A client with the pod's service account, or else the kubeconfig's current context."""
    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            await config.load_kube_config()
        except (ConfigException, FileNotFoundError, TypeError) as err:
            raise ConfigException(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({err})"
            ) from err
    return client.ApiClient()


def build_coordinator(
    settings: CoordinatorSettings,
    backend: ScaleBackend,
    scaling: ScalingConfig,
    tracer_provider: trace.TracerProvider,
) -> Coordinator:
    """The coordinator `settings` describe, acting through `backend`."""
    return Coordinator(
        backend,
        scaling,
        initial_size=settings.first_size,
        drain_timeout_s=settings.drain_timeout_s,
        min_drain_s=settings.min_drain_s,
        tracer_provider=tracer_provider,
    )


def namespace_of(settings: CoordinatorSettings) -> str:
    """The configured namespace, else the pod's own, else `default`."""
    if settings.namespace:
        return settings.namespace
    with contextlib.suppress(OSError):
        return POD_NAMESPACE_FILE.read_text().strip()
    return "default"


async def serve_kubernetes(
    settings: CoordinatorSettings,
    scaling: ScalingConfig,
    tracer_provider: trace.TracerProvider,
    announce: Callable[[dict[str, Any]], None],
) -> None:
    """Size the engines of `settings.service` until cancelled."""
    namespace = namespace_of(settings)
    identity = settings.identity or os.environ.get("HOSTNAME") or socket.gethostname()
    async with contextlib.AsyncExitStack() as stack:
        api = await stack.enter_async_context(await api_client())
        backend = KubernetesBackend(
            api,
            namespace,
            settings.tp_sizes,
            service=settings.service,
            deployment_for=settings.deployment_of,
        )
        stack.push_async_callback(backend.close)
        coordinator = build_coordinator(settings, backend, scaling, tracer_provider)
        elector = LeaseElector(api, namespace, identity, name=settings.lease_name, lease_s=settings.lease_s)
        runner = web.AppRunner(build_coordinator_app(coordinator), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info(
            "coordinating %s in %s as %s (Lease %s)",
            settings.service,
            namespace,
            identity,
            settings.lease_name,
        )
        announce({"port": int(runner.addresses[0][1]), "namespace": namespace, "identity": identity})
        await lead(coordinator, elector, settings.period_s, ready_poll_s=settings.ready_poll_s)
