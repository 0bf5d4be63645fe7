"""The coordinator's Kubernetes backend: one Deployment per engine size, one Service whose selector moves.

Every engine size is a Deployment (`triton-throttllem-tp1`, `-tp2`, … as `deploy/k8s/engines`
ships them) whose pods run Triton with `nvidia.com/gpu: N` and the throttllem sidecar, labelled
`throttllem.dev/tp=<N>`; one Service sends clients to the pods its selector names. Through the
Kubernetes API (kubernetes-asyncio):

- `start(size)` scales that Deployment to 1 replica (the scale subresource), `stop(size)` to 0 —
  the kubelet then sends SIGTERM, and the sidecar resets its GPUs as it exits;
- `is_ready(size)` is the Deployment's `status.readyReplicas` ≥ 1 (its pods' readiness probes);
- `route_to(size)` patches the Service's selector to `throttllem.dev/tp=<size>`;
- `load(size)` reads `/metrics` of every ready pod of that size on the sidecar port, summed;
- `routed_size()` and `running_sizes()` read the Service and the Deployments, so a restarted
  coordinator finds where things stand in the cluster itself.

Every call is idempotent (scaling to the replica count it has, patching the selector it has). API
errors (409 conflicts, 5xx, timeouts) become `BackendError`, which the coordinator retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from agent.coordinator.backend import BackendError, SidecarLoadReader
from agent.coordinator.load import EngineLoad
from agent.coordinator.names import DEFAULT_SERVICE, SIZE_LABEL, deployment_name

SIDECAR_PORT = 9401


class KubernetesBackend:
    """Engines of one model in one namespace, through the Kubernetes API."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        sizes: Sequence[int],
        *,
        service: str = DEFAULT_SERVICE,
        deployment_for: Callable[[int], str] = deployment_name,
        sidecar_port: int = SIDECAR_PORT,
    ) -> None:
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.sizes = tuple(sorted(sizes))
        self.service = service
        self.deployment_for = deployment_for
        self.sidecar_port = sidecar_port
        self._sidecars = SidecarLoadReader()

    async def routed_size(self) -> int | None:
        """The size the Service's selector names; None when it names none."""
        service = await self._api(
            "read the Service", self.core.read_namespaced_service(self.service, self.namespace)
        )
        value = (service.spec.selector or {}).get(SIZE_LABEL)
        return int(value) if value is not None else None

    async def running_sizes(self) -> tuple[int, ...]:
        """Sizes whose Deployment asks for a replica."""
        running = []
        for size in self.sizes:
            deployment = await self._deployment(size)
            if (deployment.spec.replicas or 0) > 0:
                running.append(size)
        return tuple(running)

    async def start(self, size: int) -> None:
        """Scale the size's Deployment to one replica."""
        await self._scale(size, 1)

    async def stop(self, size: int) -> None:
        """Scale the size's Deployment to zero: its pods get SIGTERM and their sidecars reset the GPUs."""
        await self._scale(size, 0)

    async def is_ready(self, size: int) -> bool:
        """Whether a replica of the size's Deployment is ready."""
        status = await self._api(
            f"read {self.deployment_for(size)}'s status",
            self.apps.read_namespaced_deployment_status(self.deployment_for(size), self.namespace),
        )
        return (status.status.ready_replicas or 0) >= 1

    async def route_to(self, size: int) -> None:
        """Point the Service's selector at the size's pods."""
        body = {"spec": {"selector": {SIZE_LABEL: str(size)}}}
        await self._api(
            f"move the Service to tp{size}",
            self.core.patch_namespaced_service(self.service, self.namespace, body),
        )

    async def load(self, size: int) -> EngineLoad:
        """Arrivals, held and in-flight requests summed over the size's ready pods."""
        pods = await self._api(
            f"list tp{size}'s pods",
            self.core.list_namespaced_pod(self.namespace, label_selector=f"{SIZE_LABEL}={size}"),
        )
        ips = [pod.status.pod_ip for pod in pods.items if pod.status and pod.status.pod_ip and _ready(pod)]
        if not ips:
            raise BackendError(f"tp{size} has no ready pod to read the load of")
        loads = await asyncio.gather(
            *(self._sidecars.read(f"http://{ip}:{self.sidecar_port}/metrics") for ip in ips)
        )
        return EngineLoad(
            sum(load.arrived_total for load in loads),
            sum(load.held for load in loads),
            sum(load.in_flight for load in loads),
        )

    async def close(self) -> None:
        """Close the HTTP session to the sidecars (the API client is the caller's)."""
        await self._sidecars.close()

    async def _deployment(self, size: int) -> client.V1Deployment:
        name = self.deployment_for(size)
        return await self._api(f"read {name}", self.apps.read_namespaced_deployment(name, self.namespace))

    async def _scale(self, size: int, replicas: int) -> None:
        name = self.deployment_for(size)
        body = {"spec": {"replicas": replicas}}
        await self._api(
            f"scale {name} to {replicas}",
            self.apps.patch_namespaced_deployment_scale(name, self.namespace, body),
        )

    @staticmethod
    async def _api(what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except ApiException as err:
            raise BackendError(f"could not {what}: HTTP {err.status} {err.reason}") from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise BackendError(f"could not {what}: {err}") from err


def _ready(pod: client.V1Pod) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)
