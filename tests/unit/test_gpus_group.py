"""A TP-N engine steered on all N GPUs: one clock, concurrent calls, all back to stock on any error."""

import asyncio
import threading

import pynvml
import pytest

from agent.gpus import (
    ActuatorGroup,
    DryRunActuator,
    MeterGroup,
    PermissionDeniedError,
    UnsupportedClockError,
    open_engine_actuator,
    open_engine_meter,
)

UUIDS = tuple(f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4))
CLOCKS = tuple(range(1410, 209, -15))


class FakeNode:
    """Four A100s as pynvml shows them; a lock on one GPU waits until every GPU's lock is in flight."""

    def __init__(self, gpus: int = 4, together: int = 0) -> None:
        self.uuids = UUIDS[:gpus]
        self.locked: dict[str, int | None] = dict.fromkeys(self.uuids)
        self.energy_mj = dict.fromkeys(self.uuids, 1_000_000)
        self.fail: dict[tuple[str, str], int] = {}  # (function, uuid) -> NVML error code
        self.barrier = threading.Barrier(together, timeout=5.0) if together else None
        self.inits = self.shutdowns = 0
        self.clocks: dict[str, tuple[int, ...]] = dict.fromkeys(self.uuids, CLOCKS)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _check(self, name: str, uuid: str) -> None:
        if (name, uuid) in self.fail:
            raise pynvml.NVMLError(self.fail[(name, uuid)])

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid not in self.uuids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        self._check("nvmlDeviceGetHandleByUUID", uuid)
        return uuid  # the handle is the UUID

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return handle

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: str) -> list[int]:
        return [1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: str, mem_mhz: int) -> list[int]:
        return list(self.clocks[handle])

    def nvmlDeviceSetGpuLockedClocks(self, handle: str, lo: int, hi: int) -> None:
        if self.barrier is not None:
            self.barrier.wait()  # breaks (and fails the lock) unless every GPU's call runs at once
        self._check("nvmlDeviceSetGpuLockedClocks", handle)
        self.locked[handle] = hi

    def nvmlDeviceResetGpuLockedClocks(self, handle: str) -> None:
        self._check("nvmlDeviceResetGpuLockedClocks", handle)
        self.locked[handle] = None

    def nvmlDeviceGetClockInfo(self, handle: str, clock_type: int) -> int:
        return self.locked[handle] or 1410

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self.energy_mj[handle] += 1000
        return self.energy_mj[handle]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 100_000


def run(coro):
    return asyncio.run(coro)


def test_every_gpu_is_locked_to_one_clock_with_the_calls_in_flight_together(monkeypatch):
    node = FakeNode(together=4)
    node.install(monkeypatch)

    async def scenario():
        group = await open_engine_actuator("nvml", uuids=UUIDS)
        await group.set_clock_mhz(1050)
        locked = dict(node.locked)
        clock = await group.clock_mhz()
        node.barrier = None
        await group.close()
        return group, locked, clock

    group, locked, clock = run(scenario())
    assert isinstance(group, ActuatorGroup) and group.actuates
    assert locked == dict.fromkeys(UUIDS, 1050) and clock == 1050
    assert node.locked == dict.fromkeys(UUIDS), "close resets every GPU it locked"
    assert group.name == ",".join(f"nvml:{u}" for u in UUIDS)


def test_one_gpu_refusing_a_lock_sends_every_gpu_back_to_stock(monkeypatch):
    node = FakeNode()
    node.fail[("nvmlDeviceSetGpuLockedClocks", UUIDS[2])] = pynvml.NVML_ERROR_NO_PERMISSION
    node.install(monkeypatch)

    async def scenario():
        group = await open_engine_actuator("nvml", uuids=UUIDS)
        try:
            with pytest.raises(PermissionDeniedError, match=UUIDS[2]):
                await group.set_clock_mhz(900)
            return dict(node.locked)
        finally:
            await group.close()

    assert run(scenario()) == dict.fromkeys(UUIDS), "no GPU may stay at 900 MHz beside one at stock"


def test_reset_reaches_every_gpu_even_when_one_fails_and_then_raises(monkeypatch):
    node = FakeNode()
    node.install(monkeypatch)

    async def scenario():
        group = await open_engine_actuator("nvml", uuids=UUIDS)
        await group.set_clock_mhz(1200)
        node.fail[("nvmlDeviceResetGpuLockedClocks", UUIDS[0])] = pynvml.NVML_ERROR_NO_PERMISSION
        with pytest.raises(PermissionDeniedError):
            await group.reset()
        after = dict(node.locked)
        del node.fail[("nvmlDeviceResetGpuLockedClocks", UUIDS[0])]
        await group.close()
        return after

    after = run(scenario())
    assert after[UUIDS[0]] == 1200
    assert all(after[u] is None for u in UUIDS[1:])


def test_the_group_offers_only_clocks_every_gpu_supports(monkeypatch):
    node = FakeNode(gpus=2)
    node.clocks[UUIDS[1]] = tuple(c for c in CLOCKS if c <= 1395)
    node.install(monkeypatch)

    async def scenario():
        group = await open_engine_actuator("nvml", uuids=UUIDS[:2])
        try:
            clocks = await group.supported_clocks_mhz()
            with pytest.raises(UnsupportedClockError):
                await group.set_clock_mhz(1410)
            return clocks
        finally:
            await group.close()

    clocks = run(scenario())
    assert clocks[0] == 1395 and 1410 not in clocks
    assert node.locked == dict.fromkeys(UUIDS[:2])


def test_a_gpu_that_cannot_be_opened_closes_the_others(monkeypatch):
    node = FakeNode()
    node.install(monkeypatch)
    missing = "GPU-99999999-aaaa-bbbb-cccc-dddddddddddd"
    with pytest.raises(Exception, match="99999999"):
        run(open_engine_actuator("nvml", uuids=(*UUIDS[:3], missing)))
    assert node.inits == 4 and node.shutdowns == 4, "every NVML session opened was shut down"


def test_energy_and_power_are_summed_over_the_engines_gpus(monkeypatch):
    node = FakeNode()
    node.install(monkeypatch)

    async def scenario():
        meter = await open_engine_meter("nvml", uuids=UUIDS)
        first, power = await meter.energy_j(), await meter.power_w()
        second = await meter.energy_j()
        await meter.close()
        return meter, first, power, second

    meter, first, power, second = run(scenario())
    assert isinstance(meter, MeterGroup)
    assert first == pytest.approx(4 * 1.0) and second == pytest.approx(4 * 2.0)  # 1 J per read per GPU
    assert power == pytest.approx(400.0)


def test_dry_run_observes_every_gpu_and_locks_none(monkeypatch):
    node = FakeNode()
    node.install(monkeypatch)

    async def scenario():
        act = await open_engine_actuator("dryrun", uuids=UUIDS)
        await act.set_clock_mhz(900)
        clocks = await act.supported_clocks_mhz()
        await act.close()
        return act, clocks

    act, clocks = run(scenario())
    assert isinstance(act, DryRunActuator) and not act.actuates and act.last_decision_mhz == 900
    assert clocks == CLOCKS and node.locked == dict.fromkeys(UUIDS)


def test_a_group_needs_two_gpus_and_a_common_clock():
    dry = DryRunActuator(CLOCKS, "a")
    with pytest.raises(ValueError, match="at least two"):
        ActuatorGroup([dry], CLOCKS)
    with pytest.raises(ValueError, match="share no supported"):
        ActuatorGroup([dry, DryRunActuator((600,), "b")], ())
    with pytest.raises(ValueError, match="at least two"):
        MeterGroup([])


def test_the_control_loop_steers_and_fails_safe_on_every_gpu_of_the_engine():
    from agent.engines.base import EngineUnavailableError
    from agent.gpus import TransientGpuError
    from agent.sidecar.watchdog import LoopMode
    from tests.unit.sidecar_fakes import FakeActuator, ScriptedPolicy, rig, stats

    async def scenario():
        r = rig(ScriptedPolicy([1050, 900, 900]), stale_after_s=2.0)
        gpus = [FakeActuator(), FakeActuator()]
        r.loop.actuator = await ActuatorGroup.of(gpus)
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        assert [g.calls[-1] for g in gpus] == [("set", 1050), ("set", 1050)]
        gpus[1].fail.append(TransientGpuError("busy"))  # one GPU refuses the next lock
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert [g.calls[-1] for g in gpus] == [("reset", None), ("reset", None)], "both back to stock"
        r.adapter.queue.append(stats(3))
        await r.loop.tick()
        assert [g.calls[-1] for g in gpus] == [("set", 900), ("set", 900)]
        r.adapter.queue.append(EngineUnavailableError("connection refused"))
        r.clock.now += 2.5
        await r.loop.tick()
        assert r.loop.mode is LoopMode.STALE
        assert [g.calls[-1] for g in gpus] == [("reset", None), ("reset", None)]
        await r.loop.shutdown()
        assert all(g.closed for g in gpus)

    run(scenario())
