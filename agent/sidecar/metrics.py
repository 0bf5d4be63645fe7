"""The sidecar's Prometheus metrics, on a registry of its own.

Everything but the decision-latency histogram is read at scrape time from what the loop, the
tracker and the energy sampler already keep (one custom collector), so the hot path only does
one `Histogram.observe` per decision. Unknown values (no decision yet, no meter) are left out
rather than exported as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from agent.sidecar.energy import EnergySampler
from agent.sidecar.loop import ControlLoop, DecisionRecord
from agent.sidecar.request_energy import LabelCap, RequestEnergy, RequestEnergyLedger
from agent.sidecar.tracker import RequestTracker
from agent.sidecar.watchdog import ActuatorMode, LoopMode

if TYPE_CHECKING:
    from agent.sidecar.gateway import Gateway

# A decision takes ~0.1-2 ms (make bench): buckets resolve the sub-millisecond range.
DECISION_BUCKETS_S = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1)
# A request's energy: ~0.1 J (a few tokens in a full batch) to ~10 kJ (minutes alone on a TP8
# engine); half-decade steps keep the series few, since model and tenant multiply them.
REQUEST_ENERGY_BUCKETS_J = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4)


class SidecarMetrics:
    """The registry /metrics serves, and the loop observer that feeds its histogram."""

    def __init__(
        self,
        loop: ControlLoop,
        tracker: RequestTracker,
        energy: EnergySampler,
        info: Mapping[str, str],
        output_tokens: Callable[[], int | None] = lambda: None,
        *,
        gateway: Gateway | None = None,
    ) -> None:
        if gateway is not None:
            stats = gateway.stats
            output_tokens = lambda: stats.streamed_tokens + stats.body_tokens  # noqa: E731
        self.registry = CollectorRegistry()
        self.decision_seconds = Histogram(
            "throttllem_decision_seconds",
            "Time one policy decision takes (pure CPU, on the event loop)",
            buckets=DECISION_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(loop, tracker, energy, dict(info), output_tokens))
        if gateway is not None:
            self.registry.register(_GatewayCollector(gateway))

    def observe(self, record: DecisionRecord) -> None:
        """Loop observer: count the decision's latency."""
        self.decision_seconds.observe(record.decision_s)

    def add_request_energy(self, ledger: RequestEnergyLedger, max_label_values: int) -> RequestEnergyMetrics:
        """Export per-request energy: its histogram and totals; the histogram's energy observer."""
        self.registry.register(_RequestEnergyCollector(ledger))
        return RequestEnergyMetrics(self.registry, max_label_values)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class RequestEnergyMetrics:
    """`throttllem_request_energy_joules{model, tenant}`, observed as each request's energy is final.

    `model` and `tenant` each take at most `max_label_values` distinct values; later ones are
    reported as "other", so hostile clients cannot grow the series without bound.
    """

    def __init__(self, registry: CollectorRegistry, max_label_values: int) -> None:
        self.histogram = Histogram(
            "throttllem_request_energy_joules",
            "GPU energy charged to each request, in proportion to its tokens, once final",
            ["model", "tenant"],
            buckets=REQUEST_ENERGY_BUCKETS_J,
            registry=registry,
        )
        self._models, self._tenants = LabelCap(max_label_values), LabelCap(max_label_values)

    def __call__(self, settled: Sequence[RequestEnergy]) -> None:
        """Energy observer: one sample per request that processed tokens."""
        for energy in settled:
            if energy.tokens > 0:
                labels = self._models.label(energy.model), self._tenants.label(energy.tenant)
                self.histogram.labels(*labels).observe(energy.energy_j)


class _SnapshotCollector:
    """Reads the loop, tracker and meter state at scrape time."""

    def __init__(
        self,
        loop: ControlLoop,
        tracker: RequestTracker,
        energy: EnergySampler,
        info: dict[str, str],
        output_tokens: Callable[[], int | None],
    ) -> None:
        self._loop = loop
        self._tracker = tracker
        self._energy = energy
        self._info = info
        self._output_tokens = output_tokens

    def collect(self) -> Iterator[Metric]:
        """Every family, from the current state."""
        loop, tracker, energy = self._loop, self._tracker, self._energy
        status = loop.status()
        decision = loop.last_decision
        counters, requests = loop.counters, tracker.counters

        yield InfoMetricFamily(
            "throttllem_sidecar",
            "What this sidecar runs: policy, actuator, engine",
            value={**self._info, "policy": status.policy_spec, "actuator": status.actuator},
        )
        yield StateSetMetricFamily(
            "throttllem_loop_mode",
            "Control loop mode (all but controlling mean stock clocks and open admission)",
            value={mode.value: mode is status.mode for mode in LoopMode},
        )
        yield StateSetMetricFamily(
            "throttllem_actuator_mode",
            "Whether clocks are set (actuating), only recorded (observing) or the GPU is lost",
            value={mode.value: mode is status.actuator_mode for mode in ActuatorMode},
        )
        stock = status.locked_mhz is None
        yield GaugeMetricFamily(
            "throttllem_sm_clock_mhz",
            "SM clock the sidecar locked (dry-run: would have locked); the max clock when at stock",
            value=loop.gpu.max_clock_mhz if stock else status.locked_mhz,
        )
        yield GaugeMetricFamily(
            "throttllem_clock_locked", "1 when an SM clock lock is set", value=0 if stock else 1
        )
        yield _gauge(
            "throttllem_predicted_ips",
            "Predicted iterations/s at the chosen clock",
            decision,
            "predicted_ips",
        )
        yield _gauge("throttllem_measured_ips", "Engine iterations/s, measured", decision, "measured_ips")
        yield _gauge(
            "throttllem_min_slack_seconds",
            "Least projected SLO slack of any request",
            decision,
            "min_slack_s",
        )
        yield _gauge("throttllem_batch_size", "Requests in the engine's latest iteration", decision, "batch")
        yield _gauge("throttllem_kv_blocks_used", "KV-cache blocks in use", decision, "kv_blocks_used")
        yield GaugeMetricFamily(
            "throttllem_requests_held", "Requests waiting for admission", value=tracker.held
        )
        yield GaugeMetricFamily(
            "throttllem_requests_in_flight", "Requests admitted and not finished", value=tracker.in_flight
        )
        for name, value, text in (
            ("throttllem_requests_arrived", requests.arrived, "Requests that reached the gateway"),
            ("throttllem_requests_admitted", requests.admitted, "Requests admitted to the engine"),
            (
                "throttllem_requests_hold_timeouts",
                requests.admitted_on_timeout,
                "Requests sent after max_hold_s",
            ),
            ("throttllem_requests_rejected", requests.rejected, "Requests refused with 429: hold queue full"),
            ("throttllem_requests_completed", requests.completed, "Requests finished successfully"),
            ("throttllem_requests_failed", requests.failed, "Requests that failed or were abandoned"),
            (
                "throttllem_clock_changes",
                counters.clock_changes,
                "Clock locks and resets that changed the GPU",
            ),
            (
                "throttllem_loop_restarts",
                counters.loop_restarts,
                "Control ticks that failed (loop restarted)",
            ),
            (
                "throttllem_telemetry_stale_episodes",
                counters.stale_episodes,
                "Times engine telemetry went stale",
            ),
            ("throttllem_actuator_errors", counters.actuator_errors, "GPU clock calls that failed"),
            ("throttllem_engine_restarts", status.engine_restarts, "Engine restarts seen"),
            ("throttllem_energy_meter_errors", energy.errors, "Energy meter reads that failed"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "throttllem_telemetry_stale",
            "1 while engine telemetry is too old to steer by (clocks at stock, admission open)",
            value=0 if status.stale_reason is None else 1,
        )
        energy_j, tokens = energy.energy_j, self._output_tokens()
        energy_family = CounterMetricFamily(
            "throttllem_energy_joules", "GPU energy since the sidecar started"
        )
        tokens_family = CounterMetricFamily(
            "throttllem_output_tokens", "Output tokens streamed through the gateway"
        )
        per_joule = GaugeMetricFamily("throttllem_tokens_per_joule", "Output tokens per joule since start")
        power = GaugeMetricFamily("throttllem_power_watts", "GPU board power")
        if energy_j is not None:
            energy_family.add_metric([], energy_j)
        if tokens is not None:
            tokens_family.add_metric([], tokens)
        if energy_j and tokens is not None:
            per_joule.add_metric([], tokens / energy_j)
        if energy.power_w is not None:
            power.add_metric([], energy.power_w)
        yield from (energy_family, tokens_family, per_joule, power)


class _GatewayCollector:
    """The gateway's outcome counters, its connections and the request bodies it holds.

    Labels stay bounded: `route` is a route template or `passthrough`, `outcome` an Outcome,
    `status` one the gateway answers itself (400, 403, 405, 408, 413, 429, 503).
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """Every gateway family, from its current counters."""
        gateway = self._gateway
        stats = gateway.stats
        requests = CounterMetricFamily(
            "throttllem_gateway_requests",
            "Requests through the gateway, by route and outcome",
            labels=["route", "outcome"],
        )
        for (route, outcome), count in sorted(stats.requests.items()):
            requests.add_metric([route, outcome], count)
        answered = CounterMetricFamily(
            "throttllem_gateway_refusals",
            "Requests the gateway answered itself instead of forwarding, by status",
            labels=["status"],
        )
        for status, count in sorted(stats.rejected.items()):
            answered.add_metric([str(status)], count)
        yield from (requests, answered)
        yield CounterMetricFamily(
            "throttllem_gateway_upstream_errors",
            "Engine unreachable, timed out or broken mid-answer",
            value=stats.upstream_errors,
        )
        yield CounterMetricFamily(
            "throttllem_gateway_client_disconnects",
            "Clients that left before their answer was whole",
            value=stats.client_disconnects,
        )
        yield GaugeMetricFamily(
            "throttllem_gateway_body_bytes",
            "Request body bytes the gateway holds now",
            value=gateway.bodies.used_bytes,
        )
        yield GaugeMetricFamily(
            "throttllem_gateway_body_bytes_peak",
            "Most request body bytes the gateway held at once since start",
            value=gateway.bodies.peak_bytes,
        )
        connections = gateway.connections
        if connections is not None:
            yield GaugeMetricFamily(
                "throttllem_gateway_connections",
                "Client connections the gateway holds",
                value=connections.open,
            )
            yield CounterMetricFamily(
                "throttllem_gateway_connections_refused",
                "Connections over THROTTLLEM_GATEWAY_MAX_CONNECTIONS, answered 503 and closed",
                value=connections.refused,
            )
            yield CounterMetricFamily(
                "throttllem_gateway_header_timeouts",
                "Connections closed because a request head took longer than its timeout",
                value=connections.header_timeouts,
            )


class _RequestEnergyCollector:
    """The meter's energy as charged to requests, and what no request was charged (idle)."""

    def __init__(self, ledger: RequestEnergyLedger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        """Both totals, from the ledger."""
        yield CounterMetricFamily(
            "throttllem_energy_attributed_joules",
            "GPU energy charged to requests in proportion to their tokens",
            value=self._ledger.attributed_j,
        )
        yield CounterMetricFamily(
            "throttllem_energy_idle_joules",
            "GPU energy of meter intervals in which no request processed a token",
            value=self._ledger.idle_j,
        )


def _gauge(name: str, documentation: str, decision: DecisionRecord | None, field: str) -> GaugeMetricFamily:
    """A gauge from the last decision's `field`; no sample when it is unknown."""
    family = GaugeMetricFamily(name, documentation)
    value = None if decision is None else getattr(decision, field)
    if value is not None:
        family.add_metric([], float(value))
    return family
