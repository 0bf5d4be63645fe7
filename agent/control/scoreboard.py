"""The scoreboard: every request the controller answers for, queued or running.

Kept as slot arrays so a snapshot for a decision is a handful of numpy slices (the decision runs
every engine iteration). The shell reports what it sees — arrivals (with a predicted total
length), admissions, first tokens, tokens, completions — and never reads a clock here: every
time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.domain import Request

QUEUED, RUNNING = 1, 2


@dataclass(frozen=True, slots=True)
class ScoreboardView:
    """Running and queued requests at one instant (queued in arrival order)."""

    run_ids: np.ndarray  # int64
    run_arrival_s: np.ndarray
    run_prompt: np.ndarray  # prompt tokens
    run_generated: np.ndarray  # output tokens produced so far
    run_predicted: np.ndarray  # predicted total output tokens (>= 1)
    run_max_tokens: np.ndarray
    run_first_token_s: np.ndarray  # NaN until the first token
    queued_ids: np.ndarray
    queued_arrival_s: np.ndarray
    queued_prompt: np.ndarray
    queued_predicted: np.ndarray
    queued_max_tokens: np.ndarray

    @property
    def running(self) -> int:
        """Requests admitted and not finished."""
        return len(self.run_ids)

    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        return len(self.queued_ids)


def _grown(array: np.ndarray, grow: int, fill: float) -> np.ndarray:
    """`array` with `grow` more elements of `fill`, same dtype."""
    return np.concatenate([array, np.full(grow, fill, dtype=array.dtype)])


class Scoreboard:
    """Requests by slot; grows as needed, reuses freed slots."""

    def __init__(self, capacity: int = 512) -> None:
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        self._arrivals = 0
        self._state = np.zeros(0, dtype=np.int8)
        self._ids = np.zeros(0, dtype=np.int64)
        self._order = np.zeros(0, dtype=np.int64)  # arrival order, for FCFS
        self._arrival = np.zeros(0, dtype=np.float64)
        self._prompt = np.zeros(0, dtype=np.int64)
        self._generated = np.zeros(0, dtype=np.int64)
        self._predicted = np.zeros(0, dtype=np.int64)
        self._max_tokens = np.zeros(0, dtype=np.int64)
        self._first_token = np.zeros(0, dtype=np.float64)
        self._decoding = np.zeros(0, dtype=np.bool_)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        """Grow every slot array to `capacity`, new slots empty and free."""
        old = len(self._state)
        grow = capacity - old
        self._state = _grown(self._state, grow, 0)
        self._ids = _grown(self._ids, grow, -1)
        self._order = _grown(self._order, grow, 0)
        self._arrival = _grown(self._arrival, grow, 0.0)
        self._prompt = _grown(self._prompt, grow, 0)
        self._generated = _grown(self._generated, grow, 0)
        self._predicted = _grown(self._predicted, grow, 1)
        self._max_tokens = _grown(self._max_tokens, grow, 1)
        self._first_token = _grown(self._first_token, grow, np.nan)
        self._decoding = _grown(self._decoding, grow, False)
        self._free.extend(range(old, capacity)[::-1])

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._slot

    def add_queued(self, request: Request, predicted_tokens: int) -> None:
        """A request arrived; `predicted_tokens` is the length predictor's total output."""
        if request.request_id in self._slot:
            raise ValueError(f"request {request.request_id} is already on the scoreboard")
        if not self._free:
            self._allocate(2 * len(self._state))
        slot = self._free.pop()
        self._slot[request.request_id] = slot
        self._state[slot] = QUEUED
        self._ids[slot] = request.request_id
        self._order[slot] = self._arrivals
        self._arrivals += 1
        self._arrival[slot] = request.arrival_s
        self._prompt[slot] = request.prompt_tokens
        self._generated[slot] = 0
        self._predicted[slot] = max(1, min(predicted_tokens, request.max_tokens))
        self._max_tokens[slot] = request.max_tokens
        self._first_token[slot] = np.nan
        self._decoding[slot] = False

    def admit(self, request_id: int) -> None:
        """The request entered the engine."""
        self._state[self._slot[request_id]] = RUNNING

    def first_token(self, request_id: int, time_s: float) -> None:
        """The request's prefill finished and produced its first output token."""
        slot = self._slot[request_id]
        self._first_token[slot] = time_s
        self._generated[slot] = 1
        self._decoding[slot] = True

    def add_tokens(self, request_id: int, tokens: int = 1) -> None:
        """Tokens streamed for one request (the live gateway's view)."""
        self._generated[self._slot[request_id]] += tokens

    def decode_step(self) -> None:
        """Every decoding request produced one token (the twin's iteration, in one vector op)."""
        self._generated[self._decoding] += 1

    def finish(self, request_id: int) -> None:
        """The request completed or failed: forget it."""
        slot = self._slot.pop(request_id)
        self._state[slot] = 0
        self._decoding[slot] = False
        self._ids[slot] = -1
        self._free.append(slot)

    def view(self) -> ScoreboardView:
        """A snapshot for one decision."""
        running = np.flatnonzero(self._state == RUNNING)
        queued = np.flatnonzero(self._state == QUEUED)
        queued = queued[np.argsort(self._order[queued], kind="stable")]
        return ScoreboardView(
            run_ids=self._ids[running],
            run_arrival_s=self._arrival[running],
            run_prompt=self._prompt[running],
            run_generated=self._generated[running],
            run_predicted=self._predicted[running],
            run_max_tokens=self._max_tokens[running],
            run_first_token_s=self._first_token[running],
            queued_ids=self._ids[queued],
            queued_arrival_s=self._arrival[queued],
            queued_prompt=self._prompt[queued],
            queued_predicted=self._predicted[queued],
            queued_max_tokens=self._max_tokens[queued],
        )
