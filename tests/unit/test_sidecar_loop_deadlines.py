"""Deadlines in the control loop: stock clocks are requested within `stale + poll` of the last
fresh telemetry whatever hangs (the engine's metrics endpoint, the GPU's set or reset), on real
time with small bounds, a real engine stand-in on loopback and the real trtllm-serve adapter."""

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.engines.trtllm_serve import TrtllmServeAdapter
from agent.gpus import TransientGpuError
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.loop import ControlLoop, LoopConfig
from agent.sidecar.tracker import RequestTracker
from agent.sidecar.watchdog import LoopMode, TelemetryTimes, call_timeout_s, stock_deadline_s
from tests.unit.sidecar_fakes import GPU, Builder, FakeActuator, FakeTrtllmServe, ScriptedPolicy

STALE_S = 0.3
POLL_S = 0.05
BOUND_S = STALE_S + POLL_S  # stock must be requested this soon after the last fresh telemetry


class HangingEngine(FakeTrtllmServe):
    """trtllm-serve's /metrics that, once `hang` is set, accepts requests and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = asyncio.Event()
        self.answered_at: float | None = None  # loop time of the last answer

    async def metrics(self, request: web.Request) -> web.Response:
        if self.hang.is_set():
            await asyncio.Event().wait()
        response = await super().metrics(request)
        self.answered_at = asyncio.get_running_loop().time()
        return response


class HangingActuator(FakeActuator):
    """Records when each call began; a set to a clock in `hang_set`, or any reset once
    `hang_reset` is on, never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.hang_set: set[int] = set()
        self.hang_reset = False
        self.started: list[tuple[str, int | None, float]] = []

    async def set_clock_mhz(self, mhz: int) -> None:
        self.started.append(("set", mhz, asyncio.get_running_loop().time()))
        if mhz in self.hang_set:
            await asyncio.Event().wait()
        await super().set_clock_mhz(mhz)

    async def reset(self) -> None:
        self.started.append(("reset", None, asyncio.get_running_loop().time()))
        if self.hang_reset:
            await asyncio.Event().wait()
        await super().reset()

    def resets_after(self, since: float) -> list[float]:
        return [at for kind, _, at in self.started if kind == "reset" and at > since]


async def running_loop(engine: HangingEngine, actuator: HangingActuator, clocks: list[int | None]):
    """A control loop polling `engine` over loopback, started and running; yields it."""
    app = web.Application()
    app.router.add_get("/metrics", engine.metrics)
    server = TestServer(app)
    await server.start_server()
    adapter = TrtllmServeAdapter(str(server.make_url("/metrics")))  # its own timeout: 1 s > the bound
    loop = ControlLoop(
        adapter=adapter,
        actuator=actuator,
        tracker=RequestTracker(MaxTokensPredictor()),
        gpu=GPU,
        policy_spec="scripted",
        build_policy=Builder(ScriptedPolicy(clocks)),
        config=LoopConfig(poll_interval_s=POLL_S, stale_after_s=STALE_S),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    return loop, task, adapter, server


async def stop(task: asyncio.Task, adapter: TrtllmServeAdapter, server: TestServer) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await adapter.close()
    await server.close()


async def until(condition, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_engine_that_stops_answering_gets_stock_clocks_within_the_bound(caplog):
    async def scenario():
        engine, actuator = HangingEngine(), HangingActuator()
        loop, task, adapter, server = await running_loop(engine, actuator, [1050])
        await until(lambda: ("set", 1050) in actuator.calls)
        engine.hang.set()  # as SIGSTOP does: the connection is accepted, no answer comes
        await asyncio.sleep(BOUND_S + 0.1)
        resets = actuator.resets_after(engine.answered_at)
        mode = loop.mode
        engine.hang.clear()  # as SIGCONT does
        await until(lambda: loop.mode is LoopMode.CONTROLLING)
        await stop(task, adapter, server)
        assert resets, "no reset requested after the engine stopped answering"
        assert resets[0] - engine.answered_at <= BOUND_S
        assert mode is LoopMode.STALE
        return adapter.name

    with caplog.at_level(logging.DEBUG, logger="agent"):
        engine_name = asyncio.run(scenario())
    about_engine = [(r.levelname, r.getMessage()) for r in caplog.records if engine_name in r.getMessage()]
    levels = [level for level, _ in about_engine]
    assert levels.count("WARNING") == 1 and levels[0] == "WARNING", about_engine  # one per outage
    assert levels[-1] == "INFO" and "again" in about_engine[-1][1], about_engine


def test_hanging_clock_set_gets_stock_clocks_within_the_bound():
    async def scenario():
        engine, actuator = HangingEngine(), HangingActuator()
        actuator.hang_set.add(900)
        _, task, adapter, server = await running_loop(engine, actuator, [1050, 900])
        await until(lambda: any(call[:2] == ("set", 900) for call in actuator.started))
        (hung_at,) = [at for kind, mhz, at in actuator.started if (kind, mhz) == ("set", 900)][:1]
        last_fresh = engine.answered_at  # the poll of the tick whose set hung
        await asyncio.sleep(BOUND_S + 0.1)
        resets = actuator.resets_after(hung_at)
        await stop(task, adapter, server)
        assert resets, "no reset requested while the clock set hung"
        assert resets[0] - last_fresh <= BOUND_S

    asyncio.run(scenario())


def test_hanging_reset_is_retried_every_tick_and_logged_once(caplog):
    async def scenario():
        engine, actuator = HangingEngine(), HangingActuator()
        loop, task, adapter, server = await running_loop(engine, actuator, [1050])
        await until(lambda: ("set", 1050) in actuator.calls)
        actuator.hang_reset = True
        engine.hang.set()
        went_silent = engine.answered_at
        await asyncio.sleep(BOUND_S + 6 * POLL_S)
        resets = actuator.resets_after(went_silent)
        await stop(task, adapter, server)
        assert resets and resets[0] - went_silent <= BOUND_S
        assert len(resets) >= 3, f"the hung reset was not retried: {resets}"
        assert loop.status().locked_mhz == 1050  # no reset got through: still reported as locked

    with caplog.at_level(logging.DEBUG, logger="agent.sidecar.loop"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    gpu_warnings = [m for m in warnings if "fake:GPU-0" in m]
    assert len(gpu_warnings) == 1, warnings


def test_actuator_outage_warns_once_and_says_when_it_ends(caplog):
    async def scenario():
        engine, actuator = HangingEngine(), HangingActuator()
        actuator.fail.extend(TransientGpuError("twin not answering") for _ in range(6))
        loop, task, adapter, server = await running_loop(engine, actuator, [1050])
        await until(lambda: ("set", 1050) in actuator.calls)
        await stop(task, adapter, server)
        return loop

    with caplog.at_level(logging.DEBUG, logger="agent.sidecar.loop"):
        loop = asyncio.run(scenario())
    about_gpu = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if "fake:GPU-0" in r.getMessage() and "controlling with" not in r.getMessage()
    ]
    levels = [level for level, _ in about_gpu]
    assert levels.count("WARNING") == 1 and levels[0] == "WARNING", about_gpu
    assert levels.count("DEBUG") == 5, about_gpu
    assert levels[-1] == "INFO" and "again" in about_gpu[-1][1], about_gpu
    assert loop.counters.actuator_errors == 6


def test_call_timeouts_end_half_a_period_after_the_telemetry_turns_stale():
    fresh_at_10 = TelemetryTimes(last_ok_s=10.0, last_new_s=10.0, busy_since_s=None)
    assert call_timeout_s(10.1, fresh_at_10, 2.0, 0.1, at_stock=False) == pytest.approx(1.95)
    assert call_timeout_s(12.5, fresh_at_10, 2.0, 0.1, at_stock=False) == pytest.approx(0.05)  # stale
    assert call_timeout_s(10.1, fresh_at_10, 2.0, 0.1, at_stock=True) == 2.0  # nothing to undo
    never = TelemetryTimes(None, None, None)
    assert call_timeout_s(10.1, never, 2.0, 0.1, at_stock=False) == 2.0
    busy = TelemetryTimes(last_ok_s=10.0, last_new_s=8.5, busy_since_s=9.0)  # stuck engine: stale at 11
    assert stock_deadline_s(busy, 2.0, 0.1) == pytest.approx(11.05)
