"""Clock policies: given what the controller sees, decide the SM clock (and, later, admission).

`max` is stock behaviour, the baseline every saving is measured against: the GPU is left
unlocked, so it boosts to its max clock when busy and idles down when not. `static:<MHz>` locks
one clock for the whole run. `agent.policy_registry` builds each of them from its name.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from agent.control.admission import EngineLimits, admissible, prefill_cost
from agent.control.frequency import IterationTimeModel, PrefillCost, lowest_feasible
from agent.control.guard import (
    DEFAULT_GUARD_CONFIG,
    GuardConfig,
    SlackObserved,
    TimePassed,
    correction,
    initial_state,
    observe,
    settle_clock,
    transition,
)
from agent.control.scoreboard import ScoreboardView
from agent.control.slo import SloTargets
from agent.domain import Decision, EngineStats, GpuSpec


@dataclass(frozen=True, slots=True)
class ControlView:
    """Everything a policy may look at for one decision."""

    now_s: float  # time of the decision (virtual or wall clock), seconds
    gpu: GpuSpec
    stats: EngineStats | None  # latest engine snapshot; None before the first one
    limits: EngineLimits | None = None  # what the engine can hold
    scoreboard: ScoreboardView | None = None  # only for policies that gate admission
    last_clock_mhz: int | None = None  # SM clock the latest iteration ran at


class Policy(Protocol):
    """Decides the clock for the next control period; pure: no I/O, no clock reads."""

    @property
    def name(self) -> str:
        """Stable label used in reports."""
        ...

    @property
    def gates_admission(self) -> bool:
        """Whether it admits queued requests itself (its view needs a scoreboard of predicted lengths).

        A policy that does not lets every arrival straight into the engine, as stock Triton does.
        """
        ...

    def decide(self, view: ControlView) -> Decision:
        """The clock (None = stock) and the queued requests to admit."""
        ...


@dataclass(frozen=True, slots=True)
class MaxPolicy:
    """Stock GPU behaviour: never lock the clock."""

    name: str = "max"
    gates_admission: ClassVar[bool] = False

    def decide(self, view: ControlView) -> Decision:
        """Leave the GPU unlocked."""
        return Decision(sm_clock_mhz=None)


@dataclass(frozen=True, slots=True)
class StaticPolicy:
    """Lock one SM clock for the whole run."""

    clock_mhz: int
    gates_admission: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """Label with the clock, e.g. ``static:1050``."""
        return f"static:{self.clock_mhz}"

    def decide(self, view: ControlView) -> Decision:
        """Always the same clock."""
        return Decision(sm_clock_mhz=self.clock_mhz)


MAX_PREFILL_SHARE = 0.9  # cap on the share of time arriving prefills are assumed to take


class ThrottllemPolicy:
    """throttLL'eM: admit what keeps every SLO at max clock, then run at the lowest safe clock.

    Every decision: (1) compare the last iteration's measured time with what the model predicted
    for it and update the guard's correction; (2) admit the longest prefix of the queue that keeps
    KV and SLOs at max clock; (3) find the lowest clock whose projected timeline keeps every
    request's slack non-negative, with predictions inflated by the correction; (4) let the guard
    apply boost, hysteresis and the switch budget. A request that cannot meet its SLO even at max
    clock ("lost") sends the GPU to max clock until it finishes, as the paper does.

    Beyond the paper: requests that will arrive while the current ones decode bring prefills
    that stall every decode. The policy measures the recent rate of prompt tokens and stretches
    the projected decode time by 1 / (1 - share of time those prefills take at each clock).
    """

    gates_admission: ClassVar[bool] = True

    def __init__(
        self,
        model: IterationTimeModel,
        targets: SloTargets,
        max_clock_mhz: int,
        guard_config: GuardConfig = DEFAULT_GUARD_CONFIG,
        name: str = "throttllem",
        correct: bool = True,
        search: str = "two-level",
        arrival_window_s: float = 30.0,
    ) -> None:
        self.model = model
        self.targets = targets
        self.max_clock_mhz = max_clock_mhz
        self.name = name
        self.correct = correct  # an exact model (throttllem-exact): it needs no correction
        self.search = search
        self.guard = initial_state(max_clock_mhz, guard_config)
        clocks = model.clocks_mhz.astype(int)
        self._clocks = [int(c) for c in clocks]
        _, self._band_first_clock, self._band_index = np.unique(
            clocks // guard_config.band_width_mhz, return_index=True, return_inverse=True
        )
        self.last_min_slack_s: float | None = None
        self.arrival_window_s = arrival_window_s
        self._arrivals: deque[tuple[float, int]] = deque()  # (arrival time, prompt tokens)
        self._last_arrival_s = -math.inf
        self._window_tokens = 0  # prompt tokens of the requests in `_arrivals`

    def _observe(self, view: ControlView) -> None:
        stats, clock = view.stats, view.last_clock_mhz
        if not self.correct or stats is None or clock is None or stats.iteration_latency_s is None:
            return
        if clock not in self._clocks:
            return  # ran at a clock outside the model's candidates (e.g. before the first lock)
        index = self._clocks.index(clock)
        if stats.context_tokens:
            predicted = float(
                self.model.prefill_s(stats.scheduled_requests, stats.kv_blocks_used, stats.context_tokens)[
                    index
                ]
            )
        else:
            predicted = float(
                self.model.decode_s(
                    np.array(index), np.array(stats.generation_requests), np.array(stats.kv_blocks_used)
                )
            )
        self.guard = observe(self.guard, clock, predicted, stats.iteration_latency_s)

    def _corrections(self) -> np.ndarray:
        if not self.correct:
            return np.ones(len(self._clocks))
        per_band = np.array([correction(self.guard, self._clocks[i]) for i in self._band_first_clock])
        return per_band[self._band_index]

    def record_arrivals(self, arrival_s: np.ndarray, prompt_tokens: np.ndarray) -> None:
        """Remember requests seen arriving (in time order) for the prompt-token rate."""
        for arrival, prompt in zip(arrival_s, prompt_tokens, strict=True):
            self._arrivals.append((float(arrival), int(prompt)))
            self._window_tokens += int(prompt)
        if len(arrival_s):
            self._last_arrival_s = max(self._last_arrival_s, float(np.max(arrival_s)))

    def _prefill_stretch(self, board: ScoreboardView, now_s: float, prefill: PrefillCost) -> np.ndarray:
        """Per clock: how much arriving prefills will slow the projected decodes."""
        fresh = board.queued_arrival_s > self._last_arrival_s
        self.record_arrivals(board.queued_arrival_s[fresh], board.queued_prompt[fresh])
        while self._arrivals and self._arrivals[0][0] < now_s - self.arrival_window_s:
            self._window_tokens -= self._arrivals.popleft()[1]
        if not self._arrivals:
            return np.ones(len(self._clocks))
        span = max(now_s - self._arrivals[0][0], 1.0)
        busy = np.minimum(self._window_tokens / span * prefill.per_token_s, MAX_PREFILL_SHARE)
        return 1.0 / (1.0 - busy)

    def decide(self, view: ControlView) -> Decision:
        """Admissions and the clock for the next iteration."""
        board, limits = view.scoreboard, view.limits
        if board is None or limits is None:
            return Decision(sm_clock_mhz=None)
        self._observe(view)
        prefill = prefill_cost(self.model, board, limits)
        corr = self._corrections() * self._prefill_stretch(board, view.now_s, prefill)
        admission = admissible(self.model, self.targets, board, view.now_s, limits, corr, prefill)
        if board.running + admission.count == 0:
            self.guard = transition(self.guard, TimePassed(view.now_s))
            self.last_min_slack_s = None
            return Decision(sm_clock_mhz=None)
        top_slack = admission.top_slack_s
        choice = (
            None
            if (top_slack < 0).any()
            else lowest_feasible(self.model, self.targets, admission.situation, corr, self.search, top_slack)
        )
        proposed = (
            self.max_clock_mhz
            if choice is None or choice.clock_index is None
            else self._clocks[choice.clock_index]
        )
        self.last_min_slack_s = None if choice is None else choice.min_slack_s
        self.guard = transition(self.guard, SlackObserved(view.now_s, self.last_min_slack_s))
        clock, self.guard = settle_clock(self.guard, proposed, view.now_s)
        return Decision(
            sm_clock_mhz=None if clock >= self.max_clock_mhz else clock,
            admit_request_ids=tuple(int(i) for i in board.queued_ids[: admission.count]),
        )


class ReactivePolicy:
    """Feedback on what is measured, no prediction: the strongest simple baseline.

    Tracks an exponentially weighted mean of decode iteration times (the time between tokens
    every decoding request sees). Below `low` × target it proposes one clock step down; above
    `high` × target, or when requests wait, it proposes max clock. The guard's hysteresis and
    switch budget smooth the proposals. It admits every request at once, like a stock server.
    """

    gates_admission: ClassVar[bool] = False

    def __init__(
        self,
        targets: SloTargets,
        clocks_mhz: tuple[int, ...],
        guard_config: GuardConfig = DEFAULT_GUARD_CONFIG,
        low: float = 0.6,
        high: float = 0.85,
        smoothing: float = 0.2,
    ) -> None:
        self.name = "reactive"
        self.targets = targets
        self._clocks = sorted(clocks_mhz)
        self.low, self.high, self.smoothing = low, high, smoothing
        self.guard = initial_state(self._clocks[-1], guard_config)
        self._tbt_s: float | None = None
        self._index = len(self._clocks) - 1

    def decide(self, view: ControlView) -> Decision:
        """One step down when comfortably fast, straight to max when slow or queueing."""
        stats = view.stats
        if stats is None or stats.iteration_latency_s is None:
            return Decision(sm_clock_mhz=None)
        if stats.generation_requests and not stats.context_tokens:
            sample = stats.iteration_latency_s
            self._tbt_s = (
                sample if self._tbt_s is None else self._tbt_s + self.smoothing * (sample - self._tbt_s)
            )
        target = self.targets.tpot_s
        waiting = (stats.queued_requests or 0) + (stats.active_requests - stats.scheduled_requests)
        if self._tbt_s is None or self._tbt_s > self.high * target or waiting > 0:
            self._index = len(self._clocks) - 1
        elif self._tbt_s < self.low * target:
            self._index = max(self._index - 1, 0)
        clock, self.guard = settle_clock(self.guard, self._clocks[self._index], view.now_s)
        return Decision(sm_clock_mhz=None if clock >= self._clocks[-1] else clock)
