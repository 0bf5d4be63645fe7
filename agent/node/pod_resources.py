"""The kubelet's pod-resources API (v1): which devices each pod on this node was allocated.

`PodResourcesLister/List` over the kubelet's Unix socket, as dcgm-exporter uses it to map GPUs to
pods. The few messages read are built at run time from a descriptor (no generated code); only
the fields used are declared, and protobuf skips the others (cpu_ids, memory, topology, ...):

    package v1;
    message ListPodResourcesRequest {}
    message ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
    message PodResources { string name = 1; string namespace = 2;
                           repeated ContainerResources containers = 3; }
    message ContainerResources { string name = 1; repeated ContainerDevices devices = 2; }
    message ContainerDevices { string resource_name = 1; repeated string device_ids = 2; }

The NVIDIA device plugin registers resource `nvidia.com/gpu` with GPU UUIDs as device_ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

GPU_RESOURCE = "nvidia.com/gpu"
LIST_METHOD = "/v1.PodResourcesLister/List"
DEFAULT_TIMEOUT_S = 2.0

_FIELD = descriptor_pb2.FieldDescriptorProto


def _messages() -> dict[str, type[Any]]:
    """The message classes, from a file descriptor built here."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="throttllem/podresources_v1.proto", package="v1", syntax="proto3"
    )
    layout: dict[str, list[tuple[str, int, int, str | None]]] = {
        "ListPodResourcesRequest": [],
        "ListPodResourcesResponse": [("pod_resources", 1, _FIELD.TYPE_MESSAGE, ".v1.PodResources")],
        "PodResources": [
            ("name", 1, _FIELD.TYPE_STRING, None),
            ("namespace", 2, _FIELD.TYPE_STRING, None),
            ("containers", 3, _FIELD.TYPE_MESSAGE, ".v1.ContainerResources"),
        ],
        "ContainerResources": [
            ("name", 1, _FIELD.TYPE_STRING, None),
            ("devices", 2, _FIELD.TYPE_MESSAGE, ".v1.ContainerDevices"),
        ],
        "ContainerDevices": [
            ("resource_name", 1, _FIELD.TYPE_STRING, None),
            ("device_ids", 2, _FIELD.TYPE_STRING, None),
        ],
    }
    repeated = {"pod_resources", "containers", "devices", "device_ids"}
    for message_name, fields in layout.items():
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind, type_name in fields:
            label = _FIELD.LABEL_REPEATED if field_name in repeated else _FIELD.LABEL_OPTIONAL
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name is not None:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}")) for name in layout
    }


MESSAGES = _messages()
ListPodResourcesRequest = MESSAGES["ListPodResourcesRequest"]
ListPodResourcesResponse = MESSAGES["ListPodResourcesResponse"]


class PodResourcesError(Exception):
    """The kubelet's pod-resources API could not be asked; the message says where and why."""


class PodResourcesClient:
    """Asks the kubelet which GPUs each pod holds."""

    def __init__(self, socket_path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        self._list = self._channel.unary_unary(
            LIST_METHOD,
            request_serializer=ListPodResourcesRequest.SerializeToString,
            response_deserializer=ListPodResourcesResponse.FromString,
        )

    async def gpus_by_pod(self) -> dict[tuple[str, str], frozenset[str]]:
        """(namespace, name) -> the GPU UUIDs its containers were allocated, for every pod listed."""
        try:
            response = await self._list(ListPodResourcesRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise PodResourcesError(
                f"kubelet pod-resources API at {self.socket_path} failed ({err.code().name}: "
                f"{err.details()}): mount /var/lib/kubelet/pod-resources into the node agent "
                "(THROTTLLEM_NODE_POD_RESOURCES_SOCKET), or set THROTTLLEM_NODE_POD_CHECK=none "
                "on a host without Kubernetes"
            ) from err
        return {
            (pod.namespace, pod.name): frozenset(
                uuid
                for container in pod.containers
                for device in container.devices
                if device.resource_name == GPU_RESOURCE
                for uuid in device.device_ids
            )
            for pod in response.pod_resources
        }

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
