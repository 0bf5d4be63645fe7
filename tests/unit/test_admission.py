"""Admission: the longest prefix of the queue that keeps KV and every judged SLO at max clock."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.admission import (
    URGENT_TTFT_SHARE,
    EngineLimits,
    admissible,
    candidates,
    prefill_cost,
    situation,
    top_slack_s,
)
from agent.control.scoreboard import Scoreboard
from agent.control.slo import SloTargets
from agent.domain import Request
from tests.unit.test_projection import LinearModel

MODEL = LinearModel()
CORRECTION = np.ones(len(MODEL.clocks_mhz))

running_st = st.lists(
    st.tuples(st.integers(16, 2000), st.integers(2, 300), st.integers(0, 100)), min_size=0, max_size=30
)
queued_st = st.lists(st.tuples(st.integers(16, 3000), st.integers(2, 300)), min_size=0, max_size=20)


def board_of(running, queued, now: float) -> Scoreboard:
    board = Scoreboard(capacity=8)
    for i, (prompt, predicted, generated) in enumerate(running):
        board.add_queued(Request(i, now - 5.0, prompt, 512), predicted)
        board.admit(i)
        board.first_token(i, now - 0.015 * max(generated, 1))
        board.add_tokens(i, generated)
    for j, (prompt, predicted) in enumerate(queued):
        board.add_queued(Request(100 + j, now - 0.05 * (len(queued) - j), prompt, 512), predicted)
    return board


def reference_fits(k, view, limits, targets, now, prefill) -> bool:
    """The rule, written out for one prefix size."""
    cands = candidates(view)
    sit = situation(cands, k, now, prefill, limits.tokens_per_block)
    if view.running == 0 and k == 1:
        return True
    if sit.projection.kv_peak_blocks > limits.kv_blocks:
        return False
    slack = top_slack_s(MODEL, targets, sit, CORRECTION)
    before = top_slack_s(MODEL, targets, situation(cands, 0, now, prefill, 64), CORRECTION)
    waited = now - view.queued_arrival_s[:k]
    judged_new = waited <= URGENT_TTFT_SHARE * (1 - targets.margin) * targets.ttft_s
    judged = np.concatenate([before >= 0, judged_new]) if view.running else judged_new
    return bool(np.all(slack[judged] >= 0))


@settings(max_examples=150, deadline=None)
@given(
    running=running_st,
    queued=queued_st,
    kv_blocks=st.integers(50, 3000),
    max_batch=st.integers(1, 64),
    tpot=st.floats(0.015, 0.08),
)
def test_admission_is_a_longest_prefix_that_fits(running, queued, kv_blocks, max_batch, tpot):
    now = 1000.0
    view = board_of(running, queued, now).view()
    limits = EngineLimits(
        kv_blocks=kv_blocks, tokens_per_block=64, max_batch_size=max_batch, max_num_tokens=4096
    )
    targets = SloTargets(tpot_s=tpot, ttft_s=2.0)
    prefill = prefill_cost(MODEL, view, limits)
    result = admissible(MODEL, targets, view, now, limits, CORRECTION, prefill)
    room = max(0, min(view.queued, max_batch - view.running))
    assert 0 <= result.count <= room
    assert result.situation.requests.arrival_s.shape == (view.running + result.count,)
    if result.count and not (view.running == 0 and result.count == 1):
        assert result.situation.projection.kv_peak_blocks <= kv_blocks  # never beyond the KV cache
        assert reference_fits(result.count, view, limits, targets, now, prefill)
    if result.count < room:
        assert not reference_fits(result.count + 1, view, limits, targets, now, prefill)


def test_an_idle_engine_always_takes_the_head_of_the_queue():
    now = 10.0
    view = board_of([], [(3000, 300), (16, 2)], now).view()
    limits = EngineLimits(kv_blocks=10, tokens_per_block=64, max_batch_size=8, max_num_tokens=4096)
    targets = SloTargets(tpot_s=0.001, ttft_s=2.0)  # nothing can meet this
    result = admissible(MODEL, targets, view, now, limits, CORRECTION, prefill_cost(MODEL, view, limits))
    assert result.count == 1


def test_running_requests_already_lost_do_not_veto():
    now = 1000.0
    # One running request hopelessly late (first token long ago, one token since), one newcomer.
    board = Scoreboard()
    board.add_queued(Request(1, now - 60.0, 100, 512), 200)
    board.admit(1)
    board.first_token(1, now - 50.0)
    board.add_queued(Request(2, now - 0.01, 100, 512), 20)
    view = board.view()
    limits = EngineLimits(kv_blocks=1000, tokens_per_block=64, max_batch_size=8, max_num_tokens=4096)
    targets = SloTargets(tpot_s=0.05, ttft_s=2.0)
    prefill = prefill_cost(MODEL, view, limits)
    result = admissible(MODEL, targets, view, now, limits, CORRECTION, prefill)
    assert result.count == 1 and result.top_slack_s[0] < 0 <= result.top_slack_s[1]
