"""The Kubernetes backend through kubernetes-asyncio against a stand-in API server that validates every
object against the official schemas: scale up and back, API errors, a restart mid-switch, a shadow that
never becomes ready."""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from agent.control.scaling import ScalingConfig
from agent.coordinator.kubernetes import KubernetesBackend
from agent.coordinator.names import DEFAULT_SERVICE, SIZE_LABEL
from agent.coordinator.service import Coordinator
from tests.unit.k8s_apiserver import ApiServer

NAMESPACE = "llm"
SCALING = ScalingConfig(((1, 2.0), (2, 5.0)), headroom=0.8, grace_s=20.0, shadow_timeout_s=40.0)
SCALING4 = ScalingConfig(((1, 2.0), (2, 5.0), (4, 12.0)), headroom=0.8, grace_s=20.0, shadow_timeout_s=40.0)
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
    return api.services[DEFAULT_SERVICE]["spec"]["selector"][SIZE_LABEL]


def test_a_burst_scales_tp2_up_moves_the_service_then_scales_tp1_to_zero():
    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1) as (api, backend, sidecars):
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
            await coordinator.start()
            await drive(coordinator, sidecars, clock, [1.0, 4.0])
            assert (
                replicas(api) == {"triton-throttllem-tp1": 1, "triton-throttllem-tp2": 1}
                and routed(api) == "1"
            )
            await drive(coordinator, sidecars, clock, [4.0, 4.0])  # tp2 ready after two status reads
            assert routed(api) == "2"
            assert replicas(api) == {"triton-throttllem-tp1": 0, "triton-throttllem-tp2": 1}, (
                "tp1 drained (0 in flight) and stopped"
            )
            assert (
                api.services[DEFAULT_SERVICE]["spec"]["selector"]["app.kubernetes.io/name"]
                == "triton-throttllem"
            ), "the rest of the selector kept"
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
            assert replicas(api)["triton-throttllem-tp2"] == 0 and coordinator.record.failures == 1
            api.fail[("PATCH", "services")] = 500
            await drive(coordinator, sidecars, clock, [4.0])  # the start is retried; tp2 is ready at once
            assert replicas(api)["triton-throttllem-tp2"] == 1 and routed(api) == "1", (
                "the move failed: tp1 serves on"
            )
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
            assert replicas(api)["triton-throttllem-tp1"] == 1, "still draining its three requests"
            sidecars.in_flight = 0
            await drive(coordinator, sidecars, clock, [4.0])
            assert (
                replicas(api) == {"triton-throttllem-tp1": 0, "triton-throttllem-tp2": 1}
                and routed(api) == "2"
            )

    asyncio.run(scenario())


def test_a_shadow_that_never_becomes_ready_is_scaled_back_to_zero():
    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1, ready_after=10_000) as (api, backend, sidecars):
            clock = Clock()
            coordinator = Coordinator(backend, SCALING, initial_size=1, clock=clock)
            await coordinator.start()
            await drive(coordinator, sidecars, clock, [1.0] + [4.0] * 5)  # started at 20 s, abandoned at 60 s
            assert (
                replicas(api) == {"triton-throttllem-tp1": 1, "triton-throttllem-tp2": 0}
                and routed(api) == "1"
            )
            assert "not ready after 40 s" in coordinator.record.last_reason

    asyncio.run(scenario())


def test_the_stand_in_refuses_what_the_real_api_server_would():
    api = ApiServer(NAMESPACE, {1: 1}, 1, "127.0.0.1")
    bad = api.deployments["triton-throttllem-tp1"] | {
        "spec": {**api.deployments["triton-throttllem-tp1"]["spec"], "replicas": "one"}
    }
    with pytest.raises(Exception, match="'one' is not of type"):
        api._validate(bad)


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_one_candidate_holds_the_lease_and_another_takes_it_only_once_it_lapses():
    from agent.coordinator.lease import LeaseElector

    async def scenario():
        async with cluster({1: 1}, routed=1) as (api, backend, _):
            wall = WallClock()
            api_client = backend.apps.api_client
            a = LeaseElector(api_client, NAMESPACE, "coordinator-a", lease_s=30, clock=wall)
            b = LeaseElector(api_client, NAMESPACE, "coordinator-b", lease_s=30, clock=wall)
            assert await a.hold() and not await b.hold()
            wall.now += 20
            assert await a.hold() and not await b.hold(), "renewed: b still waits"
            wall.now += 31  # a stops renewing (killed) and the lease lapses
            assert await b.hold() and not await a.hold()
            lease = api.leases["throttllem-coordinator"]
            return lease

    lease = asyncio.run(scenario())
    assert lease["spec"]["holderIdentity"] == "coordinator-b" and lease["spec"]["leaseTransitions"] == 1


def test_two_candidates_racing_for_a_lapsed_lease_get_one_leader():
    from agent.coordinator.lease import LeaseElector

    async def scenario():
        async with cluster({1: 1}, routed=1) as (_, backend, _sidecars):
            wall = WallClock()
            api_client = backend.apps.api_client
            old = LeaseElector(api_client, NAMESPACE, "old", lease_s=5, clock=wall)
            assert await old.hold()
            wall.now += 10
            a = LeaseElector(api_client, NAMESPACE, "a", lease_s=5, clock=wall)
            b = LeaseElector(api_client, NAMESPACE, "b", lease_s=5, clock=wall)
            return await asyncio.gather(a.hold(), b.hold())

    assert sorted(asyncio.run(scenario())) == [False, True]


class Beat:
    """`lead`'s sleep, driven by the test: one call of `period()` lets one period run."""

    def __init__(self) -> None:
        self.go, self.done = asyncio.Event(), asyncio.Event()

    async def sleep(self, _: float) -> None:
        self.done.set()
        await self.go.wait()
        self.go.clear()

    async def period(self) -> None:
        self.done.clear()
        self.go.set()
        await self.done.wait()


def test_two_coordinators_never_act_at_once_and_the_second_takes_over_when_the_first_dies():
    from agent.coordinator.lease import LeaseElector
    from agent.coordinator.service import lead

    async def scenario():
        async with cluster({1: 1, 2: 0}, routed=1, ready_after=1) as (api, backend, sidecars):
            wall, clock = WallClock(), Clock()
            api_client = backend.apps.api_client
            names = ("a", "b")
            electors = {n: LeaseElector(api_client, NAMESPACE, n, lease_s=25, clock=wall) for n in names}
            beats = {n: Beat() for n in names}
            tasks = {
                n: asyncio.create_task(
                    lead(
                        Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock),
                        electors[n],
                        PERIOD,
                        beats[n].sleep,
                    )
                )
                for n in names
            }
            for n in names:
                await beats[n].done.wait()
            first = next(n for n in names if electors[n].leader)
            history, dead = [], set()
            for period in range(12):
                if period == 3:
                    tasks[first].cancel()  # the leader dies mid-run, holding the lease
                    dead.add(first)
                sidecars.arrived += (4.0 if period >= 5 else 1.0) * PERIOD
                clock.now += PERIOD
                wall.now += PERIOD
                alive = [n for n in names if n not in dead]
                assert not any(tasks[n].done() for n in alive), "a coordinator's loop died"
                for n in alive:
                    await beats[n].period()
                leaders = [n for n in alive if electors[n].leader]
                assert len(leaders) <= 1, f"period {period}: {leaders} lead together"
                history.append(leaders)
            for task in tasks.values():
                task.cancel()
            return first, history, api

    first, history, api = asyncio.run(scenario())
    (second,) = {"a", "b"} - {first}
    assert history[:3] == [[first]] * 3 and history[-1] == [second], history
    assert [second] not in history[:4], "the other waits for the dead leader's lease to lapse"
    assert api.leases["throttllem-coordinator"]["spec"]["holderIdentity"] == second
    assert routed(api) == "2" and replicas(api)["triton-throttllem-tp1"] == 0, (
        "the new leader carried the resize through"
    )


def rbac_allows(rules, group, resource, verb, name):
    """Kubernetes RBAC's rule match: a rule with resourceNames allows only calls on those names."""
    return any(
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        and ("resourceNames" not in rule or name in rule["resourceNames"])
        for rule in rules
    )


def test_the_shipped_role_grants_exactly_the_calls_the_coordinator_makes():
    import shutil
    import subprocess

    import kubernetes_validate
    import yaml

    from agent.coordinator.lease import LeaseElector
    from agent.coordinator.service import lead

    async def scenario():
        async with cluster({1: 1, 2: 0, 4: 0}, routed=1, ready_after=1) as (api, backend, sidecars):
            clock, wall = Clock(), WallClock()
            coordinator = Coordinator(backend, SCALING4, initial_size=1, min_drain_s=0.0, clock=clock)
            elector = LeaseElector(backend.apps.api_client, NAMESPACE, "a", lease_s=25, clock=wall)
            beat = Beat()
            task = asyncio.create_task(lead(coordinator, elector, PERIOD, beat.sleep))
            await beat.done.wait()
            for rate in (1.0, 4.0, 4.0, 4.0, 4.0, 9.0, 9.0, 9.0, 9.0):
                sidecars.arrived += rate * PERIOD
                clock.now += PERIOD
                wall.now += PERIOD
                await beat.period()
            task.cancel()
            assert routed(api) == "4" and replicas(api)["triton-throttllem-tp1"] == 0
            return api.named_calls

    named_calls = asyncio.run(scenario())
    calls = {call[:3] for call in named_calls}
    manifests = Path(__file__).parents[2] / "deploy" / "k8s" / "coordinator"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        texts = [(manifests / name).read_text() for name in ("rbac.yaml", "deployment.yaml")]
    else:
        argv = [kubectl, "kustomize", str(manifests)]
        texts = [subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout]
    docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert calls == granted, (
        f"missing from the Role: {calls - granted}; granted but unused: {granted - calls}"
    )
    refused = [call for call in named_calls if not rbac_allows(role["rules"], *call)]
    assert refused == [], "the Role's resourceNames refuse these calls"
    named = {name for rule in role["rules"] for name in rule.get("resourceNames", [])}
    touched = {call[3] for call in named_calls}
    assert named <= touched, f"names granted but never used: {named - touched}"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == role["metadata"]["name"]
