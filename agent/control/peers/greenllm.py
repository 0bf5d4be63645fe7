"""GreenLLM's decode loop: hysteretic clock steps that hold the tail time between tokens in a band.

A reconstruction from the paper's description, not from its code (none was found): Qunyou Liu,
Darong Huang, Marina Zapater, David Atienza, "GreenLLM: SLO-Aware Dynamic Frequency Scaling for
Energy-Efficient LLM Serving", arXiv:2508.16449 (v1, 22 Aug 2025). What it publishes that is
used here — its abstract, and the "dual-loop dynamic decode optimizer" of its system overview
(Fig. 1) — is: during decode, a lightweight dual-loop controller tracks throughput (tokens per
second) and moves the SM clock in hysteretic, fine-grained steps to keep the tail TBT within
target bounds; a summary of the paper names the tail as the 95th percentile. Prefill is a
separate optimizer: requests are queued by prompt length and each class gets the energy-minimal
clock that a queueing model says meets the TTFT, from latency–power models fitted on short traces.

Reconstructed (the window, thresholds and steps are ours, not the paper's, which could not be
read beyond that description):

- A window of the latest decode-only iteration times (each is the TBT every decoding request
  sees) measured at the clock the loop holds; it is emptied whenever the loop moves, so every
  move is judged on samples of the clock it moved to.
- Once the window holds `min_samples`, its `percentile` is compared with the TPOT target: above
  the target → max clock (the SLO first); above `upper` × target → `step_up` clocks up; below
  `lower` × target → `step_down` clocks down; in between → hold (the hysteresis band).
- The outer, throughput-tracking loop is folded into the inner one: at a given batch, decode
  tokens per second is batch / TBT, so the TBT window already carries that feedback.
- Prefill: its per-class optimizer needs the paper's power models and length-based queues, which
  are not reproduced; an iteration with prompt tokens, or requests waiting to be scheduled (they
  will be prefilled next), gets max clock. The decode loop keeps its clock and resumes after.
- No clock guard: GreenLLM's own hysteresis decides when the clock moves.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

import numpy as np

from agent.control.policies import ControlView
from agent.control.slo import SloTargets
from agent.domain import Decision, EngineStats

WINDOW = 64  # decode iterations kept: about 1-3 s at typical TBTs
MIN_SAMPLES = 16  # fresh samples before a move: a 95th percentile needs more than a handful
PERCENTILE = 95.0  # the tail the summary of the paper names
LOWER = 0.8  # tail below this share of the target → lower the clock
UPPER = 0.95  # tail above this share of the target → raise it; above the target itself → max
STEP_DOWN = 1  # clocks per lowering: fine-grained, one supported clock (15 MHz on NVML's grid)
STEP_UP = 2  # clocks per raise: raise faster than lower, the SLO first


class GreenLlmPolicy:
    """Hold the tail decode TBT between `lower` and `upper` × the TPOT target by stepping the clock."""

    gates_admission: ClassVar[bool] = False

    def __init__(
        self,
        targets: SloTargets,
        clocks_mhz: tuple[int, ...],
        *,
        window: int = WINDOW,
        min_samples: int = MIN_SAMPLES,
        percentile: float = PERCENTILE,
        lower: float = LOWER,
        upper: float = UPPER,
        step_down: int = STEP_DOWN,
        step_up: int = STEP_UP,
    ) -> None:
        if not clocks_mhz:
            raise ValueError("GreenLLM needs at least one clock")
        if not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples} and {window}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if not 0.0 < lower < upper <= 1.0:
            raise ValueError(f"need 0 < lower < upper <= 1, got {lower} and {upper}")
        if step_down < 1 or step_up < 1:
            raise ValueError(f"steps must be at least one clock, got {step_down} and {step_up}")
        self.name = "greenllm"
        self.targets = targets
        self.clocks_mhz = tuple(sorted(set(clocks_mhz)))
        self.min_samples = min_samples
        self.percentile = percentile
        self.lower, self.upper = lower, upper
        self.step_down, self.step_up = step_down, step_up
        self._index = len(self.clocks_mhz) - 1  # start where the stock governor is: max clock
        self._tbt_s: deque[float] = deque(maxlen=window)
        self._last_iteration: int | None = None

    @property
    def decode_clock_mhz(self) -> int:
        """The clock the decode loop holds (prefill overrides it with max clock)."""
        return self.clocks_mhz[self._index]

    def decide(self, view: ControlView) -> Decision:
        """Max clock for prefill; otherwise the decode loop's clock after this snapshot's sample."""
        stats = view.stats
        if stats is None:
            return self._decision()
        if stats.iteration != self._last_iteration:  # a snapshot seen twice is one sample
            self._last_iteration = stats.iteration
            self._record(stats, view.last_clock_mhz)
        waiting = (stats.queued_requests or 0) + stats.active_requests - stats.scheduled_requests
        if stats.context_tokens or waiting > 0:
            return Decision(sm_clock_mhz=None)
        self._step()
        return self._decision()

    def _record(self, stats: EngineStats, ran_at_mhz: int | None) -> None:
        """Keep a decode-only iteration's time, unless it ran faster than the loop's clock.

        An iteration at a higher clock (the one after a prefill, still at max) would flatter the
        loop's clock and pull it down.
        """
        if stats.iteration_latency_s is None or not stats.generation_requests or stats.context_tokens:
            return
        if ran_at_mhz is not None and ran_at_mhz > self.decode_clock_mhz:
            return
        self._tbt_s.append(stats.iteration_latency_s)

    def _step(self) -> None:
        """Move the clock when the tail leaves the band; every move starts a fresh window."""
        if len(self._tbt_s) < self.min_samples:
            return
        ratio = float(np.percentile(self._tbt_s, self.percentile)) / self.targets.tpot_s
        top = len(self.clocks_mhz) - 1
        if ratio > 1.0:
            index = top
        elif ratio > self.upper:
            index = min(self._index + self.step_up, top)
        elif ratio < self.lower:
            index = max(self._index - self.step_down, 0)
        else:
            return
        if index != self._index:
            self._index = index
            self._tbt_s.clear()

    def _decision(self) -> Decision:
        top = len(self.clocks_mhz) - 1
        return Decision(sm_clock_mhz=None if self._index == top else self.decode_clock_mhz)
