"""The control loop against in-memory fakes: it actuates only on change and always fails safe."""

import asyncio

import pytest

from agent.control.admission import EngineLimits
from agent.engines.base import EngineUnavailableError
from agent.gpus import DryRunActuator, GpuLostError, PermissionDeniedError, TransientGpuError
from agent.sidecar.watchdog import ActuatorMode, Backoff, LoopMode
from tests.unit.sidecar_fakes import ScriptedPolicy, rig, stats


def run(coro):
    return asyncio.run(coro)


def test_start_resets_then_actuates_only_when_the_clock_changes():
    async def scenario():
        r = rig(ScriptedPolicy([1050, 1050, 900, None, None]))
        await r.loop.start()
        assert r.actuator.calls == [("reset", None)]  # a dead sidecar's lock is cleared first
        for i in range(5):
            r.adapter.queue.append(stats(i + 1))
            await r.loop.tick()
        assert r.actuator.calls == [("reset", None), ("set", 1050), ("set", 900), ("reset", None)]
        assert r.loop.counters.clock_changes == 3
        assert r.loop.counters.decisions == 5
        assert r.loop.mode is LoopMode.CONTROLLING and r.loop.status().not_ready == ()
        assert r.loop.last_decision.sm_clock_mhz is None and not r.loop.last_decision.clock_changed

    run(scenario())


def test_decides_on_new_iterations_only_while_nothing_waits():
    async def scenario():
        r = rig(ScriptedPolicy([1050]))
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        await r.loop.tick()  # no new iteration, nobody waiting: nothing to decide
        assert r.loop.counters.decisions == 1
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert r.loop.counters.decisions == 2
        policy = r.builder.policy
        assert [v.stats.iteration for v in policy.views] == [1, 2]
        assert policy.views[0].last_clock_mhz == 1410  # stock: the GPU boosts to max
        assert policy.views[1].last_clock_mhz == 1050  # the lock the iteration ran under

    run(scenario())


def test_measured_ips_and_decision_record():
    async def scenario():
        r = rig(ScriptedPolicy([1050]))
        await r.loop.start()
        r.adapter.queue.append(stats(7, scheduled=12, kv_used=321, kv_max=999))
        await r.loop.tick()
        record = r.loop.last_decision
        assert record.measured_ips == pytest.approx(50.0)  # 1 / 20 ms
        assert (record.batch, record.kv_blocks_used, record.kv_blocks_max) == (12, 321, 999)
        assert record.policy == "scripted" and record.clock_changed and record.decision_s >= 0

    run(scenario())


def test_unreadable_telemetry_goes_stock_fails_open_and_recovers():
    async def scenario():
        r = rig(ScriptedPolicy([1050], admit_all=False), gates=True, stale_after_s=2.0)
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        assert r.tracker.gating and r.actuator.calls[-1] == ("set", 1050)
        ticket = r.tracker.arrive(prompt_tokens=100, max_tokens=50)
        assert not ticket.admitted.done()  # held: the policy admits nobody

        r.adapter.queue.append(EngineUnavailableError("connection refused"))
        r.clock.now += 1.0
        await r.loop.tick()
        assert r.loop.mode is LoopMode.CONTROLLING  # within the bound: keep steering
        r.clock.now += 1.5
        await r.loop.tick()
        assert r.loop.mode is LoopMode.STALE
        assert r.actuator.calls[-1] == ("reset", None)
        assert not r.tracker.gating and ticket.admitted.done()  # fail open
        assert any("telemetry stale" in reason for reason in r.loop.status().not_ready)
        assert r.loop.counters.stale_episodes == 1

        r.clock.now += 1.0
        await r.loop.tick()
        assert r.actuator.calls.count(("reset", None)) == 2  # at stock already: no repeat

        r.adapter.healthy = True
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert r.loop.mode is LoopMode.CONTROLLING and r.loop.status().not_ready == ()
        assert r.actuator.calls[-1] == ("set", 1050) and r.tracker.gating

    run(scenario())


def test_engine_stuck_with_requests_in_flight_is_stale_but_idle_is_not():
    async def scenario():
        r = rig(ScriptedPolicy([900]), stale_after_s=2.0)
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        r.clock.now += 10.0  # idle for long: no iterations, and none expected
        await r.loop.tick()
        assert r.loop.mode is LoopMode.CONTROLLING
        ticket = r.tracker.arrive(prompt_tokens=10, max_tokens=10)  # not gating: admitted, in flight
        assert ticket.admitted.done()
        await r.loop.tick()
        r.clock.now += 1.9
        await r.loop.tick()
        assert r.loop.mode is LoopMode.CONTROLLING  # the busy spell just began
        r.clock.now += 0.2
        await r.loop.tick()
        assert r.loop.mode is LoopMode.STALE and r.actuator.calls[-1] == ("reset", None)
        assert "while requests are in flight" in r.loop.status().stale_reason

    run(scenario())


def test_a_failing_tick_goes_stock_restarts_with_a_fresh_policy():
    async def scenario():
        policy = ScriptedPolicy([1050])
        r = rig(policy, poll_interval_s=0.01, backoff=Backoff(initial_s=0.01, max_s=0.05))
        await r.loop.start()
        r.adapter.queue.extend(stats(i) for i in range(1, 200))
        task = asyncio.create_task(r.loop.run())
        await until(lambda: ("set", 1050) in r.actuator.calls)
        policy.error = RuntimeError("model exploded")
        await until(lambda: r.loop.counters.loop_restarts == 1)
        assert r.loop.mode is LoopMode.FAILED and "model exploded" in r.loop.last_error
        assert r.actuator.calls[-1] == ("reset", None)
        await until(lambda: r.actuator.calls[-1] == ("set", 1050))
        assert r.loop.mode is LoopMode.CONTROLLING
        assert len(r.builder.calls) == 2  # rebuilt after the failure
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_backoff_doubles_and_caps():
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    assert [backoff.delay_s(n) for n in (1, 2, 3, 4, 5, 9)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_permission_denied_switches_to_dry_run_and_stops_gating():
    async def scenario():
        r = rig(ScriptedPolicy([1050, 900]), gates=True)
        await r.loop.start()
        r.actuator.fail.append(PermissionDeniedError("needs CAP_SYS_ADMIN"))
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        assert isinstance(r.loop.actuator, DryRunActuator)
        assert r.loop.actuator_mode is ActuatorMode.OBSERVING and r.loop.status().not_ready == ()
        assert not r.tracker.gating
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert r.loop.actuator.last_decision_mhz == 900  # decisions go on, recorded only
        assert r.actuator.calls == [("reset", None)]  # the real GPU was never touched again
        assert r.loop.counters.actuator_errors == 1

    run(scenario())


def test_transient_error_retries_next_tick():
    async def scenario():
        r = rig(ScriptedPolicy([1050]))
        await r.loop.start()
        r.actuator.fail.append(TransientGpuError("timeout"))
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        assert r.actuator.calls == [("reset", None)]
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert r.actuator.calls == [("reset", None), ("set", 1050)]
        assert r.loop.actuator_mode is ActuatorMode.ACTUATING

    run(scenario())


def test_lost_gpu_stops_actuating_and_is_not_ready():
    async def scenario():
        r = rig(ScriptedPolicy([1050, 900]), gates=True)
        await r.loop.start()
        r.actuator.fail.append(GpuLostError("gone"))
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        r.adapter.queue.append(stats(2))
        await r.loop.tick()
        assert r.loop.actuator_mode is ActuatorMode.LOST
        assert r.actuator.calls == [("reset", None)]
        assert not r.tracker.gating
        assert any("GPU is lost" in reason for reason in r.loop.status().not_ready)

    run(scenario())


def test_policy_needing_limits_waits_for_them_and_rebuilds_when_they_change():
    async def scenario():
        r = rig(ScriptedPolicy([900]), spec="throttllem")
        await r.loop.start()
        await r.loop.tick()  # metrics readable, but no iteration yet: limits unknown
        assert r.builder.calls == [] and r.loop.mode is LoopMode.STARTING
        r.adapter.queue.append(stats(1, kv_max=1000))
        await r.loop.tick()
        assert r.builder.calls == [("throttllem", EngineLimits(1000, 64, 256, 8192))]
        assert r.actuator.calls[-1] == ("set", 900)
        r.adapter.queue.append(stats(2, kv_max=2000))  # the engine came back with another KV size
        await r.loop.tick()
        assert r.builder.calls[-1] == ("throttllem", EngineLimits(2000, 64, 256, 8192))
        assert r.actuator.calls[-2:] == [("reset", None), ("set", 900)]  # stock while rebuilding

    run(scenario())


def test_requested_policy_takes_over_at_the_next_tick():
    async def scenario():
        r = rig(ScriptedPolicy([None]))
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        r.loop.request_policy("static:1200")
        await r.loop.tick()
        assert r.actuator.calls[-1] == ("set", 1200)
        assert r.loop.status().policy == "static:1200"

    run(scenario())


def test_a_policy_that_cannot_be_built_keeps_stock_and_says_why():
    async def scenario():
        r = rig(ScriptedPolicy([900]))

        def broken(spec, limits):
            raise ValueError("no IPS model")

        r.loop._build = broken
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        await r.loop.tick()
        assert r.actuator.calls == [("reset", None)]
        assert any("no IPS model" in reason for reason in r.loop.status().not_ready)

    run(scenario())


def test_shutdown_opens_admission_resets_and_closes_once():
    async def scenario():
        r = rig(ScriptedPolicy([1050]), gates=True)
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        ticket = r.tracker.arrive(prompt_tokens=10, max_tokens=10)
        await r.loop.shutdown()
        await r.loop.shutdown()
        assert r.actuator.calls == [("reset", None), ("set", 1050), ("reset", None)]
        assert r.actuator.closed and not r.tracker.gating and ticket.admitted.done()

    run(scenario())


def test_observer_failures_never_reach_control():
    async def scenario():
        r = rig(ScriptedPolicy([1050]))
        seen = []

        def broken(record):
            raise RuntimeError("exporter down")

        r.loop.add_observer(broken)
        r.loop.add_observer(seen.append)
        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        assert [record.sm_clock_mhz for record in seen] == [1050]
        assert r.loop.mode is LoopMode.CONTROLLING

    run(scenario())


async def until(condition, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
