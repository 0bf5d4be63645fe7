"""The coordinator's own port: /healthz (alive, and where sizing stands) and /metrics.

Metrics (Prometheus text format):
- `throttllem_coordinator_serving_size` — TP degree traffic goes to (0 before any);
- `throttllem_coordinator_shadow_size` — TP degree of the engine starting beside it (0: none);
- `throttllem_coordinator_draining_engines` — engines finishing their requests before they stop;
- `throttllem_coordinator_arrival_rate_rps` — the serving engine's arrival rate at the last tick;
- `throttllem_coordinator_actions_total{action,size}` — backend actions carried out;
- `throttllem_coordinator_backend_failures_total` — backend calls that failed and were retried.
The reason of each decision goes to the logs and to the action's span, not to a label.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.coordinator.service import Coordinator


class CoordinatorCollector(Collector):
    """Reads the coordinator's state at each scrape."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        """The coordinator's families."""
        status = self.coordinator.status()
        record = self.coordinator.record
        yield GaugeMetricFamily(
            "throttllem_coordinator_serving_size", "TP degree traffic goes to", value=status.serving or 0
        )
        yield GaugeMetricFamily(
            "throttllem_coordinator_shadow_size",
            "TP degree of the engine starting (0: none)",
            value=status.shadow or 0,
        )
        yield GaugeMetricFamily(
            "throttllem_coordinator_draining_engines",
            "Engines draining before they stop",
            value=len(status.draining),
        )
        rate = GaugeMetricFamily(
            "throttllem_coordinator_arrival_rate_rps", "Serving engine's arrival rate at the last tick"
        )
        if status.arrival_rate_rps is not None:
            rate.add_metric([], status.arrival_rate_rps)
        yield rate
        actions = CounterMetricFamily(
            "throttllem_coordinator_actions", "Backend actions carried out", labels=["action", "size"]
        )
        for (kind, size), count in sorted(Counter((a.kind, a.size) for _, a in record.actions).items()):
            actions.add_metric([kind, str(size)], count)
        yield actions
        yield CounterMetricFamily(
            "throttllem_coordinator_backend_failures",
            "Backend calls that failed and were retried",
            value=record.failures,
        )


def build_coordinator_app(coordinator: Coordinator) -> web.Application:
    """/healthz and /metrics."""
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))

    async def healthz(_: web.Request) -> web.Response:
        status = dataclasses.asdict(coordinator.status())
        return web.json_response({"status": "alive", **status})

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
