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

    def delay_s(self, pending_tokens: int) -> np.ndarray:
        """Time to prefill `pending_tokens`: full chunks, then the rest, every decode stalled."""
        if pending_tokens <= 0:
            return np.zeros_like(self.full_s)
        full, rest = divmod(pending_tokens, self.full_tokens)
        delay = full * self.full_s
        if rest:
            slope = (self.full_s - self.small_s) / max(self.full_tokens - self.small_tokens, 1)
            delay = delay + np.maximum(self.small_s + slope * (rest - self.small_tokens), 0.0)
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
    cumulative = np.cumsum(seg_s, axis=1)
    start = situation.now_s + delay_s[np.asarray(clock_index)][:, None]
    return slack_s(targets, situation.requests, start, cumulative, proj.end, proj.finish_segment)


@dataclass(frozen=True, slots=True)
class ClockChoice:
    """The search's answer."""

    clock_index: int | None  # lowest feasible candidate; None when even the highest is not
    min_slack_s: float  # least slack over the requests at that clock (or at the highest clock)
    evaluations: int  # clocks evaluated


def lowest_feasible(
    model: IterationTimeModel,
    targets: SloTargets,
    situation: Situation,
    correction: np.ndarray,
    bisect: bool = True,
) -> ClockChoice:
    """The lowest candidate clock with non-negative slack for every request."""
    n = len(model.clocks_mhz)
    if len(situation.requests) == 0:
        return ClockChoice(0, math.inf, 0)
    delay = prefill_delay_s(situation)
    if not bisect:
        slack = slack_at(model, targets, situation, np.arange(n), correction, delay).min(axis=1)
        ok = np.flatnonzero(slack >= 0)
        if len(ok) == 0:
            return ClockChoice(None, float(slack[-1]), n)
        return ClockChoice(int(ok[0]), float(slack[ok[0]]), n)

    def min_slack(i: int) -> float:
        return float(slack_at(model, targets, situation, np.array([i]), correction, delay).min())

    evaluations = 1
    top = min_slack(n - 1)
    if top < 0:
        return ClockChoice(None, top, evaluations)
    lo, hi, best = 0, n - 1, top  # invariant: hi is feasible with slack `best`
    while lo < hi:
        mid = (lo + hi) // 2
        slack = min_slack(mid)
        evaluations += 1
        if slack >= 0:
            hi, best = mid, slack
        else:
            lo = mid + 1
    return ClockChoice(hi, best, evaluations)
