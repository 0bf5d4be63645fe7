"""The watchdog's rules: when the loop may steer, and how long it waits before trying again.

Pure: the loop passes times and counts in; nothing here reads a clock or does I/O. The rule
behind all of it is DESIGN.md's "Safety first": a locked clock outlives the process, so whenever
the loop cannot trust what it sees (telemetry stale, a tick failed, the GPU gone) the GPU goes
back to stock clocks and requests stop waiting for admission.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LoopMode(enum.Enum):
    """What the control loop is doing; every mode but CONTROLLING means stock clocks, admission open."""

    STARTING = "starting"  # no decision yet: first telemetry, or the policy is being built
    CONTROLLING = "controlling"  # the policy decides clock and admission
    STALE = "stale"  # engine telemetry too old to steer by
    FAILED = "failed"  # a tick raised; the loop restarts after a backoff


class ActuatorMode(enum.Enum):
    """What the loop does with the GPU."""

    ACTUATING = "actuating"  # sets clocks
    OBSERVING = "observing"  # dry-run: decides and records, never sets (configured, or no permission)
    LOST = "lost"  # the GPU stopped answering: nothing is set any more


@dataclass(frozen=True, slots=True)
class TelemetryTimes:
    """When the loop last saw the engine, on the loop's monotonic clock (None: never)."""

    last_ok_s: float | None  # last poll that read usable metrics (new iteration or not)
    last_new_s: float | None  # last poll that brought a new iteration
    busy_since_s: float | None  # since when requests have been in flight without a pause; None: idle


def stale_reason(now_s: float, times: TelemetryTimes, bound_s: float) -> str | None:
    """Why the telemetry is too old to steer by, or None when it is fresh.

    Stale: no usable metrics within `bound_s` (engine or endpoint down, format broken), or
    requests in flight and no new iteration within `bound_s` of the later of the last iteration
    and the start of the busy spell (engine stuck, or its metrics frozen). An idle engine runs no
    iterations, so an old iteration alone is not staleness.
    """
    if times.last_ok_s is None:
        return "no engine metrics read yet"
    age = now_s - times.last_ok_s
    if age > bound_s:
        return f"engine metrics unreadable for {age:.1f} s (bound {bound_s:g} s)"
    since = _busy_progress_s(times)
    if since is not None and now_s - since > bound_s:
        return (
            f"no new engine iteration for {now_s - since:.1f} s while requests are in flight "
            f"(bound {bound_s:g} s)"
        )
    return None


def stale_at_s(times: TelemetryTimes, bound_s: float) -> float | None:
    """When the telemetry turns stale if nothing new is read (`stale_reason`'s rules); None before any."""
    if times.last_ok_s is None:
        return None
    at = times.last_ok_s + bound_s
    since = _busy_progress_s(times)
    return at if since is None else min(at, since + bound_s)


def _busy_progress_s(times: TelemetryTimes) -> float | None:
    """Since when a busy engine has shown no new iteration (its last, or the busy spell's start)."""
    if times.busy_since_s is None:
        return None
    return times.busy_since_s if times.last_new_s is None else max(times.last_new_s, times.busy_since_s)


def stock_deadline_s(times: TelemetryTimes, bound_s: float, poll_interval_s: float) -> float | None:
    """By when the loop asks for stock if the telemetry stays silent; None before any was read.

    Half a period after it turns stale: half a period before `bound_s + poll_interval_s` is up.
    """
    stale_at = stale_at_s(times, bound_s)
    return None if stale_at is None else stale_at + poll_interval_s / 2


def call_timeout_s(
    now_s: float, times: TelemetryTimes, bound_s: float, poll_interval_s: float, at_stock: bool
) -> float:
    """How long one engine poll or GPU call may take: stock in time whatever hangs.

    While a lock may be held, a call started before the telemetry turns stale ends by
    `stock_deadline_s`, and one started later (the reset, a poll while the reset fails) gets half
    a period: the next check then finds the telemetry stale and asks for stock within
    `bound_s + poll_interval_s` of the last fresh telemetry. At stock (or before any telemetry)
    nothing needs undoing, and the bound only keeps the loop turning.
    """
    deadline = None if at_stock else stock_deadline_s(times, bound_s, poll_interval_s)
    if deadline is None:
        return bound_s
    return max(deadline - now_s, poll_interval_s / 2)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential wait before restarting a failed loop: a deterministic bug must not spin a core."""

    initial_s: float = 0.1
    max_s: float = 5.0

    def delay_s(self, failures: int) -> float:
        """Wait after the `failures`-th failure in a row (1-based)."""
        return min(self.max_s, self.initial_s * 2.0 ** max(failures - 1, 0))


def not_ready_reasons(
    mode: LoopMode, actuator: ActuatorMode, stale: str | None, policy_error: str | None
) -> list[str]:
    """Why /readyz answers 503; empty when the sidecar steers with a built policy and fresh telemetry.

    `stale` is computed when asked, from the last-fresh time, so a tick stuck in a call cannot
    keep the sidecar ready past the bound.
    """
    reasons = []
    if mode is LoopMode.STARTING:
        reasons.append("starting: no policy built yet to decide with")
    if mode is LoopMode.FAILED:
        reasons.append("the control loop failed and is restarting")
    if stale is not None:
        reasons.append(f"telemetry stale: {stale}")
    if actuator is ActuatorMode.LOST:
        reasons.append("the GPU is lost: clocks are no longer set")
    if policy_error is not None:
        reasons.append(f"the policy could not be built: {policy_error}")
    return reasons
