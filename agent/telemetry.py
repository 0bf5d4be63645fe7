"""OpenTelemetry tracing for the sidecar: OTLP over HTTP when an endpoint is configured, else off.

Configured by the standard variables (reference/interfaces.md §7), which the SDK reads itself:
`OTEL_EXPORTER_OTLP_ENDPOINT` (the `/v1/traces` path is appended) or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used verbatim) switch export on; `..._HEADERS`,
`..._TIMEOUT`, `..._COMPRESSION`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME` and `OTEL_SDK_DISABLED` are honoured. Only
http/protobuf is offered (no grpcio in a sidecar), so `OTEL_EXPORTER_OTLP_PROTOCOL` is ignored.

Spans leave through a BatchSpanProcessor: its worker thread exports off the event loop, drops
spans when its queue is full and logs export failures, so telemetry never slows or breaks
control. The provider is returned, not installed globally: callers pass it in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agent.config import Settings

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "throttllem-sidecar"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


@dataclass(frozen=True, slots=True)
class Tracing:
    """The tracer provider to pass around, and how to flush and stop it."""

    provider: trace.TracerProvider  # a no-op provider when export is off
    shutdown: Callable[[], None]  # flushes queued spans; idempotent
    endpoint: str | None  # where spans go; None: tracing is off


def setup_tracing(settings: Settings) -> Tracing:
    """The sidecar's tracing (see `tracing_for`)."""
    return tracing_for(lambda: sidecar_resource(settings))


def tracing_for(resource: Callable[[], Resource]) -> Tracing:
    """A provider exporting over OTLP/HTTP when an OTLP endpoint variable is set, else a no-op one."""
    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if endpoint is None:
        return Tracing(trace.NoOpTracerProvider(), lambda: None, None)
    provider = TracerProvider(resource=resource(), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("exporting traces over OTLP/HTTP to %s", endpoint)
    return Tracing(provider, provider.shutdown, endpoint)


def sidecar_resource(settings: Settings) -> Resource:
    """What the spans come from; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override our defaults."""
    defaults: dict[str, str | int] = {
        SERVICE_NAME: DEFAULT_SERVICE_NAME,
        "throttllem.gpu": settings.gpu,
        "throttllem.model": settings.model,
        "throttllem.tp": settings.tp,
        "throttllem.engine": settings.engine,
    }
    if settings.selected_gpu_uuids:
        defaults["hw.id"] = ",".join(settings.selected_gpu_uuids)
    return resource_with(defaults)


def resource_with(defaults: Mapping[str, str | int]) -> Resource:
    """`defaults` as a resource; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override them."""
    given = OTELResourceDetector().detect().attributes
    return Resource.create({key: value for key, value in defaults.items() if key not in given})
