"""SLO checks on projected timelines: how much slack each request keeps at a candidate clock.

A request's targets (throttLL'eM §3.5, MLPerf's TTFT/TPOT):
- TTFT: first token by arrival + ttft_s (only for requests still waiting for their first token);
- TPOT: mean time per output token after the first, (finish - first) / (total - 1) <= tpot_s,
  i.e. finish by first + tpot_s * (total - 1) — the paper's "mean TBT" SLO;
- E2E: finish by arrival + e2e_s when the preset sets one.
Slack is the least margin over the targets that apply; negative slack means a miss. `margin`
keeps a fraction of every budget in reserve for model error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    targets: SloTargets, requests: RequestSet, first_token_at_s: np.ndarray, finish_at_s: np.ndarray
) -> np.ndarray:
    """Least slack per request and candidate: arrays broadcast as (clocks, requests)."""
    keep = 1.0 - targets.margin
    first = np.where(np.isnan(requests.first_token_s), first_token_at_s, requests.first_token_s)
    total = requests.generated + requests.remaining
    tpot_budget = keep * targets.tpot_s * np.maximum(total - 1, 0)
    slack = first + tpot_budget - finish_at_s
    if targets.ttft_s is not None:
        waiting = np.isnan(requests.first_token_s)
        ttft = requests.arrival_s + keep * targets.ttft_s - first
        slack = np.where(waiting, np.minimum(slack, ttft), slack)
    if targets.e2e_s is not None:
        slack = np.minimum(slack, requests.arrival_s + keep * targets.e2e_s - finish_at_s)
    return slack
