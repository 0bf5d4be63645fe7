"""SLO checks on projected timelines: how much slack each request keeps at a candidate clock.

A request's targets (throttLL'eM §3.5, MLPerf's TTFT/TPOT):
- TTFT: first token by arrival + ttft_s (only for requests still waiting for their first token);
- TPOT: mean time per output token after the first, (finish - first) / (total - 1) <= tpot_s —
  the paper's "mean TBT" SLO. Checked not only at the predicted finish but at every segment end
  before it: a request predicted to be long may stop early, and its TPOT is then averaged over
  fewer tokens. With f_k = tpot * end_k - elapsed_k this is a prefix minimum per clock. A request
  predicted to be short (at most `SHORT_OUTPUT_TOKENS` in all) is judged at every stop; the others
  only at the stops `Projection.early_cut` does not mark: a few tokens' worth of budget
  cannot absorb a long prefill stall, which matters only for an answer that may really end there;
- E2E: finish by arrival + e2e_s when the preset sets one.
Slack is the least margin over the targets that apply; negative slack means a miss. `margin`
keeps a fraction of every budget in reserve for model error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHORT_OUTPUT_TOKENS = 64  # a request predicted to end within this many tokens is judged at every stop


@dataclass(frozen=True, slots=True)
class SloTargets:
    """Per-request latency targets the controller holds."""

    tpot_s: float  # mean time per output token after the first
    ttft_s: float | None = None  # None: not a target (the paper's setting)
    e2e_s: float | None = None  # None: not a target
    margin: float = 0.05  # share of each budget kept in reserve


@dataclass(frozen=True, slots=True)
class RequestSet:
    """The requests a check covers (running and virtually admitted), as parallel arrays."""

    arrival_s: np.ndarray
    first_token_s: np.ndarray  # NaN: not yet; it will come when the pending prefills finish
    generated: np.ndarray
    remaining: np.ndarray  # projected decode iterations left
    context_tokens: np.ndarray  # tokens in the KV cache now (prompt + generated; prompt if not started)

    def __len__(self) -> int:
        return len(self.arrival_s)


def slack_s(
    targets: SloTargets,
    requests: RequestSet,
    start_s: np.ndarray,
    elapsed_s: np.ndarray,
    segment_end: np.ndarray,
    finish_segment: np.ndarray,
    early_cut: np.ndarray,
) -> np.ndarray:
    """Least slack per (clock, request).

    `early_cut` (per segment) marks the stops only requests predicted short are judged at.

    `start_s` (clocks x 1) is when decoding resumes (after pending prefills, which also bring the
    first token of requests still waiting for it); `elapsed_s` (clocks x segments) is the decode
    time from there to each segment end; request i finishes at segment `finish_segment[i]`.
    """
    keep = 1.0 - targets.margin
    budget = keep * targets.tpot_s
    waiting = np.isnan(requests.first_token_s)
    first = np.where(waiting, start_s, requests.first_token_s)
    # TPOT if the request stopped at the end of segment k: first + budget * (g + end_k - 1) must
    # reach start + elapsed_k, for every k up to its finish (from the long-output stops on, unless
    # the request is predicted short).
    margin = budget * segment_end[None, :] - elapsed_s
    late = np.where(early_cut[None, :], np.inf, margin) if early_cut.any() else margin
    tightest = np.minimum.accumulate(late, axis=1)[:, finish_segment]
    short = requests.generated + requests.remaining <= SHORT_OUTPUT_TOKENS
    if late is not margin and short.any():  # the early stops bind the short requests only
        every_stop = np.minimum.accumulate(margin, axis=1)[:, finish_segment]
        tightest = np.where(short, every_stop, tightest)
    slack = first + budget * (requests.generated - 1) - start_s + tightest
    if targets.ttft_s is not None:
        ttft = requests.arrival_s + keep * targets.ttft_s - first
        slack = np.where(waiting, np.minimum(slack, ttft), slack)
    if targets.e2e_s is not None:
        finish = start_s + elapsed_s[:, finish_segment]
        slack = np.minimum(slack, requests.arrival_s + keep * targets.e2e_s - finish)
    return slack
