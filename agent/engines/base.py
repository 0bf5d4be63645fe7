"""What every engine adapter offers the sidecar, and the errors it reports.

An adapter turns one engine's telemetry (Triton metrics, trtllm-serve iteration stats, vLLM
metrics) into `EngineStats`, one iteration at a time. `poll()` returns the newest iteration since
the last poll, or None when there is none; `health` says whether the adapter can currently see
the engine, so the sidecar can fall back to stock clocks when it cannot.

Errors, grouped by what the operator should do::

    EngineError                   the engine view is stale this tick; the sidecar goes to max clock
    ├── EngineUnavailableError    connection refused, timeout, HTTP error: transient, retry next tick
    ├── MalformedMetricsError     the response is not the format we parse: wrong URL or engine version
    ├── MissingMetricsError       parsed, but a family EngineStats needs is absent: deployment setting
    └── EngineConfigError         the adapter's settings do not match the engine (model selection)

`poll()` raises all of them except `MissingMetricsError`, which is a steady property of a
deployment rather than a failed poll: it returns None and reports the error in `health`.

Plausibility: a count an engine reports is refused (`MalformedMetricsError`) unless it is finite,
not negative and within what hardware can hold: `MAX_COUNT` (2^31) for what one iteration or
one KV-cache holds (requests, blocks, tokens), `MAX_COUNTER` (2^53, where float64 exporters stop
counting exactly) for what accumulates since the engine started (iterations, token totals,
bytes, timestamps). A 2^31-block KV cache would take terabytes even at one token per block, and
the policy build then still runs; 1e300 would not.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.domain import EngineStats

MAX_COUNT = 2**31  # requests, KV blocks, tokens in one iteration or one cache: nothing physical holds more
MAX_COUNTER = 2**53  # cumulative counters, bytes and timestamps: float64 counts exactly up to here
MAX_ITERATION_S = 3600.0  # an iteration slower than an hour is a broken record, not a slow engine


class EngineError(Exception):
    """An adapter could not produce a view of the engine this poll."""


class EngineUnavailableError(EngineError):
    """The engine's endpoint could not be reached or answered with an HTTP error."""


class MalformedMetricsError(EngineError):
    """The endpoint answered, but not in the format this adapter parses."""


class MissingMetricsError(EngineError):
    """The metrics parse, but families (or series) that `EngineStats` needs are absent."""

    def __init__(self, missing: tuple[str, ...], hint: str) -> None:
        self.missing = missing  # family names, or `family{label="value"}` for one absent series
        super().__init__(f"missing {', '.join(missing)}: {hint}")


class EngineConfigError(EngineError):
    """The adapter's settings do not select exactly one engine/model in the metrics."""


def plausible(stats: EngineStats) -> EngineStats:
    """`stats` itself, or `MalformedMetricsError` naming every field outside the bounds above.

    Every adapter passes what it built through here, so no count an engine got wrong (or an
    attacker wrote into a metrics page) reaches the policy, whichever field it came through.
    """
    bounds = {
        "timestamp_s": MAX_COUNTER,
        "iteration": MAX_COUNTER,
        "active_requests": MAX_COUNT,
        "queued_requests": MAX_COUNT,
        "scheduled_requests": MAX_COUNT,
        "context_requests": MAX_COUNT,
        "generation_requests": MAX_COUNT,
        "paused_requests": MAX_COUNT,
        "context_tokens": MAX_COUNT,
        "kv_blocks_used": MAX_COUNT,
        "kv_blocks_max": MAX_COUNT,
        "tokens_per_block": MAX_COUNT,
        "iteration_latency_s": MAX_ITERATION_S,
    }
    wrong = [
        f"{name}={value!r:.40}"
        for name, limit in bounds.items()
        if (value := getattr(stats, name)) is not None and not 0 <= value <= limit  # NaN fails too
    ]
    if wrong:
        raise MalformedMetricsError(
            f"implausible engine statistics ({', '.join(wrong)}): counts must be finite, >= 0 and at most "
            f"{MAX_COUNT} per iteration ({MAX_COUNTER} cumulative); check the engine and its exporter"
        )
    return stats


@dataclass(frozen=True, slots=True)
class AdapterHealth:
    """How well an adapter sees its engine; times are on the adapter's monotonic clock."""

    last_success_s: float | None  # last poll that read usable metrics (new iteration or not)
    last_new_stats_s: float | None  # last poll that returned a new iteration
    consecutive_failures: int  # polls in a row that raised or found essential metrics missing
    last_error: EngineError | None  # most recent failure; kept after recovery, for diagnosis
    restarts: int  # engine restarts seen (iteration counter went backwards)

    @property
    def healthy(self) -> bool:
        """True once a poll has succeeded and none has failed since."""
        return self.last_success_s is not None and self.consecutive_failures == 0


class EngineAdapter(Protocol):
    """The sidecar's view of one engine."""

    @property
    def name(self) -> str:
        """Engine kind and endpoint, for logs."""
        ...

    @property
    def health(self) -> AdapterHealth:
        """A snapshot of the adapter's health."""
        ...

    async def poll(self) -> EngineStats | None:
        """The newest iteration since the last poll; None when there is none."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class IterationChange(enum.Enum):
    """How an observed iteration relates to the previous one."""

    NEW = "new"
    SAME = "same"
    RESTART = "restart"


class IterationTracker:
    """Tells a new iteration from a repeat and from an engine restart.

    Engines number iterations from 0 at start, so a counter that goes backwards means a new engine
    process. `marker` (the engine's own timestamp, where it has one) catches a restarted engine
    that happens to reach the very iteration number seen before.
    """

    def __init__(self) -> None:
        self._last: tuple[int, float | None] | None = None
        self.restarts = 0  # restarts seen since this tracker was made

    def observe(self, iteration: int, marker: float | None = None) -> IterationChange:
        """Classify `iteration` and remember it."""
        last = self._last
        self._last = (iteration, marker)
        if last is None or iteration > last[0]:
            return IterationChange.NEW
        if iteration == last[0] and (marker is None or last[1] is None or marker == last[1]):
            return IterationChange.SAME
        self.restarts += 1
        return IterationChange.RESTART


class HealthTracker:
    """Keeps `AdapterHealth` and logs changes once, not on every poll of a lasting condition."""

    def __init__(self, name: str, logger: logging.Logger, clock: Callable[[], float] = time.monotonic):
        self._name = name
        self._log = logger
        self._clock = clock
        self._last_success_s: float | None = None
        self._last_new_stats_s: float | None = None
        self._failures = 0
        self._last_error: EngineError | None = None

    def succeeded(self, *, new_stats: bool) -> None:
        """Record a poll that read usable metrics."""
        now = self._clock()
        if self._failures:
            self._log.info(
                "%s: engine metrics readable again after %d failed polls", self._name, self._failures
            )
        self._failures = 0
        self._last_success_s = now
        if new_stats:
            self._last_new_stats_s = now

    def failed(self, error: EngineError) -> None:
        """Record a failed poll; warn when the failure is new or differs from the previous one."""
        changed = self._failures == 0 or str(error) != str(self._last_error)
        self._log.log(logging.WARNING if changed else logging.DEBUG, "%s: %s", self._name, error)
        self._failures += 1
        self._last_error = error

    def snapshot(self, restarts: int) -> AdapterHealth:
        """The current health, with the restart count kept by the caller's `IterationTracker`."""
        return AdapterHealth(
            last_success_s=self._last_success_s,
            last_new_stats_s=self._last_new_stats_s,
            consecutive_failures=self._failures,
            last_error=self._last_error,
            restarts=restarts,
        )
