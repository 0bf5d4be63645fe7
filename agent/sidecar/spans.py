"""One OpenTelemetry span per control decision, sampled so a 10 Hz loop does not flood the collector.

Every decision that changed the clock is exported, and one in `every` of the rest (the first
included). The span covers `policy.decide` exactly: it is built from the decision's own record
(start and duration), after the fact, so tracing adds nothing to the decision's latency.
"""

from __future__ import annotations

from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from agent.sidecar.loop import DecisionRecord

SPAN_NAME = "throttllem.decision"


def decision_attributes(record: DecisionRecord) -> dict[str, AttributeValue]:
    """The span's attributes; unknown values are left out (OpenTelemetry has no null)."""
    known: dict[str, AttributeValue | None] = {
        "throttllem.policy": record.policy,
        "throttllem.sm_clock_mhz": record.sm_clock_mhz,
        "throttllem.clock_locked": record.sm_clock_mhz is not None,
        "throttllem.clock_changed": record.clock_changed,
        "throttllem.decision_s": record.decision_s,
        "throttllem.predicted_ips": record.predicted_ips,
        "throttllem.measured_ips": record.measured_ips,
        "throttllem.min_slack_s": record.min_slack_s,
        "throttllem.batch": record.batch,
        "throttllem.kv_blocks_used": record.kv_blocks_used,
        "throttllem.kv_blocks_max": record.kv_blocks_max,
        "throttllem.guard_mode": record.guard_mode,
        "throttllem.requests_running": record.running,
        "throttllem.requests_queued": record.queued,
        "throttllem.requests_admitted": record.admitted,
    }
    return {key: value for key, value in known.items() if value is not None}


class DecisionSpans:
    """A loop observer that turns sampled decisions into spans."""

    def __init__(self, tracer: Tracer, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._tracer = tracer
        self._every = every
        self._seen = 0

    def __call__(self, record: DecisionRecord) -> None:
        """Export `record` if it changed the clock or its turn in the sample has come."""
        self._seen += 1
        if not record.clock_changed and (self._seen - 1) % self._every:
            return
        span = self._tracer.start_span(
            SPAN_NAME, start_time=record.wall_ns, attributes=decision_attributes(record)
        )
        span.end(end_time=record.wall_ns + round(record.decision_s * 1e9))
