"""The real throttllem policy, built as the sidecar builds it, behind the live loop and tracker."""

import asyncio
from dataclasses import replace

from agent.config import Settings
from agent.control.admission import EngineLimits
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.app import policy_builder
from agent.sidecar.loop import ControlLoop, LoopConfig
from agent.sidecar.tracker import RequestTracker
from agent.sidecar.watchdog import LoopMode
from tests.unit.sidecar_fakes import GPU, FakeActuator, FakeAdapter, FakeClock, stats


def test_throttllem_admits_held_requests_and_throttles_a_light_load():
    async def scenario():
        clock = FakeClock()
        adapter, actuator = FakeAdapter(), FakeActuator()
        tracker = RequestTracker(MaxTokensPredictor(), clock=clock)
        build = policy_builder(Settings(policy="throttllem"), GPU)
        built_for: list[EngineLimits | None] = []

        def recording_build(spec, limits):
            built_for.append(limits)
            return build(spec, limits)

        loop = ControlLoop(
            adapter=adapter,
            actuator=actuator,
            tracker=tracker,
            gpu=GPU,
            policy_spec="throttllem",
            build_policy=recording_build,
            config=LoopConfig(),
        )
        await loop.start()
        adapter.queue.append(stats(1, scheduled=0, kv_used=0, kv_max=7000))
        await loop.tick()  # builds the IPS tables for this KV capacity (in a thread)
        assert built_for == [EngineLimits(7000, 64, 256, 8192)]
        assert loop.mode is LoopMode.CONTROLLING and tracker.gating

        tickets = [tracker.arrive(prompt_tokens=400, max_tokens=128) for _ in range(3)]
        assert tracker.held == 3
        clock.now += 0.01
        await loop.tick()  # nothing new from the engine, but requests wait: decide
        assert tracker.held == 0 and all(t.admitted.done() for t in tickets)
        assert loop.last_decision.admitted == 3

        clocks = []
        for i in range(2, 40):
            clock.now += 0.1
            for ticket in tickets:
                if ticket.first_token_s is None:
                    tracker.first_token(ticket)
                else:
                    tracker.add_tokens(ticket, 1)
            adapter.queue.append(
                replace(stats(i, scheduled=3, kv_used=21, kv_max=7000), iteration_latency_s=0.012)
            )
            await loop.tick()
            clocks.append(loop.last_decision.sm_clock_mhz)
        return loop, clocks, actuator

    loop, clocks, actuator = asyncio.run(scenario())
    record = loop.last_decision
    assert record.policy == "throttllem"
    assert clocks[-1] is not None and clocks[-1] < GPU.max_clock_mhz  # three decodes leave slack: throttle
    assert actuator.calls[-1] == ("set", clocks[-1])
    assert record.predicted_ips is not None and record.predicted_ips > 0
    assert record.min_slack_s is not None and record.min_slack_s > 0
    assert record.guard_mode == "steady" and record.running == 3
