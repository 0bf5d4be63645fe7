"""Admission: which queued requests may enter the engine now (throttLL'eM §3.5).

A queued request is inserted into the scoreboard virtually and admitted only if, with it, the
projected KV cache fits and every running and admitted request still meets its SLOs at the
highest clock. Requests are admitted in arrival order (no overtaking), so the answer is a
prefix of the queue; feasibility only gets harder as the prefix grows, so the longest feasible
prefix is found by search. Requests already beyond saving ("lost": negative slack at max
clock even before anything is admitted) do not veto admissions; they are served as fast as
possible instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.control.frequency import IterationTimeModel, PrefillCost, Situation, prefill_delay_s, slack_at
from agent.control.projection import project, remaining_iterations
from agent.control.scoreboard import ScoreboardView
from agent.control.slo import RequestSet, SloTargets

URGENT_TTFT_SHARE = 0.5  # a queued request that has waited this share of its TTFT budget no longer waits


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine can hold (from its statistics and configuration)."""

    kv_blocks: int
    tokens_per_block: int
    max_batch_size: int
    max_num_tokens: int


def prefill_cost(model: IterationTimeModel, view: ScoreboardView, limits: EngineLimits) -> PrefillCost:
    """Prefill pricing for this decision, with the running batch and its KV use."""
    kv = float(np.sum(np.ceil((view.run_prompt + view.run_generated) / limits.tokens_per_block)))
    return PrefillCost.probe(model, view.running, kv, limits.max_num_tokens)


@dataclass(frozen=True, slots=True)
class Candidates:
    """Running requests, then every queued one, as they would be once started (built once per decision)."""

    requests: RequestSet
    waiting_prompt: np.ndarray  # prompt tokens still to prefill (0 for requests already started)
    running: int


def candidates(view: ScoreboardView) -> Candidates:
    """Arrays for the running requests followed by the whole queue, in admission order."""
    queued = view.queued
    first = np.concatenate([view.run_first_token_s, np.full(queued, np.nan)])
    started = ~np.isnan(first)
    prompt = np.concatenate([view.run_prompt, view.queued_prompt])
    # Requests without a first token will have one (generated = 1) once their prefill runs.
    generated = np.where(started, np.concatenate([view.run_generated, np.zeros(queued)]), 1)
    predicted = np.concatenate([view.run_predicted, view.queued_predicted])
    max_tokens = np.concatenate([view.run_max_tokens, view.queued_max_tokens])
    remaining = np.where(started | (predicted > 1), remaining_iterations(generated, predicted, max_tokens), 0)
    requests = RequestSet(
        arrival_s=np.concatenate([view.run_arrival_s, view.queued_arrival_s]),
        first_token_s=first,
        generated=generated,
        remaining=remaining,
        context_tokens=prompt + generated,
    )
    return Candidates(requests, np.where(started, 0, prompt), view.running)


def situation(
    cands: Candidates, admit: int, now_s: float, prefill: PrefillCost, tokens_per_block: int
) -> Situation:
    """Running requests plus the first `admit` queued ones, projected."""
    n = cands.running + admit
    r = cands.requests
    requests = RequestSet(
        r.arrival_s[:n], r.first_token_s[:n], r.generated[:n], r.remaining[:n], r.context_tokens[:n]
    )
    return Situation(
        now_s=now_s,
        requests=requests,
        projection=project(requests.context_tokens, requests.remaining, tokens_per_block),
        pending_prefill_tokens=int(cands.waiting_prompt[:n].sum()),
        prefill=prefill,
    )


def top_slack_s(
    model: IterationTimeModel, targets: SloTargets, sit: Situation, correction: np.ndarray
) -> np.ndarray:
    """Per request: slack at the highest clock (negative: lost, whatever the clock)."""
    top = np.array([len(model.clocks_mhz) - 1])
    return slack_at(model, targets, sit, top, correction, prefill_delay_s(sit))[0]


@dataclass(frozen=True, slots=True)
class Admission:
    """How many queued requests start now, and the checked situation with them in it."""

    count: int
    situation: Situation  # running plus the admitted requests, projected
    top_slack_s: np.ndarray  # per request of `situation`, at the highest clock


def admissible(
    model: IterationTimeModel,
    targets: SloTargets,
    view: ScoreboardView,
    now_s: float,
    limits: EngineLimits,
    correction: np.ndarray,
    prefill: PrefillCost,
) -> Admission:
    """The longest prefix of the queue that may start now.

    The whole queue is tried first (the common case at moderate load); then an exponential
    search from the head (1, 2, 4, ... requests) and a bisection inside the last step, so that
    the usual answers — all, none, or a few — cost two or three checks.
    """
    tpb = limits.tokens_per_block
    cands = candidates(view)
    checked: dict[int, Admission] = {}

    def check(k: int) -> Admission:
        if k not in checked:
            sit = situation(cands, k, now_s, prefill, tpb)
            slack = top_slack_s(model, targets, sit, correction) if len(sit.requests) else np.zeros(0)
            checked[k] = Admission(k, sit, slack)
        return checked[k]

    room = min(view.queued, limits.max_batch_size - view.running)
    if room <= 0:
        return check(0)
    # A newcomer that has used up half of its first-token budget waiting is admitted whatever its
    # own projected slack: holding it longer can only make it miss its TTFT.
    judged_new = np.ones(room, dtype=bool)
    if targets.ttft_s is not None:
        waited = now_s - view.queued_arrival_s[:room]
        judged_new = waited <= URGENT_TTFT_SHARE * (1.0 - targets.margin) * targets.ttft_s

    def fits(k: int) -> bool:
        admission = check(k)
        if view.running == 0 and k == 1:
            return True  # an idle engine always takes the head of the queue
        if admission.situation.projection.kv_peak_blocks > limits.kv_blocks:
            return False
        misses = admission.top_slack_s < 0
        if (misses[view.running :] & judged_new[:k]).any():
            return False
        if not misses[: view.running].any():
            return True
        # Running requests that were already lost before any admission do not veto (checked
        # only now: most decisions never need the situation without the newcomers).
        lost_before = check(0).top_slack_s < 0
        return not (misses[: view.running] & ~lost_before).any()

    if fits(room):
        return checked[room]
    lo, hi = 0, room  # invariant: a prefix of lo requests fits, one of hi does not
    step = 1
    while step < hi and fits(step):
        lo, step = step, step * 2
    hi = min(hi, step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return check(lo)
