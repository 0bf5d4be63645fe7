"""Leader election with a `coordination.k8s.io/v1` Lease, so two coordinators never act at once.

The protocol is client-go's leader election: the holder renews `renewTime` every period; a
candidate takes the Lease only once `renewTime + leaseDurationSeconds` has passed. Every write
carries the `resourceVersion` it read, so of two candidates racing for an expired Lease the API
server accepts one and answers the other 409 Conflict. The coordinator acts only in a period
it holds the Lease, and rebuilds its state from the cluster each time it (re)gains it.

Times are wall-clock (`renewTime` is an RFC 3339 MicroTime the API server stores as is);
`lease_s` must exceed the coordinator's period plus the API's latency, or a slow renewal lets
another candidate take over while this one still acts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from agent.coordinator.backend import BackendError

DEFAULT_LEASE_NAME = "throttllem-coordinator"
DEFAULT_LEASE_S = 30


class LeaseElector:
    """One candidate for the Lease `name` in `namespace`."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        identity: str,
        *,
        name: str = DEFAULT_LEASE_NAME,
        lease_s: int = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_s < 1:
            raise ValueError("lease_s must be >= 1 s")
        self.api = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_s = lease_s
        self.clock = clock
        self.leader = False

    async def hold(self) -> bool:
        """Acquire or renew the Lease; whether this candidate leads until the next call."""
        try:
            self.leader = await self._hold()
        except ApiException as err:
            if err.status != 409:  # 409: another candidate wrote first; any other error: unsure
                raise BackendError(
                    f"could not read or write the Lease {self.name}: HTTP {err.status}"
                ) from err
            self.leader = False
        return self.leader

    async def _hold(self) -> bool:
        now = self._now()
        try:
            lease = await self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(now, now, transitions=0),
            )
            await self.api.create_namespaced_lease(self.namespace, body)
            return True
        spec = lease.spec or client.V1LeaseSpec()
        if spec.holder_identity == self.identity:
            spec.renew_time = now
        elif self._expired(spec, now):
            spec = self._spec(now, now, transitions=(spec.lease_transitions or 0) + 1)
        else:
            return False
        lease.spec = spec
        await self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # 409 if it changed since
        return True

    def _spec(self, acquired: datetime, renewed: datetime, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.lease_s,
            acquire_time=acquired,
            renew_time=renewed,
            lease_transitions=transitions,
        )

    def _expired(self, spec: client.V1LeaseSpec, now: datetime) -> bool:
        if spec.holder_identity is None or spec.renew_time is None:
            return True
        duration = spec.lease_duration_seconds or self.lease_s
        renewed = spec.renew_time if isinstance(spec.renew_time, datetime) else _parse(spec.renew_time)
        return (now - renewed).total_seconds() > duration

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
