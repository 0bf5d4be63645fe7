"""The agent's NVML GPUs against pynvml simulated at its boundary: MIG refusal and the power-limit knob."""

import asyncio

import pynvml
import pytest

from agent.gpus import NotSupportedError, PermissionDeniedError
from agent.node.authorize import AnyPod
from agent.node.gpu_backends import NvmlGpu, PowerLimitOutOfRange, open_nvml_gpus
from agent.node.server import AgentStartError, NodeAgent
from tests.unit.node_harness import leased, socket_path
from tests.unit.test_gpus_nvml import UUID, FakeNvml


class NodeFakeNvml(FakeNvml):
    """One A100 with the calls only the node agent makes: count, name, MIG mode, power limits."""

    def __init__(self) -> None:
        super().__init__()
        self.mig_mode: tuple[int, int] | None = (0, 0)  # None: MIG not supported (pre-Ampere)
        self.power_limit_mw = 400_000
        self.power_sets: list[int] = []

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return 1

    def nvmlDeviceGetName(self, handle: object) -> str:
        self._enter("nvmlDeviceGetName", handle)
        return "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMigMode(self, handle: object) -> list[int]:
        self._enter("nvmlDeviceGetMigMode", handle)
        if self.mig_mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return list(self.mig_mode)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: object) -> list[int]:
        self._enter("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        return [100_000, 400_000]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: object) -> int:
        self._enter("nvmlDeviceGetPowerManagementDefaultLimit", handle)
        return 400_000

    def nvmlDeviceSetPowerManagementLimit(self, handle: object, limit_mw: int) -> None:
        self._enter("nvmlDeviceSetPowerManagementLimit", handle)
        self.power_sets.append(limit_mw)
        self.power_limit_mw = limit_mw


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> NodeFakeNvml:
    fake = NodeFakeNvml()
    fake.install(monkeypatch)
    return fake


def test_open_reads_identity_clocks_and_mig_mode(nvml):
    async def scenario():
        (gpu,) = await open_nvml_gpus()
        clocks = await gpu.actuator.supported_clocks_mhz()
        await gpu.close()
        return gpu, clocks

    gpu, clocks = asyncio.run(scenario())
    assert (gpu.uuid, gpu.product, gpu.mig) == (UUID, "NVIDIA A100-SXM4-80GB", False)
    assert clocks[0] == 1410
    assert nvml.locks == [] and nvml.resets == 0  # opening touches nothing


@pytest.mark.parametrize(("mode", "mig"), [((1, 1), True), ((0, 1), False), (None, False)])
def test_mig_mode_is_the_current_one(nvml, mode, mig):
    nvml.mig_mode = mode

    async def scenario():
        gpu = await NvmlGpu.open(0)
        await gpu.close()
        return gpu.mig

    assert asyncio.run(scenario()) is mig


def test_power_limit_is_bounded_by_the_constraints_and_resets_to_the_default(nvml):
    async def scenario():
        gpu = await NvmlGpu.open(0)
        try:
            await gpu.set_power_limit_w(250)
            with pytest.raises(PowerLimitOutOfRange, match="100-400 W"):
                await gpu.set_power_limit_w(450)
            set_mw = nvml.power_limit_mw
            await gpu.reset_power_limit()
        finally:
            await gpu.close()
        return set_mw

    assert asyncio.run(scenario()) == 250_000
    assert nvml.power_sets == [250_000, 400_000]


def test_power_limit_needs_the_privilege(nvml):
    nvml.fail["nvmlDeviceSetPowerManagementLimit"] = pynvml.NVML_ERROR_NO_PERMISSION

    async def scenario():
        gpu = await NvmlGpu.open(0)
        try:
            await gpu.set_power_limit_w(250)
        finally:
            await gpu.close()

    with pytest.raises(PermissionDeniedError):
        asyncio.run(scenario())


def test_a_gpu_without_power_management_has_nothing_to_reset(nvml):
    nvml.fail["nvmlDeviceGetPowerManagementDefaultLimit"] = pynvml.NVML_ERROR_NOT_SUPPORTED

    async def scenario():
        gpu = await NvmlGpu.open(0)
        try:
            await gpu.reset_power_limit()  # no error: no limit can have been set
            with pytest.raises(NotSupportedError):
                nvml.fail["nvmlDeviceGetPowerManagementLimitConstraints"] = pynvml.NVML_ERROR_NOT_SUPPORTED
                await gpu.set_power_limit_w(250)
        finally:
            await gpu.close()

    asyncio.run(scenario())


def agent_over_nvml(scenario_body):
    async def scenario():
        gpus = await open_nvml_gpus()
        agent = NodeAgent(gpus, AnyPod(), lease_ttl_s=0.3, idle_timeout_s=5.0, max_connections=4)
        path = socket_path()
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(agent.run(path, None, ready.set_result))
        await asyncio.wait_for(ready, 5)
        try:
            return await scenario_body(path)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_the_agent_refuses_clock_changes_on_a_mig_gpu(nvml):
    nvml.mig_mode = (1, 1)

    async def body(path):
        client, reply = await leased(path)
        answer = await client.ask({"op": "set_clock", "mhz": 1050})
        client.close()
        return reply, answer

    reply, answer = agent_over_nvml(body)
    assert reply["gpus"][0]["mig"] is True
    assert answer["kind"] == "not_supported" and "MIG mode" in answer["error"]
    assert nvml.locks == []


def test_the_agent_resets_clocks_and_power_at_start_on_lapse_and_sets_power_on_request(nvml):
    async def body(path):
        resets_at_start, powers_at_start = nvml.resets, list(nvml.power_sets)
        client, _ = await leased(path)
        assert (await client.ask({"op": "set_clock", "mhz": 1050}))["ok"]
        out_of_range = await client.ask({"op": "set_power_limit", "watts": 50})
        assert nvml.locked is None  # a failed setter sends the lease's GPUs back to stock
        assert (await client.ask({"op": "set_clock", "mhz": 1050}))["ok"]
        assert (await client.ask({"op": "set_power_limit", "watts": 300}))["ok"]
        locked, limit = nvml.locked, nvml.power_limit_mw
        client.writer.transport.abort()
        for _ in range(100):
            if nvml.locked is None and nvml.power_limit_mw == 400_000:
                break
            await asyncio.sleep(0.01)
        return resets_at_start, powers_at_start, out_of_range, locked, limit

    resets_at_start, powers_at_start, out_of_range, locked, limit = agent_over_nvml(body)
    assert resets_at_start == 1 and powers_at_start == [400_000]
    assert out_of_range["kind"] == "bad_request" and "100-400 W" in out_of_range["error"]
    assert locked == (1050, 1050) and limit == 300_000
    assert nvml.locked is None and nvml.power_limit_mw == 400_000


def test_an_agent_that_may_not_reset_gpus_refuses_to_start(nvml):
    nvml.fail["nvmlDeviceResetGpuLockedClocks"] = pynvml.NVML_ERROR_NO_PERMISSION

    async def scenario():
        agent = NodeAgent(
            await open_nvml_gpus(), AnyPod(), lease_ttl_s=0.3, idle_timeout_s=5.0, max_connections=4
        )
        path = socket_path()
        try:
            await agent.run(path, None, lambda event: None)
        finally:
            assert not path.exists()  # it never served

    with pytest.raises(AgentStartError, match=r"cannot reset GPUs.*CAP_SYS_ADMIN"):
        asyncio.run(asyncio.wait_for(scenario(), 10))
