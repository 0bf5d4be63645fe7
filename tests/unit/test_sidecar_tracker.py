"""The live scoreboard: admission holds are bounded in number and time, and fail open."""

import asyncio

import pytest

from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.tracker import HoldQueueFullError, RequestTracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(**kwargs) -> tuple[RequestTracker, FakeClock]:
    clock = FakeClock()
    return RequestTracker(MaxTokensPredictor(), clock=clock, **kwargs), clock


def test_without_gating_requests_are_admitted_at_once():
    async def scenario():
        t, _ = tracker()
        ticket = t.arrive(prompt_tokens=100, max_tokens=20)
        await t.wait_admitted(ticket)
        view = t.view()
        assert list(view.run_ids) == [ticket.request_id] and view.queued == 0
        assert t.in_flight == 1 and t.held == 0

    asyncio.run(scenario())


def test_gated_requests_wait_for_release_in_arrival_order():
    async def scenario():
        t, clock = tracker()
        t.gating = True
        first, second = t.arrive(100, 20), t.arrive(50, 10)
        view = t.view()
        assert list(view.queued_ids) == [first.request_id, second.request_id]
        waiter = asyncio.create_task(t.wait_admitted(second))
        await asyncio.sleep(0)
        assert not waiter.done()
        clock.now += 0.3
        t.release([second.request_id])
        await waiter
        assert second.admitted_s == pytest.approx(100.3)
        assert list(t.view().run_ids) == [second.request_id] and t.held == 1

    asyncio.run(scenario())


def test_a_full_hold_queue_refuses_with_retry_after_and_counts_it():
    async def scenario():
        t, _ = tracker(max_held=2, retry_after_s=2.5)
        t.gating = True
        t.arrive(10, 10)
        t.arrive(10, 10)
        with pytest.raises(HoldQueueFullError) as refused:
            t.arrive(10, 10)
        assert refused.value.retry_after_s == 2.5 and t.counters.rejected == 1 and t.held == 2

    asyncio.run(scenario())


def test_room_is_checked_without_registering_anything():
    """The gateway asks before it reads a body: a full queue costs it nothing to learn."""

    async def scenario():
        t, _ = tracker(max_held=1)
        t.check_room()  # not gating: always room
        t.gating = True
        t.check_room()
        t.arrive(10, 10)
        with pytest.raises(HoldQueueFullError):
            t.check_room()
        assert t.counters.rejected == 1 and t.counters.arrived == 1 and t.held == 1

    asyncio.run(scenario())


def test_nothing_waits_longer_than_the_hold_bound():
    async def scenario():
        t, _ = tracker(max_hold_s=0.05)
        t.gating = True
        ticket = t.arrive(10, 10)
        await t.wait_admitted(ticket)  # the loop never releases it
        assert ticket.admitted.done() and t.counters.admitted_on_timeout == 1 and t.held == 0

    asyncio.run(scenario())


def test_release_all_fails_open():
    async def scenario():
        t, _ = tracker()
        t.gating = True
        tickets = [t.arrive(10, 10) for _ in range(3)]
        t.release_all()
        assert all(ticket.admitted.done() for ticket in tickets) and t.held == 0

    asyncio.run(scenario())


def test_tokens_and_completion_update_the_scoreboard():
    async def scenario():
        t, clock = tracker()
        ticket = t.arrive(100, 50)
        clock.now += 0.2
        t.first_token(ticket)
        t.add_tokens(ticket, 4)
        view = t.view()
        assert view.run_generated[0] == 5 and view.run_first_token_s[0] == pytest.approx(100.2)
        t.finish(ticket, ok=True)
        t.finish(ticket, ok=True)  # a second report is ignored
        assert len(t.view().run_ids) == 0 and t.counters.completed == 1

    asyncio.run(scenario())


def test_a_request_that_fails_while_held_leaves_no_trace():
    async def scenario():
        t, _ = tracker()
        t.gating = True
        ticket = t.arrive(10, 10)
        t.finish(ticket, ok=False)
        assert t.held == 0 and t.view().queued == 0 and t.counters.failed == 1
        t.release([ticket.request_id])  # a late decision about it is harmless

    asyncio.run(scenario())
