"""The coordinator's loop against an in-memory backend: the order of actions, retries, restarts, drains."""

import asyncio

import pytest

from agent.control.scaling import ScalingConfig
from agent.coordinator.backend import BackendError
from agent.coordinator.load import ArrivalRate, EngineLoad, LoadUnreadableError, parse_load
from agent.coordinator.service import Coordinator

SCALING = ScalingConfig(((1, 2.0), (2, 5.0), (4, 10.0)), headroom=0.8, grace_s=30.0, shadow_timeout_s=60.0)
PERIOD = 10.0


class FakeBackend:
    """Engines by size: a started one is ready `ready_after` ticks later; the test sets the load."""

    def __init__(
        self, routed: int | None = None, running: tuple[int, ...] = (), ready_after: int = 2
    ) -> None:
        self.routed = routed
        self.running = dict.fromkeys(running, 0)  # size -> ticks until ready (0: ready)
        self.ready_after = ready_after
        self.arrived = dict.fromkeys((1, 2, 4), 0.0)
        self.in_flight = dict.fromkeys((1, 2, 4), 0)
        self.calls: list[tuple[str, int]] = []
        self.fail: set[str] = set()  # action kinds that raise BackendError
        self.unreadable: set[int] = set()

    async def routed_size(self):
        return self.routed

    async def running_sizes(self):
        return tuple(sorted(self.running))

    async def start(self, size):
        self._maybe_fail("start")
        self.calls.append(("start", size))
        self.running.setdefault(size, self.ready_after)

    async def is_ready(self, size):
        return self.running.get(size) == 0

    async def route_to(self, size):
        self._maybe_fail("route")
        assert self.running.get(size) == 0, f"traffic moved to tp{size} before it was ready"
        self.calls.append(("route", size))
        self.routed = size

    async def load(self, size):
        if size in self.unreadable or size not in self.running:
            raise BackendError(f"tp{size} unreachable")
        return EngineLoad(self.arrived[size], 0, self.in_flight[size])

    async def stop(self, size):
        self._maybe_fail("stop")
        assert size != self.routed, "the routed engine was stopped"
        self.calls.append(("stop", size))
        self.running.pop(size, None)

    def _maybe_fail(self, kind):
        if kind in self.fail:
            raise BackendError(f"{kind} refused")

    def advance(self, rate_rps: float):
        """One period of arrivals at the routed engine, and one tick closer to ready for shadows."""
        if self.routed is not None:
            self.arrived[self.routed] += rate_rps * PERIOD
        for size, left in self.running.items():
            self.running[size] = max(0, left - 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


async def drive(coordinator, backend, clock, rates):
    for rate in rates:
        backend.advance(rate)
        clock.now += PERIOD
        await coordinator.tick()


def test_a_burst_starts_a_shadow_moves_traffic_when_ready_then_drains_and_stops_the_old_engine():
    backend, clock = FakeBackend(), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        assert backend.calls == [("start", 1)] and backend.routed is None, "routed only once ready"
        assert coordinator.record.failures == 0
        await drive(coordinator, backend, clock, [0.0, 0.0, 1.0, 3.5])  # 3.5 req/s > 0.8 × 2: tp2
        assert backend.calls == [("start", 1), ("route", 1), ("start", 2)]
        backend.in_flight[1] = 3
        await drive(coordinator, backend, clock, [3.5, 3.5])  # ready after two ticks: switch
        assert backend.calls[-1] == ("route", 2) and backend.routed == 2
        assert 1 in coordinator.draining, "tp1 drains its three requests"
        await drive(coordinator, backend, clock, [3.5])
        assert ("stop", 1) not in backend.calls
        backend.in_flight[1] = 0
        await drive(coordinator, backend, clock, [3.5])
        assert backend.calls[-1] == ("stop", 1) and coordinator.draining == {}

    run(scenario())


def test_a_shadow_that_never_becomes_ready_is_stopped_and_the_serving_engine_keeps_its_traffic():
    backend, clock = FakeBackend(routed=1, running=(1,), ready_after=1000), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [1.0] + [4.0] * 8)
        assert ("start", 2) in backend.calls and ("stop", 2) in backend.calls
        assert backend.routed == 1 and all(kind != "route" for kind, _ in backend.calls)

    run(scenario())


def test_a_failed_action_is_retried_first_and_nothing_else_happens_meanwhile():
    backend, clock = FakeBackend(routed=1, running=(1,), ready_after=1), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [1.0, 4.0])
        assert backend.calls == [("start", 2)]
        backend.fail.add("route")
        await drive(coordinator, backend, clock, [4.0, 4.0])
        assert backend.routed == 1 and coordinator.record.failures >= 1
        backend.fail.clear()
        await drive(coordinator, backend, clock, [4.0])
        assert backend.routed == 2 and backend.calls.count(("route", 2)) == 1

    run(scenario())


def test_a_coordinator_restarted_mid_switch_finishes_it_from_the_backends_state():
    backend, clock = FakeBackend(routed=2, running=(1, 2)), Clock()
    backend.in_flight[1] = 1
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        assert coordinator.state.size == 2 and coordinator.draining == {1: 0.0}
        assert backend.calls == [], "nothing is restarted or rerouted"
        backend.in_flight[1] = 0
        await drive(coordinator, backend, clock, [3.5])
        assert backend.calls == [("stop", 1)]

    run(scenario())


def test_an_engine_still_busy_at_the_drain_timeout_is_stopped_anyway():
    backend, clock = FakeBackend(routed=2, running=(1, 2)), Clock()
    backend.in_flight[1] = 5
    coordinator = Coordinator(
        backend, SCALING, initial_size=2, drain_timeout_s=25.0, min_drain_s=0.0, clock=clock
    )

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [3.5, 3.5])
        assert ("stop", 1) not in backend.calls
        await drive(coordinator, backend, clock, [3.5])
        assert backend.calls == [("stop", 1)]

    run(scenario())


def test_scaling_back_to_a_size_still_draining_reuses_that_engine():
    backend, clock = FakeBackend(routed=2, running=(1, 2), ready_after=0), Clock()
    backend.in_flight[1] = 1  # tp1 still drains from an earlier switch
    scaling = ScalingConfig(((1, 2.0), (2, 5.0)), headroom=0.8, grace_s=0.0, shadow_timeout_s=60.0)
    coordinator = Coordinator(backend, scaling, initial_size=2, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [0.5, 0.5, 0.5])  # tp1 suffices: back to it
        assert ("stop", 1) not in backend.calls and backend.routed == 1
        assert backend.calls[-1] == ("stop", 2), "tp2, idle once traffic left it, is stopped"

    run(scenario())


def test_an_idle_engine_drains_at_least_min_drain_s_for_requests_still_on_their_way():
    backend, clock = FakeBackend(routed=2, running=(1, 2)), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=2, min_drain_s=15.0, clock=clock)

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [3.5])
        assert backend.calls == [], "idle, but drained only 10 s"
        await drive(coordinator, backend, clock, [3.5])
        assert backend.calls == [("stop", 1)]

    run(scenario())


def test_a_period_without_readable_load_decides_nothing():
    backend, clock = FakeBackend(routed=1, running=(1,)), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [1.0])
        backend.unreadable.add(1)
        await drive(coordinator, backend, clock, [9.0, 9.0])
        assert backend.calls == []

    run(scenario())


def test_load_is_read_from_the_sidecars_own_metrics_page():
    from agent.sidecar.energy import EnergySampler
    from agent.sidecar.metrics import SidecarMetrics
    from tests.unit.sidecar_fakes import ScriptedPolicy, rig

    r = rig(ScriptedPolicy([1050]))

    async def scenario():
        r.tracker.arrive(prompt_tokens=10, max_tokens=5)
        r.tracker.arrive(prompt_tokens=10, max_tokens=5)
        metrics = SidecarMetrics(r.loop, r.tracker, EnergySampler(None), {"engine": "triton"})
        return metrics.exposition().decode()

    load = parse_load(run(scenario()))
    assert load == EngineLoad(arrived_total=2.0, held=0, in_flight=2) and load.busy
    with pytest.raises(LoadUnreadableError, match="throttllem_requests_arrived_total"):
        parse_load("# nothing here\n")


def test_arrival_rate_is_the_counters_increase_and_survives_a_restart():
    rate = ArrivalRate()
    assert rate.update(0.0, 100.0) is None
    assert rate.update(10.0, 150.0) == pytest.approx(5.0)
    assert rate.update(20.0, 20.0) == pytest.approx(2.0)  # the sidecar restarted: counted from zero
    rate.reset()
    assert rate.update(30.0, 500.0) is None


def test_a_routed_size_found_not_running_is_started_and_unready_others_are_stopped_at_once():
    # As after a first `kubectl apply -k deploy/k8s/engines` (every size created at one replica,
    # none ready) with tp1 scaled to 0 by hand: tp1 is brought back, tp2 and tp4 never served.
    backend, clock = FakeBackend(routed=1, running=(2, 4), ready_after=2), Clock()
    backend.running = {2: 3, 4: 3}
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=30.0, clock=clock)

    async def scenario():
        await coordinator.start()
        assert backend.calls == [("start", 1), ("stop", 2), ("stop", 4)]
        assert coordinator.draining == {} and backend.routed == 1

    run(scenario())


def test_a_leader_that_cannot_read_the_backend_tries_again_next_period():
    from agent.coordinator.service import lead

    class FlakyBackend(FakeBackend):
        def __init__(self) -> None:
            super().__init__(routed=1, running=(1,))
            self.unreachable = 1

        async def routed_size(self):
            if self.unreachable:
                self.unreachable -= 1
                raise BackendError("API server unreachable")
            return self.routed

    class Always:
        async def hold(self):
            return True

    backend, clock = FlakyBackend(), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
    periods = []

    async def sleep(_):
        periods.append(coordinator.state)
        if len(periods) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        run(lead(coordinator, Always(), PERIOD, sleep))
    assert periods[0] is None, "the first start failed and did not end the loop"
    assert periods[1] is not None and periods[1].size == 1, "the next period started it"


def test_a_shadow_ready_mid_period_takes_traffic_at_the_next_look_not_the_next_tick():
    from agent.coordinator.service import wait_period

    backend, clock = FakeBackend(routed=1, running=(1,), ready_after=1000), Clock()
    coordinator = Coordinator(backend, SCALING, initial_size=1, min_drain_s=0.0, clock=clock)
    looks = []

    async def sleep(seconds):
        clock.now += seconds
        looks.append(clock.now)
        if len(looks) == 3:
            backend.running[2] = 0  # ready 3 s into the period

    async def scenario():
        await coordinator.start()
        await drive(coordinator, backend, clock, [1.0, 4.0])
        assert backend.calls == [("start", 2)]
        began = clock.now
        await wait_period(coordinator, PERIOD, sleep, 1.0)
        assert backend.calls == [("start", 2), ("route", 2)], "switched within the period"
        assert len(looks) == 10 and clock.now == pytest.approx(began + PERIOD)
        assert 1 in coordinator.draining
        await coordinator.check_shadow()  # nothing starting any more: nothing happens
        assert backend.calls[-1] == ("route", 2)

    run(scenario())


def test_without_ready_polls_a_period_is_one_sleep():
    from agent.coordinator.service import wait_period

    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    coordinator = Coordinator(FakeBackend(), SCALING, initial_size=1)
    run(wait_period(coordinator, PERIOD, sleep, None))
    run(wait_period(coordinator, PERIOD, sleep, 1.0))  # not started yet: nothing to look at
    assert slept == [PERIOD, PERIOD]
