"""DynamoLLM's instance-level frequency rule, on throttllem's core inputs (a reconstruction).

Source: Stojkovic, Zhang, Goiri, Torrellas, Choukse, "DynamoLLM: Designing LLM Inference Clusters
for Performance and Energy Efficiency", HPCA 2025 (arXiv 2408.00741). DynamoLLM controls a
cluster at three levels: instances per pool, model parallelism (re-sharding) per instance, and
the GPU frequency of each instance. The first two belong to engine sizing; this module is the
third. The paper re-evaluates each instance's frequency every few seconds (5 s) and sets the
profiled frequency of minimum energy at which the instance still meets its latency SLOs for the
load it has, falling back to the highest frequency when no profiled point does. Its code is not
public, so what follows is reconstructed from that description:

- Every `period_s` the policy looks at the resident requests (running and just arrived; it admits
  every arrival at once, as DynamoLLM's instances do) and, for each candidate clock, predicts the
  decode iteration time of that batch with the engine's IPS model and the busy board power with
  an energy profile (DynamoLLM profiles energy offline per model, parallelism and frequency).
- A clock is feasible when the predicted time between tokens meets the TPOT target and every
  resident request, at that pace, still finishes within its TPOT (and E2E, when set) budget.
- Among feasible clocks it picks the one of least predicted energy per output token
  (power x iteration time / batch); none feasible: max clock. Between re-evaluations the clock
  holds: DynamoLLM does not react per iteration.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

from agent.control.frequency import IterationTimeModel
from agent.control.policies import ControlView
from agent.control.slo import SloTargets
from agent.domain import Decision

REEVALUATION_PERIOD_S = 5.0


class PowerProfile(Protocol):
    """Busy board power of a decode iteration (all the engine's GPUs), as profiled offline."""

    def decode_power_w(self, clock_index: np.ndarray, batch: int, kv_blocks: float) -> np.ndarray:
        """Power at each of the clock indices (into the time model's candidate clocks)."""
        ...


class DynamoLlmPolicy:
    """Every `period_s`: the feasible clock of least predicted energy per token; max when none."""

    gates_admission: ClassVar[bool] = True  # it needs the resident requests' lengths; it admits all

    def __init__(
        self,
        model: IterationTimeModel,
        power: PowerProfile,
        targets: SloTargets,
        max_clock_mhz: int,
        period_s: float = REEVALUATION_PERIOD_S,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"the re-evaluation period must be positive, got {period_s}")
        self.name = "dynamollm"
        self.model = model
        self.power = power
        self.targets = targets
        self.max_clock_mhz = max_clock_mhz
        self.period_s = period_s
        self._clocks = [int(c) for c in model.clocks_mhz]
        self._clock_mhz: int | None = None  # None: max (stock)
        self._next_s = -np.inf

    def decide(self, view: ControlView) -> Decision:
        """Admit every arrival; re-choose the clock when the period is up."""
        board, limits = view.scoreboard, view.limits
        if board is None or limits is None:
            return Decision(sm_clock_mhz=None)
        admit = tuple(int(i) for i in board.queued_ids)
        if view.now_s >= self._next_s:
            self._next_s = view.now_s + self.period_s
            self._clock_mhz = self._choose(view)
        return Decision(sm_clock_mhz=self._clock_mhz, admit_request_ids=admit)

    def _choose(self, view: ControlView) -> int | None:
        board, limits = view.scoreboard, view.limits
        assert board is not None and limits is not None
        generated = np.concatenate([board.run_generated, np.zeros(board.queued)])
        predicted = np.concatenate([board.run_predicted, board.queued_predicted]).astype(float)
        if len(predicted) == 0:
            return None
        prompt = np.concatenate([board.run_prompt, board.queued_prompt])
        arrival = np.concatenate([board.run_arrival_s, board.queued_arrival_s])
        first = np.concatenate([board.run_first_token_s, np.full(board.queued, np.nan)])
        first = np.where(np.isnan(first), view.now_s, first)  # not started: its first token is near
        batch = len(predicted)
        kv_blocks = float(np.sum(np.ceil((prompt + generated) / limits.tokens_per_block)))
        indices = np.arange(len(self._clocks))
        step_s = self.model.decode_s(indices, np.array(batch), np.array(kv_blocks))
        keep = 1.0 - self.targets.margin
        left = np.maximum(predicted - np.maximum(generated, 1), 1.0)
        finish = view.now_s + step_s[:, None] * left[None, :]
        ok = step_s <= keep * self.targets.tpot_s
        ok &= (finish <= first + keep * self.targets.tpot_s * np.maximum(predicted - 1, 1)).all(axis=1)
        if self.targets.e2e_s is not None:
            ok &= (finish <= arrival + keep * self.targets.e2e_s).all(axis=1)
        if not ok.any():
            return None
        energy_per_token = self.power.decode_power_w(indices, batch, kv_blocks) * step_s / batch
        best = int(indices[ok][np.argmin(energy_per_token[ok])])
        clock = self._clocks[best]
        return None if clock >= self.max_clock_mhz else clock
