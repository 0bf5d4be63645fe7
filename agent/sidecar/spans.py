"""Spans of the sidecar: one per control decision, sampled; gateway request spans ended with their energy.

Every decision that changed the clock is exported, and one in `every` of the rest (the first
included). The span covers `policy.decide` exactly: it is built from the decision's own record
(start and duration), after the fact, so tracing adds nothing to the decision's latency.

A gateway request's energy is final only at the first meter reading after it finished, so with
per-request energy on, its span is parked (`RequestSpans`) until then and ended with its real
completion time: the span's duration is the request's, and it carries the energy.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.trace import Span, Tracer
from opentelemetry.util.types import AttributeValue

from agent.sidecar.loop import DecisionRecord
from agent.sidecar.request_energy import RequestEnergy, RequestEnergyLedger

SPAN_NAME = "throttllem.decision"
ATTR_REQUEST_ENERGY_J = "throttllem.request.energy_j"  # joules charged to the request (final)
ATTR_REQUEST_TOKENS = "throttllem.request.tokens"  # prompt and output tokens it was charged for


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


class RequestSpans:
    """Gateway request spans waiting for their energy: ended when it is final, at completion time.

    Bounded as the ledger's finished requests are: each one parked is ended when the ledger
    settles it (at the next meter reading, or after `settle_within_s` at the latest).
    """

    def __init__(self, ledger: RequestEnergyLedger) -> None:
        self._ledger = ledger
        self._parked: dict[str, tuple[Span, int]] = {}  # public id -> (span, completion wall ns)

    def __len__(self) -> int:
        """Spans waiting for their energy."""
        return len(self._parked)

    def park(self, request_id: str, span: Span, end_ns: int) -> None:
        """Hold `span` (its request completed at `end_ns`) until the request's energy is final."""
        known = self._ledger.lookup(request_id)
        if known is not None and known.final:
            _end(span, end_ns, known)
        else:
            self._parked[request_id] = (span, end_ns)

    def settle(self, settled: Sequence[RequestEnergy]) -> None:
        """Energy observer: end the spans of the requests whose energy became final."""
        for energy in settled:
            parked = self._parked.pop(energy.request_id, None)
            if parked is not None:
                _end(*parked, energy)

    def end_all(self) -> None:
        """On shutdown: end every parked span, without energy (it will never be final)."""
        parked, self._parked = self._parked, {}
        for span, end_ns in parked.values():
            span.end(end_time=end_ns)


def _end(span: Span, end_ns: int, energy: RequestEnergy) -> None:
    span.set_attributes({ATTR_REQUEST_ENERGY_J: energy.energy_j, ATTR_REQUEST_TOKENS: energy.tokens})
    span.end(end_time=end_ns)
