"""Clock search: the lowest supported SM clock at which every request keeps its SLOs.

For a candidate clock the projected timeline is: pending prefills first (they stall every
decode in TensorRT-LLM's in-flight batching), then the decode segments of the projection, each
taking (iterations x predicted seconds per iteration x guard correction). Feasibility is
monotone in the clock because the IPS model is (a trained constraint), so the lowest feasible
clock can be found by bisection; evaluating every clock in one vectorised pass is the
alternative, and `bench decide` measures which is faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.control.projection import Projection
from agent.control.slo import RequestSet, SloTargets, slack_s

PROBE_SMALL_TOKENS = 256  # small prefill probe; with max_num_tokens it fixes the prefill line


class IterationTimeModel(Protocol):
    """Predicted seconds per engine iteration at each candidate clock."""

    @property
    def clocks_mhz(self) -> np.ndarray:
        """Candidate clocks, ascending."""
        ...

    def decode_s(self, clock_index: np.ndarray, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """Decode-only iteration time; arguments broadcast."""
        ...

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """Time of an iteration carrying `prefill_tokens`, at every candidate clock."""
        ...


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """Per clock, the time of a prefill iteration as a line through two probes of the model.

    Prefill time grows about linearly with its tokens; probing the model twice per decision
    (a small and a full chunk) prices any number of pending prompt tokens without further
    model calls.
    """

    small_tokens: int
    small_s: np.ndarray  # per clock
    full_tokens: int  # max_num_tokens: the largest chunk an iteration takes
    full_s: np.ndarray  # per clock

    @classmethod
    def probe(
        cls, model: IterationTimeModel, batch: int, kv_blocks: float, max_num_tokens: int
    ) -> PrefillCost:
        """Ask the model for a small and a full prefill iteration at every clock."""
        small = min(PROBE_SMALL_TOKENS, max_num_tokens)
        return cls(
            small,
            model.prefill_s(batch, kv_blocks, small),
            max_num_tokens,
            model.prefill_s(batch, kv_blocks, max_num_tokens),
        )

    @property
    def per_token_s(self) -> np.ndarray:
        """Per clock: the marginal time of one more prompt token (the line's slope)."""
        return np.maximum((self.full_s - self.small_s) / max(self.full_tokens - self.small_tokens, 1), 0.0)

    def delay_s(self, pending_tokens: int) -> np.ndarray:
        """Time to prefill `pending_tokens`: full chunks, then the rest, every decode stalled."""
        if pending_tokens <= 0:
            return np.zeros_like(self.full_s)
        full, rest = divmod(pending_tokens, self.full_tokens)
        delay = full * self.full_s
        if rest:
            delay = delay + np.maximum(self.small_s + self.per_token_s * (rest - self.small_tokens), 0.0)
        return delay


@dataclass(frozen=True, slots=True)
class Situation:
    """Everything a clock check needs besides the clock."""

    now_s: float
    requests: RequestSet
    projection: Projection
    pending_prefill_tokens: int  # prompt tokens not yet processed (queued and mid-prefill)
    prefill: PrefillCost


def prefill_delay_s(situation: Situation) -> np.ndarray:
    """Per clock: time spent on pending prefills before decoding resumes."""
    return situation.prefill.delay_s(situation.pending_prefill_tokens)


def slack_at(
    model: IterationTimeModel,
    targets: SloTargets,
    situation: Situation,
    clock_index: np.ndarray,
    correction: np.ndarray,
    delay_s: np.ndarray,
) -> np.ndarray:
    """Slack (clocks x requests) at the given clock indices."""
    proj = situation.projection
    idx = np.asarray(clock_index)[:, None]
    seg_s = proj.length[None, :] * model.decode_s(idx, proj.batch[None, :], proj.kv_blocks[None, :])
    seg_s = seg_s * np.asarray(correction)[np.asarray(clock_index)][:, None]
    cumulative = seg_s.cumsum(axis=1)
    start = situation.now_s + delay_s[np.asarray(clock_index)][:, None]
    return slack_s(
        targets, situation.requests, start, cumulative, proj.end, proj.finish_segment, proj.early_cut
    )


@dataclass(frozen=True, slots=True)
class ClockChoice:
    """The search's answer."""

    clock_index: int | None  # lowest feasible candidate; None when even the highest is not
    min_slack_s: float  # least slack over the requests at that clock (or at the highest clock)
    evaluations: int  # slack evaluations (model calls) made


SEARCHES = ("two-level", "bisect", "all")


def lowest_feasible(
    model: IterationTimeModel,
    targets: SloTargets,
    situation: Situation,
    correction: np.ndarray,
    search: str = "two-level",
    top_slack_s: np.ndarray | None = None,
) -> ClockChoice:
    """The lowest candidate clock with non-negative slack for every request.

    Feasibility is monotone in the clock, so three searches give the same answer at different
    costs (`bench decide` measures them): `all` evaluates every clock in one call; `bisect`
    one clock per call, log2(n) calls; `two-level` every k-th clock (k ~ sqrt(n)) in one call,
    then the clocks inside the bracket found in a second. `top_slack_s`, the per-request slack
    at the highest clock when the caller already has it (admission computes it), saves a call.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown clock search {search!r}; known: {', '.join(SEARCHES)}")
    n = len(model.clocks_mhz)
    if len(situation.requests) == 0:
        return ClockChoice(0, math.inf, 0)
    delay = prefill_delay_s(situation)

    def min_slack(indices: np.ndarray) -> np.ndarray:
        return slack_at(model, targets, situation, indices, correction, delay).min(axis=1)

    if search == "all":
        slack = min_slack(np.arange(n))
        ok = np.flatnonzero(slack >= 0)
        if len(ok) == 0:
            return ClockChoice(None, float(slack[-1]), 1)
        return ClockChoice(int(ok[0]), float(slack[ok[0]]), 1)
    evaluations = 0
    if top_slack_s is None:
        top, evaluations = float(min_slack(np.array([n - 1]))[0]), 1
    else:
        top = float(top_slack_s.min())
    if top < 0:
        return ClockChoice(None, top, evaluations)
    lo, hi, best = -1, n - 1, top  # invariant: hi is feasible with slack `best`, lo is not (or -1)
    if search == "bisect":
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_slack = float(min_slack(np.array([mid]))[0])
            evaluations += 1
            if mid_slack >= 0:
                hi, best = mid, mid_slack
            else:
                lo = mid
        return ClockChoice(hi, best, evaluations)
    coarse = np.arange(0, n - 1, max(1, math.isqrt(n)))
    slack = min_slack(coarse)
    ok = np.flatnonzero(slack >= 0)
    if len(ok):
        hi, best = int(coarse[ok[0]]), float(slack[ok[0]])
        lo = int(coarse[ok[0] - 1]) if ok[0] > 0 else -1
    else:
        lo = int(coarse[-1])
    fine = np.arange(lo + 1, hi)
    if len(fine) == 0:
        return ClockChoice(hi, best, evaluations + 1)
    slack = min_slack(fine)
    ok = np.flatnonzero(slack >= 0)
    if len(ok):
        hi, best = int(fine[ok[0]]), float(slack[ok[0]])
    return ClockChoice(hi, best, evaluations + 2)
