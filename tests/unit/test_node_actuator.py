"""NodeAgentActuator (the sidecar's side) against a real node agent on a Unix socket."""

import asyncio
import contextlib

import pytest

from agent.config import ConfigError, load_settings
from agent.gpus import (
    GpuControlError,
    GpuLostError,
    LeaseRefusedError,
    NodeAgentActuator,
    NodeAgentTarget,
    NotSupportedError,
    PermissionDeniedError,
    TransientGpuError,
    UnsupportedClockError,
    build_actuator,
    open_engine_actuator,
)
from agent.gpus.node_agent import PodIdentity, raise_for_reply
from agent.node.authorize import AnyPod
from agent.node.gpu_backends import open_twin_gpus
from agent.node.server import NodeAgent
from tests.unit.node_harness import NamedTwinGpu, RawClient, leased, running_agent, socket_path, twins, until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_open_leases_every_gpu_locks_them_as_one_and_close_releases():
    async def scenario():
        async with running_agent(2) as harness:
            actuator = await open_engine_actuator("node", node_agent=NodeAgentTarget(harness.path))
            clocks = await actuator.supported_clocks_mhz()
            await actuator.set_clock_mhz(900)
            locked = [fake.locked for fake in harness.fakes]
            clock = await actuator.clock_mhz()
            await actuator.set_clock_mhz(900)  # a repeat is not sent
            await actuator.reset()
            await actuator.set_clock_mhz(600)
            await actuator.close()
            after_close = [fake.locked for fake in harness.fakes]
            other, reply = await leased(harness.path)  # freed for the next holder
            other.close()
            return actuator, clocks, locked, clock, after_close, reply, harness

    actuator, clocks, locked, clock, after_close, reply, harness = run(scenario())
    assert actuator.name == "node:GPU-0000-0000,GPU-0001-0000" and actuator.actuates
    assert clocks[0] == 1410 and clocks[-1] == 210
    assert locked == [900, 900] and clock == 900
    assert after_close == [None, None] and reply["ok"]
    posts = [r for r in harness.fakes[0].requests if r[0] == "POST"]
    assert [body["min_mhz"] for _, body in posts] == [900, 600]


def test_a_clock_the_gpus_do_not_list_is_refused_before_asking():
    async def scenario():
        async with running_agent(1) as harness:
            actuator = await build_actuator(
                "node", uuid="GPU-0000-0000", node_agent=NodeAgentTarget(harness.path)
            )
            assert actuator.name == "node:GPU-0000-0000"
            try:
                await actuator.set_clock_mhz(1051)
            finally:
                await actuator.close()

    with pytest.raises(UnsupportedClockError, match="nearest supported: 1050 MHz"):
        run(scenario())


def test_a_gpu_leased_to_another_is_a_lease_refusal():
    async def scenario():
        async with running_agent(1) as harness:
            holder, _ = await leased(harness.path)
            try:
                await NodeAgentActuator.open(NodeAgentTarget(harness.path, PodIdentity("ns", "second")))
            finally:
                holder.close()

    with pytest.raises(LeaseRefusedError, match="is leased to pid") as caught:
        run(scenario())
    assert isinstance(caught.value, PermissionDeniedError)  # the loop falls back to observing


def test_an_absent_agent_is_transient_and_names_the_socket():
    path = socket_path()

    async def scenario():
        await NodeAgentActuator.open(NodeAgentTarget(path, timeout_s=0.5))

    with pytest.raises(TransientGpuError, match=f"{path}.*THROTTLLEM_NODE_SOCKET"):
        run(scenario())


def test_heartbeats_hold_the_lease_past_the_ttl():
    async def scenario():
        async with running_agent(1, ttl_s=0.3) as harness:
            actuator = await NodeAgentActuator.open(NodeAgentTarget(harness.path))
            await actuator.set_clock_mhz(600)
            await asyncio.sleep(1.2)  # four TTLs with no call from the loop
            locked = harness.fakes[0].locked
            await actuator.close()
            return locked

    assert run(scenario()) == 600


@contextlib.asynccontextmanager
async def agent_on(urls, path, ttl_s=0.3):
    agent = NodeAgent(
        await open_twin_gpus(urls), AnyPod(), lease_ttl_s=ttl_s, idle_timeout_s=5, max_connections=4
    )
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(agent.run(path, None, ready.set_result))
    await asyncio.wait_for(ready, 5)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_after_an_agent_restart_the_actuator_reacquires_and_restores_its_lock():
    async def scenario():
        async with twins(1) as ((fake,), urls):
            path = socket_path()
            async with agent_on(urls, path):
                actuator = await NodeAgentActuator.open(NodeAgentTarget(path))
                await actuator.set_clock_mhz(600)
            assert fake.locked is None  # the agent reset its lease on exit
            async with agent_on(urls, path):
                waited = await until(lambda: fake.locked == 600, timeout_s=3)
                status = await (await RawClient.connect(path)).ask({"op": "status"})
                await actuator.close()
                return waited, status, fake.locked

    waited, status, locked = run(scenario())
    assert waited < 1.0  # within a heartbeat or two of the restart
    assert len(status["leases"]) == 1
    assert locked is None


def test_close_during_a_heartbeat_reconnect_releases_before_it_returns():
    """Closing while the heartbeat is restoring the lock used to cut the reconnect off unreleased."""

    async def scenario():
        async with twins(1) as ((fake,), urls):
            path = socket_path()
            async with agent_on(urls, path, ttl_s=1.0):
                actuator = await NodeAgentActuator.open(NodeAgentTarget(path))
                await actuator.set_clock_mhz(600)
            fake.lock_reply_delay_s = 0.3  # the restore's set_clock is in flight when close() comes
            async with agent_on(urls, path, ttl_s=1.0):  # the delay stays inside the lease's TTL
                await until(lambda: fake.locked == 600, timeout_s=3)
                await actuator.close()
                return fake.locked

    assert run(scenario()) is None


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("refused", LeaseRefusedError),
        ("not_supported", NotSupportedError),
        ("transient", TransientGpuError),
        ("gpu_lost", GpuLostError),
        ("gpu_error", GpuControlError),
        ("bad_request", GpuControlError),
        ("unsupported_clock", UnsupportedClockError),
    ],
)
def test_agent_error_kinds_map_onto_the_gpu_error_tree(kind, error):
    with pytest.raises(error, match="node agent refused set_clock: because"):
        raise_for_reply({"ok": False, "kind": kind, "error": "because"}, "set_clock")


def test_sidecar_settings_for_the_node_actuator(monkeypatch):
    for name in ("ACTUATOR", "NODE_SOCKET", "POD_NAMESPACE", "POD_NAME", "POD_UID"):
        monkeypatch.delenv(f"THROTTLLEM_{name}", raising=False)
    monkeypatch.setenv("THROTTLLEM_ACTUATOR", "node")
    monkeypatch.setenv("THROTTLLEM_POD_NAME", "llm-0")
    settings = load_settings()
    assert str(settings.node_socket) == "/run/throttllem/node.sock" and settings.pod_name == "llm-0"
    monkeypatch.setenv("THROTTLLEM_POD_UID", "llm-0")
    with pytest.raises(ConfigError, match=r"THROTTLLEM_POD_UID='llm-0': must be a pod UID"):
        load_settings()
    monkeypatch.delenv("THROTTLLEM_POD_UID")
    monkeypatch.setenv("THROTTLLEM_GPU_INDEX", "0")
    with pytest.raises(ConfigError, match="THROTTLLEM_GPU_INDEX=0: the node actuator selects GPUs by UUID"):
        load_settings(sidecar=True)


class SlowTwinGpu(NamedTwinGpu):
    """Takes its time to lock: a request the caller's deadline cancels midway."""

    async def post(self, request):
        await asyncio.sleep(0.3)
        return await super().post(request)


def test_a_call_cancelled_by_a_deadline_does_not_leave_its_reply_for_the_next(monkeypatch):
    monkeypatch.setattr("tests.unit.node_harness.NamedTwinGpu", SlowTwinGpu)

    async def scenario():
        async with running_agent(1) as harness:
            actuator = await NodeAgentActuator.open(NodeAgentTarget(harness.path))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(actuator.set_clock_mhz(600), 0.05)
            clock = await actuator.clock_mhz()  # answered by the agent, not by set_clock's late "ok"
            await actuator.close()
            return clock

    assert run(scenario()) == 1410
