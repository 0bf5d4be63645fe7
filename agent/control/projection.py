"""Project future batch size and KV-cache use, iteration by iteration, from the scoreboard.

Request i holds L_i tokens in the KV cache and will decode for r_i more iterations (its predicted
total minus what it has generated). At future iteration t it is active while t < r_i. Sorting
the distinct r values u_1 < u_2 < ... cuts the future into *segments* [u_{k-1}, u_k) in which
the batch is constant::

    t:      0 ........ u1 ............ u2 ..... u3
    batch:  n          n - |{r = u1}|   ...
    KV(t) = sum over active i of ceil((L_i + t) / tpb)  ~  (sum L_i + B t) / tpb + B / 2

so the whole future is described by at most n segments, computed in O(n log n) with prefix
sums — never one row per future iteration. Segments are merged down to `max_segments` (long
tails of single requests cost nothing to merge) so that clock checks stay cheap. Segments are
also cut at t = 4, 8, 16, 32, ...: lengths are predictions, so a request may stop early, and the
TPOT check (slo.py) must see early stopping points even inside one long segment. The stops before
`LONG_OUTPUT_CHECKS_FROM` bind only requests predicted to be short (slo.py): judging every
request at t = 4 made every pending prefill stall look fatal and pinned the clock near max, while
judging none there let one long prefill at a low clock break the TPOT of a 6-token answer.
(throttLL'eM §3.4: the paper builds B and KV analytically per iteration.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_SEGMENTS = 48
FIRST_CUT_LOG2 = 2  # early stopping points at 4, 8, 16, 32, ... iterations
LONG_OUTPUT_CHECKS_FROM = 32  # a request not predicted short is judged at stops from here on
_GEOMETRIC_CUTS = 2.0 ** np.arange(FIRST_CUT_LOG2, 40)


@dataclass(frozen=True, slots=True)
class Projection:
    """The future as segments of constant batch size, plus where each request finishes."""

    end: np.ndarray  # iteration index (exclusive) where each segment ends, ascending
    length: np.ndarray  # iterations in each segment
    batch: np.ndarray  # requests decoding during the segment
    kv_blocks: np.ndarray  # KV blocks in use at the segment's midpoint
    kv_peak_blocks: float  # highest KV use over the whole projection
    finish_segment: np.ndarray  # per request (input order): the segment whose end it finishes at
    early_cut: np.ndarray  # per segment: its end is only a stop before LONG_OUTPUT_CHECKS_FROM (no finish)


def remaining_iterations(generated: np.ndarray, predicted: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """Decode iterations left per request.

    A request that has outlived its prediction falls back to its max_tokens, as the paper
    does: the only safe bound left.
    """
    predicted_left = predicted - generated
    return np.where(predicted_left >= 1, predicted_left, np.maximum(max_tokens - generated, 1))


def project(
    context_tokens: np.ndarray,
    remaining: np.ndarray,
    tokens_per_block: int,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> Projection:
    """Segments of the future for requests with `context_tokens` cached and `remaining` iterations."""
    n = len(remaining)
    if n == 0:
        empty = np.zeros(0)
        return Projection(
            empty, empty, empty, empty, 0.0, np.zeros(0, dtype=np.intp), np.zeros(0, dtype=bool)
        )
    order = remaining.argsort(kind="stable")
    r_sorted = remaining[order].astype(np.float64)
    l_sorted = context_tokens[order].astype(np.float64)
    ends = r_sorted[np.concatenate([r_sorted[1:] != r_sorted[:-1], [True]])]  # sorted: unique is a diff
    if len(ends) > max_segments:
        # Keep boundaries at evenly spaced ranks (distinct, since there are more ends than
        # segments; the first and last are kept): merged segments end where their last request ends, so
        # finishes are never projected earlier than they happen.
        ranks = (np.arange(max_segments) * (len(ends) - 1)) // (max_segments - 1)
        ends = ends[ranks]
    finishes = ends
    cuts = _GEOMETRIC_CUTS[ends[-1] > _GEOMETRIC_CUTS]
    if len(cuts):
        ends = np.sort(np.concatenate([ends, cuts]))
        ends = ends[np.concatenate([ends[1:] != ends[:-1], [True]])]
    early_cut = (ends < LONG_OUTPUT_CHECKS_FROM) & ~np.isin(ends, finishes)
    starts = np.concatenate([[0.0], ends[:-1]])
    # Requests still active in segment k are those with r >= its end... except inside merged
    # segments, where some finish early; counting them as active is the conservative choice.
    done_before = np.searchsorted(r_sorted, starts, side="right")
    batch = n - done_before
    prefix_l = np.concatenate([[0.0], l_sorted.cumsum()])
    active_l = prefix_l[-1] - prefix_l[done_before]
    mid = (starts + ends) / 2.0
    kv = (active_l + batch * mid) / tokens_per_block + batch / 2.0
    # ceil(x) <= x + 1 - 1/tpb: the peak is an upper bound, never an estimate.
    kv_end = (active_l + batch * ends) / tokens_per_block + batch * (1.0 - 1.0 / tokens_per_block)
    finish_sorted = np.searchsorted(ends, r_sorted, side="left")
    finish = np.empty(n, dtype=np.intp)
    finish[order] = finish_sorted
    return Projection(
        end=ends,
        length=ends - starts,
        batch=batch.astype(np.float64),
        kv_blocks=kv,
        kv_peak_blocks=float(kv_end.max()),
        finish_segment=finish,
        early_cut=early_cut,
    )
