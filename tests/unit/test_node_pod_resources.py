"""The pod-resources client and the kubelet check against a real gRPC server on a Unix socket."""

import asyncio
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from agent.gpus.node_agent import PodIdentity
from agent.node.authorize import AnyPod, KubeletCheck
from agent.node.leases import LeaseRefused
from agent.node.pod_resources import (
    ListPodResourcesRequest,
    ListPodResourcesResponse,
    PodResourcesClient,
    PodResourcesError,
)

UID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
GPU_A, GPU_B = "GPU-11111111-aaaa", "GPU-22222222-bbbb"


def kubelet_answer() -> ListPodResourcesResponse:
    """Two pods as the kubelet lists them: ours with a GPU in its engine container, another with one."""
    response = ListPodResourcesResponse()
    pod = response.pod_resources.add(name="llm-0", namespace="serving")
    pod.containers.add(name="throttllem")  # the sidecar holds no device
    engine = pod.containers.add(name="triton")
    engine.devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU_A])
    engine.devices.add(resource_name="example.com/nic", device_ids=["nic-0"])
    other = response.pod_resources.add(name="batch-7", namespace="jobs")
    other.containers.add(name="main").devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU_B])
    response.pod_resources.add(name="web", namespace="serving")  # no GPU
    return response


@asynccontextmanager
async def kubelet(answer=kubelet_answer):
    """A gRPC server speaking v1.PodResourcesLister/List on a Unix socket, as the kubelet does."""
    calls = []

    async def list_pods(request, context):
        calls.append(request)
        return answer()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "v1.PodResourcesLister",
                {
                    "List": grpc.unary_unary_rpc_method_handler(
                        list_pods,
                        request_deserializer=ListPodResourcesRequest.FromString,
                        response_serializer=ListPodResourcesResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    path = Path(tempfile.mkdtemp(prefix="kubelet")) / "kubelet.sock"
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        yield path, calls
    finally:
        await server.stop(None)


def test_message_field_numbers_match_the_kubelet_proto():
    # Hand-encoded wire bytes of api.proto's field numbers: PodResources{name=1, namespace=2,
    # containers=3}, ContainerResources{name=1, devices=2}, ContainerDevices{resource_name=1, device_ids=2}.
    device = b"\x0a\x0envidia.com/gpu" + b"\x12\x05GPU-1"
    container = b"\x0a\x01c" + b"\x12" + bytes([len(device)]) + device
    pod = b"\x0a\x01p" + b"\x12\x01n" + b"\x1a" + bytes([len(container)]) + container
    wire = b"\x0a" + bytes([len(pod)]) + pod + b"\x22\x03\x08\x01\x10"  # + an unknown field
    parsed = ListPodResourcesResponse.FromString(wire)
    (resources,) = parsed.pod_resources
    assert (resources.name, resources.namespace) == ("p", "n")
    assert list(resources.containers[0].devices[0].device_ids) == ["GPU-1"]


def test_gpus_by_pod_maps_namespace_and_name_to_gpu_uuids():
    async def scenario():
        async with kubelet() as (path, calls):
            client = PodResourcesClient(path)
            try:
                return await client.gpus_by_pod(), calls
            finally:
                await client.close()

    pods, calls = asyncio.run(scenario())
    assert len(calls) == 1
    assert pods == {
        ("serving", "llm-0"): frozenset({GPU_A}),
        ("jobs", "batch-7"): frozenset({GPU_B}),
        ("serving", "web"): frozenset(),
    }


def test_an_absent_kubelet_is_a_clear_error_naming_the_socket():
    async def scenario():
        client = PodResourcesClient(Path(tempfile.mkdtemp()) / "none.sock", timeout_s=0.5)
        try:
            await client.gpus_by_pod()
        finally:
            await client.close()

    with pytest.raises(PodResourcesError, match=r"none\.sock.*THROTTLLEM_NODE_POD_CHECK=none"):
        asyncio.run(scenario())


def proc_with(tmp_path: Path, pid: int, cgroup: str) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text(cgroup)
    return tmp_path


OUR_CGROUP = (
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/x.scope"
)


def pod_logs(tmp_path: Path, *pods: str) -> Path:
    """The kubelet's /var/log/pods with a directory per pod, <namespace>_<name>_<uid>."""
    logs = tmp_path / "pods"
    for pod in pods:
        (logs / pod / "triton").mkdir(parents=True)
    return logs


def check(tmp_path, pod, pid=77, cgroup=OUR_CGROUP, logs=None):
    logs = logs or pod_logs(tmp_path, f"serving_llm-0_{UID}", f"serving_web_{UID}", f"serving_ghost_{UID}")

    async def scenario():
        async with kubelet() as (path, _):
            authorizer = KubeletCheck(PodResourcesClient(path), logs, proc_with(tmp_path, 77, cgroup))
            try:
                return await authorizer.allowed_gpus(pod, pid)
            finally:
                await authorizer.close()

    return asyncio.run(scenario())


def test_kubelet_check_gives_the_pods_own_gpus(tmp_path):
    assert check(tmp_path, PodIdentity("serving", "llm-0", UID)) == frozenset({GPU_A})


@pytest.mark.parametrize(
    ("pod", "pid", "cgroup", "reason"),
    [
        (PodIdentity("serving", "llm-0", None), 77, OUR_CGROUP, "did not name the pod"),
        (PodIdentity("serving", "llm-0", UID), None, OUR_CGROUP, "hostPID"),
        (PodIdentity("serving", "llm-0", UID), 78, OUR_CGROUP, "cannot read the pod of process 78"),
        (PodIdentity("serving", "llm-0", UID), 77, "0::/user.slice/x.scope", "its cgroup shows no pod"),
        (
            PodIdentity("serving", "llm-0", "00000000-1111-2222-3333-444444444444"),
            77,
            OUR_CGROUP,
            f"cgroup shows pod UID {UID}",
        ),
        (PodIdentity("serving", "ghost", UID), 77, OUR_CGROUP, "lists no pod serving/ghost"),
        (PodIdentity("serving", "web", UID), 77, OUR_CGROUP, "allocated no nvidia.com/gpu"),
    ],
    ids=["no-uid", "no-pid", "process-gone", "not-in-a-pod", "uid-mismatch", "unknown-pod", "no-gpu"],
)
def test_kubelet_check_refusals(tmp_path, pod, pid, cgroup, reason):
    with pytest.raises(LeaseRefused, match=reason):
        check(tmp_path, pod, pid, cgroup)


def test_a_pod_claiming_another_pods_name_is_refused(tmp_path):
    # Our UID (the cgroup proves it) but the name of the pod that holds GPU_B.
    with pytest.raises(LeaseRefused, match=f"runs no pod jobs/batch-7 with UID {UID}"):
        check(tmp_path, PodIdentity("jobs", "batch-7", UID))


def test_without_the_pod_log_directory_every_lease_is_refused_saying_what_to_mount(tmp_path):
    with pytest.raises(LeaseRefused, match="hostPath /var/log/pods"):
        check(tmp_path, PodIdentity("serving", "llm-0", UID), logs=tmp_path / "absent")


def test_without_a_pod_check_any_gpu_goes():
    assert asyncio.run(AnyPod().allowed_gpus(PodIdentity(), None)) is None
