"""The real-time driver runs the same twin as the virtual-time simulator, iteration for iteration."""

import asyncio

import pytest

from agent.catalog import gpu_spec, model_spec
from agent.control.policies import MaxPolicy
from agent.domain import Request
from agent.sim.loop import Simulation
from agent.twin.engine import RequestRejectedError
from agent.twin.iteration_stats import IterationStats
from agent.twin.memory import EngineConfig, SchedulerPolicy
from agent.twin.server.realtime import Generation, RealtimeTwin, TwinClock, TwinObserver
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
# A KV cache of a few thousand tokens, so max_utilization must pause requests.
TIGHT = TwinSetup(
    SETUP.gpu,
    SETUP.model,
    engine=EngineConfig(
        scheduler=SchedulerPolicy.MAX_UTILIZATION, max_seq_len=1024, kv_cache_free_gpu_mem_fraction=0.004
    ),
)
SHAPES = [(300, 40), (50, 120), (900, 7), (120, 64), (10, 1), (400, 90)]  # (prompt, max_tokens)
TIGHT_SHAPES = [(200, 300), (150, 400), (300, 250), (100, 350), (250, 300), (60, 200)]  # > 2048 tokens


class Recorder(TwinObserver):
    def __init__(self) -> None:
        self.records: list[IterationStats] = []

    def on_iteration(self, stats: IterationStats) -> None:
        self.records.append(stats)


async def drain(generation: Generation) -> list[int]:
    return [chunk.tokens async for chunk in generation.responses()]


def run_realtime(setup: TwinSetup, shapes, scale: float = 5000.0):
    async def scenario():
        recorder = Recorder()
        twin = RealtimeTwin(setup, TwinClock(scale), [recorder])
        driver = asyncio.create_task(twin.run())
        generations = [twin.submit(p, m, None, stream=i % 2 == 0) for i, (p, m) in enumerate(shapes)]
        chunks = await asyncio.gather(*(drain(g) for g in generations))
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return twin, generations, chunks, recorder.records

    return asyncio.run(scenario())


def simulate(setup: TwinSetup, shapes) -> list[IterationStats]:
    records: list[IterationStats] = []
    requests = [Request(i + 1, 0.0, p, m) for i, (p, m) in enumerate(shapes)]
    Simulation(setup, MaxPolicy(), requests, on_iteration=records.append).run()
    return records


@pytest.mark.parametrize(
    ("setup", "shapes"), [(SETUP, SHAPES), (TIGHT, TIGHT_SHAPES)], ids=["no_evict", "max_utilization"]
)
def test_same_iterations_as_the_simulator_and_every_token_delivered(setup, shapes):
    twin, generations, chunks, records = run_realtime(setup, shapes)
    expected = simulate(setup, shapes)
    assert len(records) == len(expected)
    for ours, theirs in zip(records, expected, strict=True):
        assert ours.iter_latency_ms == pytest.approx(theirs.iter_latency_ms, rel=1e-9)
        assert ours.inflight_batching_stats == theirs.inflight_batching_stats
        assert ours.kv_cache_stats == theirs.kv_cache_stats
    for generation, got, (_, max_tokens) in zip(generations, chunks, shapes, strict=True):
        assert sum(got) == generation.tokens == max_tokens
        assert got == ([1] * max_tokens if generation.stream else [max_tokens])
    if setup is TIGHT:
        assert twin.engine.preemptions > 0  # streaming survived pauses and recomputes
    # Twin time is exact however late the host was: iterations tile the busy period.
    assert twin.max_lag_s > 0
    ends = [r.timestamp for r in records]
    assert ends == sorted(ends)


def test_output_tokens_stop_early_and_impossible_requests_are_refused():
    async def scenario():
        twin = RealtimeTwin(SETUP, TwinClock(1000.0))
        driver = asyncio.create_task(twin.run())
        short = twin.submit(100, 50, 7, stream=True)
        with pytest.raises(RequestRejectedError, match="exceeds max_seq_len"):
            twin.submit(8000, 500, None, stream=False)
        got = await drain(short)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return got

    assert asyncio.run(scenario()) == [1] * 7


def test_requests_in_flight_end_with_an_error_when_the_driver_stops():
    async def scenario():
        twin = RealtimeTwin(SETUP, TwinClock(1.0))
        driver = asyncio.create_task(twin.run())
        generation = twin.submit(100, 1000, None, stream=True)
        await asyncio.sleep(0.05)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return [chunk async for chunk in generation.responses()], twin.running

    chunks, running = asyncio.run(scenario())
    assert chunks[-1].final and chunks[-1].error == "the twin server is shutting down"
    assert not running


def test_idle_start_is_the_arrival_not_the_wake_up():
    async def scenario():
        twin = RealtimeTwin(SETUP, TwinClock(1000.0))
        driver = asyncio.create_task(twin.run())
        await asyncio.sleep(0.01)
        generation = twin.submit(64, 1, None, stream=False)
        await drain(generation)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return generation

    generation = asyncio.run(scenario())
    assert generation.first_scheduled_s == generation.request.arrival_s > 0


def test_clock_rejects_a_non_positive_scale():
    with pytest.raises(ValueError, match="time scale"):
        TwinClock(0.0)


def test_a_failing_observer_is_counted_and_serving_goes_on():
    class Broken(TwinObserver):
        def on_iteration(self, stats: IterationStats) -> None:
            raise BrokenPipeError("stdout closed")

    async def scenario():
        twin = RealtimeTwin(SETUP, TwinClock(1000.0), [Broken()])
        driver = asyncio.create_task(twin.run())
        got = await drain(twin.submit(10, 5, None, stream=True))
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return got, twin.observer_errors

    got, errors = asyncio.run(scenario())
    assert got == [1] * 5 and errors == 5
