"""The Kubernetes backend through kubernetes-asyncio against a stand-in API server that validates every
object against the official schemas: scale up and back, API errors, a restart mid-switch, a shadow that
never becomes ready."""

import asyncio
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from agent.control.scaling import ScalingConfig
from agent.coordinator.kubernetes import SIZE_LABEL, KubernetesBackend
from agent.coordinator.service import Coordinator
from tests.unit.k8s_apiserver import ApiServer

NAMESPACE = "llm"
SCALING = ScalingConfig(((1, 2.0), (2, 5.0)), headroom=0.8, grace_s=20.0, shadow_timeout_s=40.0)
PERIOD = 10.0


class Sidecars:
    """Every pod's sidecar /metrics (one page: the test sets the figures)."""

    def __init__(self) -> None:
        self.arrived = 0.0
        self.in_flight = 0

    async def metrics(self, _: web.Request) -> web.Response:
        page = (
            "# TYPE throttllem_requests_arrived_total counter\n"
            f"throttllem_requests_arrived_total {self.arrived}\n"
            "# TYPE throttllem_requests_held gauge\nthrottllem_requests_held 0\n"
            f"# TYPE throttllem_requests_in_flight gauge\nthrottllem_requests_in_flight {self.in_flight}\n"
        )
        return web.Response(text=page)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


@asynccontextmanager
async def cluster(replicas: dict[int, int], routed: int, ready_after: int = 2):
    sidecars = Sidecars()
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", sidecars.metrics)
    metrics_runner, metrics_port = await serve(metrics_app)
    api = ApiServer(NAMESPACE, replicas, routed, "127.0.0.1", ready_after)
    api_runner, api_port = await serve(api.app())
    config = client.Configuration(host=f"http://127.0.0.1:{api_port}")
    async with client.ApiClient(config) as api_client:
        backend = KubernetesBackend(api_client, NAMESPACE, sorted(replicas), sidecar_port=metrics_port)
        try:
            yield api, backend, sidecars
        finally:
            await backend.close()
            await api_runner.cleanup()
            await metrics_runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def drive(coordinator, sidecars, clock, rates):
    for rate in rates:
        sidecars.arrived += rate * PERIOD
        clock.now += PERIOD
        await coordinator.tick()


def replicas(api):
    return {name: obj["spec"]["replicas"] for name, obj in api.deployments.items()}


def routed(api):
    return api.services["triton"]["spec"]["selector"][SIZE_LABEL]


def test_a_burst_scales_tp2_up_moves_the_service_then_scales_tp1_to_zero():
    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1) as (api, backend, sidecars):
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
            await coordinator.start()
            await drive(coordinator, sidecars, clock, [1.0, 4.0])
            assert replicas(api) == {"triton-tp1": 1, "triton-tp2": 1} and routed(api) == "1"
            await drive(coordinator, sidecars, clock, [4.0, 4.0])  # tp2 ready after two status reads
            assert routed(api) == "2"
            assert replicas(api) == {"triton-tp1": 0, "triton-tp2": 1}, (
                "tp1 drained (0 in flight) and stopped"
            )
            assert api.services["triton"]["spec"]["selector"]["app"] == "triton", (
                "the rest of the selector kept"
            )
            return api

    api = asyncio.run(scenario())
    assert api.validated > 10, "every object stored was checked against the schemas"
    assert api.content_types <= {"application/merge-patch+json", "application/strategic-merge-patch+json"}


def test_api_errors_are_retried_and_the_serving_engine_keeps_serving():
    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1, ready_after=1) as (api, backend, sidecars):
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
            await coordinator.start()
            api.fail[("PATCH", "deployments/scale")] = 409
            await drive(coordinator, sidecars, clock, [1.0, 4.0])
            assert replicas(api)["triton-tp2"] == 0 and coordinator.record.failures == 1
            api.fail[("PATCH", "services")] = 500
            await drive(coordinator, sidecars, clock, [4.0])  # the start is retried; tp2 is ready at once
            assert replicas(api)["triton-tp2"] == 1 and routed(api) == "1", "the move failed: tp1 serves on"
            await drive(coordinator, sidecars, clock, [4.0])
            assert routed(api) == "2" and coordinator.record.failures == 2

    asyncio.run(scenario())


def test_a_coordinator_restarted_mid_switch_reads_the_cluster_and_finishes_it():
    async def scenario():
        async with cluster({1: 1, 2: 1}, routed=2) as (api, backend, sidecars):
            sidecars.in_flight = 3
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
            await coordinator.start()
            assert coordinator.state.size == 2 and list(coordinator.draining) == [1]
            await drive(coordinator, sidecars, clock, [4.0])
            assert replicas(api)["triton-tp1"] == 1, "still draining its three requests"
            sidecars.in_flight = 0
            await drive(coordinator, sidecars, clock, [4.0])
            assert replicas(api) == {"triton-tp1": 0, "triton-tp2": 1} and routed(api) == "2"

    asyncio.run(scenario())


def test_a_shadow_that_never_becomes_ready_is_scaled_back_to_zero():
    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1, ready_after=10_000) as (api, backend, sidecars):
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, clock=clock)
            await coordinator.start()
            await drive(coordinator, sidecars, clock, [1.0] + [4.0] * 5)  # started at 20 s, abandoned at 60 s
            assert replicas(api) == {"triton-tp1": 1, "triton-tp2": 0} and routed(api) == "1"
            assert "not ready after 40 s" in coordinator.record.last_reason

    asyncio.run(scenario())


def test_the_stand_in_refuses_what_the_real_api_server_would():
    api = ApiServer(NAMESPACE, {1: 1}, 1, "127.0.0.1")
    bad = api.deployments["triton-tp1"] | {
        "spec": {**api.deployments["triton-tp1"]["spec"], "replicas": "one"}
    }
    with pytest.raises(Exception, match="'one' is not of type"):
        api._validate(bad)
