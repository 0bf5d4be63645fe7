"""A replayable workload: requests as numpy columns, sorted by arrival, over an observation period."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.domain import Request


@dataclass(frozen=True, slots=True, eq=False)
class Workload:
    """Requests sorted by arrival, held as read-only numpy columns.

    Columns rather than `Request` objects because the week-long traces hold tens of millions of
    requests, and windows, rate scaling and statistics are then array operations. `duration_s` is
    the period the requests were observed in (a trace: first to last arrival; a window: the window),
    so rates stay right when a window's last seconds happen to be quiet.
    """

    name: str
    arrival_s: np.ndarray  # float64, seconds from the start of the period, non-decreasing
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1: the true output length
    duration_s: float  # every arrival lies in [0, duration_s]

    def __post_init__(self) -> None:
        arrival = _column(self.arrival_s, np.float64)
        prompt = _column(self.prompt_tokens, np.int64)
        output = _column(self.output_tokens, np.int64)
        if not len(arrival) == len(prompt) == len(output):
            raise ValueError(
                f"column lengths differ: {len(arrival)} arrivals, {len(prompt)} prompts,"
                f" {len(output)} outputs"
            )
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            raise ValueError(f"duration_s must be finite and >= 0, got {self.duration_s}")
        if not np.all(np.isfinite(arrival)):
            raise ValueError("arrivals must be finite")
        if not np.all(np.diff(arrival) >= 0):
            raise ValueError("arrivals must be sorted")
        if len(arrival) and not (arrival[0] >= 0 and arrival[-1] <= self.duration_s):
            raise ValueError(f"arrivals must lie in [0, duration_s={self.duration_s}]")
        if len(arrival) and min(prompt.min(), output.min()) < 1:
            raise ValueError("prompt and output lengths must be >= 1 token")
        object.__setattr__(self, "arrival_s", arrival)
        object.__setattr__(self, "prompt_tokens", prompt)
        object.__setattr__(self, "output_tokens", output)
        object.__setattr__(self, "duration_s", float(self.duration_s))

    @classmethod
    def from_arrivals(
        cls, name: str, arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray
    ) -> Workload:
        """Sort by arrival (stably: ties keep their order) and shift so the first request is at 0."""
        order = np.argsort(arrival_s, kind="stable")
        arrival = np.asarray(arrival_s, np.float64)[order]
        if len(arrival):
            arrival -= arrival[0]
        duration = float(arrival[-1]) if len(arrival) else 0.0
        return cls(
            name, arrival, np.asarray(prompt_tokens)[order], np.asarray(output_tokens)[order], duration
        )

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def mean_rate_rps(self) -> float:
        """Requests per second over the period; 0 when the period is empty."""
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def window(self, start_s: float, duration_s: float) -> Workload:
        """Keep the requests arriving in [start_s, start_s + duration_s), with start_s as time 0.

        The period is cut at the end of this workload, so a window past the end is shorter.
        """
        if not (0 <= start_s <= self.duration_s):
            raise ValueError(f"window start {start_s} s is outside [0, {self.duration_s}] s")
        if not (duration_s > 0 and math.isfinite(duration_s)):
            raise ValueError(f"window duration must be finite and > 0, got {duration_s}")
        end_s = start_s + duration_s
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s], side="left")
        return Workload(
            name=f"{self.name}[{start_s:g}s+{duration_s:g}s]",
            arrival_s=self.arrival_s[lo:hi] - start_s,
            prompt_tokens=self.prompt_tokens[lo:hi],
            output_tokens=self.output_tokens[lo:hi],
            duration_s=min(end_s, self.duration_s) - start_s,
        )

    def scale_rate(self, factor: float) -> Workload:
        """Replay `factor` times as fast: divide arrival times (and the period) by it."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"rate factor must be finite and > 0, got {factor}")
        return Workload(
            name=f"{self.name}x{factor:g}",
            arrival_s=self.arrival_s / factor,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            duration_s=self.duration_s / factor,
        )

    def requests(self, max_tokens: int | None = None) -> list[Request]:
        """Return the requests as `Request`s, with ids 0..n-1 in arrival order.

        By default each request's `max_tokens` is its true output length: the trace is replayed
        as upstream did, generating exactly the traced number of tokens. With a cap, every request
        gets `max_tokens=cap` and its output is cut to the cap, since an engine stops there.
        """
        output = self.output_tokens
        if max_tokens is None:
            limits = output
        elif max_tokens >= 1:
            output = np.minimum(output, max_tokens)
            limits = np.full(len(self), max_tokens)
        else:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return [
            Request(request_id=i, arrival_s=a, prompt_tokens=p, max_tokens=m, output_tokens=o)
            for i, (a, p, m, o) in enumerate(
                zip(
                    self.arrival_s.tolist(),
                    self.prompt_tokens.tolist(),
                    limits.tolist(),
                    output.tolist(),
                    strict=True,
                )
            )
        ]

    def describe(self) -> dict[str, str | int | float | None]:
        """Summary statistics; None where a statistic needs more requests than there are."""
        gaps = np.diff(self.arrival_s)
        return {
            "name": self.name,
            "count": len(self),
            "duration_s": self.duration_s,
            "mean_rate_rps": self.mean_rate_rps,
            "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else None,
            "prompt_p50": _percentile(self.prompt_tokens, 50),
            "prompt_p99": _percentile(self.prompt_tokens, 99),
            "output_p50": _percentile(self.output_tokens, 50),
            "output_p99": _percentile(self.output_tokens, 99),
        }


def _column(values: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    """Copy into a read-only 1-D array, so a Workload never shares mutable state with its caller."""
    column = np.array(values, dtype=dtype)
    if column.ndim != 1:
        raise ValueError(f"expected a 1-D column, got shape {column.shape}")
    column.setflags(write=False)
    return column


def _percentile(values: np.ndarray, q: float) -> float | None:
    """Return the q-th percentile (linear interpolation), or None for an empty column."""
    return float(np.percentile(values, q)) if len(values) else None
