"""Which GPUs a sidecar may lease: any (single host) or its own pod's (kubelet check).

The kubelet check (THROTTLLEM_NODE_POD_CHECK=kubelet) chains three facts, each from the kernel
or the kubelet, none from the sidecar:

- the peer's pod UID, read from its cgroup through SO_PEERCRED (`agent.node.peers`), must be the
  UID the sidecar claims: a process cannot speak for a pod it does not run in;
- the claimed namespace/name must be that UID's: the kubelet keeps every pod's logs in
  /var/log/pods/<namespace>_<name>_<uid>/ (THROTTLLEM_NODE_POD_LOGS_DIR, mounted read-only);
  the pod-resources API lists pods by name only, so without this a pod could name another;
- the GPUs are those the pod-resources API lists for that namespace/name (`nvidia.com/gpu`).

What it does not prove: that the process is the pod's sidecar rather than another of its
containers (any container of the pod may steer the pod's own GPUs), and nothing at all when the
agent does not share the host's PID namespace (then SO_PEERCRED gives no PID and leases are
refused). Who can reach the socket at all is the socket's mode (0660, group
THROTTLLEM_NODE_SOCKET_GID) and the hostPath mount that exposes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agent.gpus.node_agent import PodIdentity
from agent.node.leases import LeaseRefused
from agent.node.peers import pod_uid_of
from agent.node.pod_resources import GPU_RESOURCE, PodResourcesClient, PodResourcesError

_IDENTITY_ADVICE = (
    "set THROTTLLEM_POD_NAMESPACE, THROTTLLEM_POD_NAME and THROTTLLEM_POD_UID in the sidecar from "
    "the Downward API (metadata.namespace, metadata.name, metadata.uid)"
)


class Authorizer(Protocol):
    """Decides which GPUs one sidecar may lease."""

    async def allowed_gpus(self, pod: PodIdentity, peer_pid: int | None) -> frozenset[str] | None:
        """The GPUs `pod` may lease (None: any GPU of the node); LeaseRefused when none."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class AnyPod:
    """No Kubernetes: whoever can open the socket may lease any GPU."""

    async def allowed_gpus(self, pod: PodIdentity, peer_pid: int | None) -> frozenset[str] | None:
        """Any GPU."""
        return None

    async def close(self) -> None:
        """Nothing to release."""


class KubeletCheck:
    """A sidecar leases only the GPUs the kubelet allocated to its own pod."""

    def __init__(
        self, client: PodResourcesClient, pod_logs: Path = Path("/var/log/pods"), proc: Path = Path("/proc")
    ) -> None:
        self._client = client
        self._pod_logs = pod_logs
        self._proc = proc

    async def allowed_gpus(self, pod: PodIdentity, peer_pid: int | None) -> frozenset[str] | None:
        """The claimed pod's GPUs, once the peer is shown to run in a pod of the claimed UID."""
        if pod.namespace is None or pod.name is None or pod.uid is None:
            raise LeaseRefused(f"hello did not name the pod (namespace, name and uid): {_IDENTITY_ADVICE}")
        self._check_peer(pod, peer_pid)
        self._check_name(pod)
        try:
            allocations = await self._client.gpus_by_pod()
        except PodResourcesError as err:
            raise LeaseRefused(str(err)) from err
        where = f"{pod.namespace}/{pod.name}"
        if (pod.namespace, pod.name) not in allocations:
            raise LeaseRefused(f"the kubelet lists no pod {where} on this node")
        gpus = allocations[(pod.namespace, pod.name)]
        if not gpus:
            raise LeaseRefused(f"pod {where} was allocated no {GPU_RESOURCE}: request it in the pod spec")
        return gpus

    def _check_peer(self, pod: PodIdentity, peer_pid: int | None) -> None:
        if peer_pid is None:
            raise LeaseRefused(
                "the node agent cannot see the sidecar's process (SO_PEERCRED gave no PID): run the "
                "agent in the host PID namespace (hostPID: true)"
            )
        try:
            uid = pod_uid_of(peer_pid, self._proc)
        except (OSError, ValueError) as err:
            raise LeaseRefused(f"cannot read the pod of process {peer_pid}: {err}") from err
        if uid != pod.uid:
            found = "no pod" if uid is None else f"pod UID {uid}"
            raise LeaseRefused(f"process {peer_pid} claims pod UID {pod.uid} but its cgroup shows {found}")

    def _check_name(self, pod: PodIdentity) -> None:
        if not self._pod_logs.is_dir():
            raise LeaseRefused(
                f"{self._pod_logs} is not mounted: the node agent needs the kubelet's pod log directory "
                "(read-only hostPath /var/log/pods, THROTTLLEM_NODE_POD_LOGS_DIR) to tie pod names to UIDs"
            )
        if not (self._pod_logs / f"{pod.namespace}_{pod.name}_{pod.uid}").is_dir():
            raise LeaseRefused(f"the kubelet runs no pod {pod.namespace}/{pod.name} with UID {pod.uid} here")

    async def close(self) -> None:
        """Close the kubelet channel."""
        await self._client.close()
