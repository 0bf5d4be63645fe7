"""Decision spans reach an OTLP/HTTP receiver, sampled, with the standard OTEL_* variables honoured."""

import asyncio

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.config import Settings
from agent.sidecar.loop import DecisionRecord
from agent.sidecar.request_energy import RequestEnergyLedger
from agent.sidecar.spans import (
    ATTR_REQUEST_ENERGY_J,
    ATTR_REQUEST_TOKENS,
    SPAN_NAME,
    DecisionSpans,
    RequestSpans,
)
from agent.telemetry import setup_tracing

START_NS = 1_700_000_000_000_000_000
OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def record(clock_mhz: int | None = 1050, changed: bool = True, slack: float | None = 0.42) -> DecisionRecord:
    return DecisionRecord(
        at_s=5.0,
        wall_ns=1_700_000_000_000_000_000,
        decision_s=0.0008,
        policy="throttllem",
        sm_clock_mhz=clock_mhz,
        clock_changed=changed,
        predicted_ips=48.5,
        measured_ips=None,
        min_slack_s=slack,
        batch=12,
        kv_blocks_used=300,
        kv_blocks_max=7000,
        guard_mode="steady",
        running=12,
        queued=3,
        admitted=2,
    )


class Receiver:
    """A tiny OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        self.paths.append(request.path)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self):
        return [
            (resource_spans.resource, span)
            for message in self.requests
            for resource_spans in message.resource_spans
            for scope in resource_spans.scope_spans
            for span in scope.spans
        ]


def attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_spans_arrive_over_otlp_http(monkeypatch):
    async def scenario():
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/custom/traces", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}/custom/traces")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,throttllem.gpu=override")
        tracing = setup_tracing(Settings())
        assert tracing.endpoint is not None
        spans = DecisionSpans(tracing.provider.get_tracer("test"), every=1)
        spans(record())
        spans(record(clock_mhz=None, slack=None))
        await asyncio.to_thread(tracing.shutdown)  # flushes: the export is a blocking HTTP call
        await runner.cleanup()
        return receiver

    receiver = asyncio.run(scenario())
    assert set(receiver.paths) == {"/custom/traces"}  # a signal-specific endpoint is used verbatim
    received = receiver.spans()
    assert [span.name for _, span in received] == [SPAN_NAME, SPAN_NAME]
    resource, first = received[0]
    attrs = attributes(first.attributes)
    assert attrs["throttllem.sm_clock_mhz"] == 1050 and attrs["throttllem.clock_locked"] is True
    assert attrs["throttllem.predicted_ips"] == 48.5 and attrs["throttllem.min_slack_s"] == 0.42
    assert attrs["throttllem.guard_mode"] == "steady" and attrs["throttllem.requests_admitted"] == 2
    assert "throttllem.measured_ips" not in attrs  # unknown: left out
    assert first.start_time_unix_nano == 1_700_000_000_000_000_000
    assert first.end_time_unix_nano - first.start_time_unix_nano == 800_000
    second = attributes(received[1][1].attributes)
    assert "throttllem.sm_clock_mhz" not in second and second["throttllem.clock_locked"] is False
    resource_attrs = attributes(resource.attributes)
    assert resource_attrs["service.name"] == "throttllem-sidecar"
    assert resource_attrs["deployment.environment"] == "test"
    assert resource_attrs["throttllem.gpu"] == "override"  # the environment wins over our defaults


def test_generic_endpoint_gets_the_signal_path_and_service_name_is_honoured(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gpu-7-sidecar")
    tracing = setup_tracing(Settings())
    try:
        assert tracing.endpoint == "http://127.0.0.1:9"
        assert tracing.provider.resource.attributes["service.name"] == "gpu-7-sidecar"
    finally:
        tracing.shutdown()


def test_tracing_is_off_without_an_endpoint():
    tracing = setup_tracing(Settings())
    assert tracing.endpoint is None
    span = tracing.provider.get_tracer("test").start_span("x")
    assert not span.is_recording()
    tracing.shutdown()


def test_decisions_are_sampled_but_every_clock_change_is_kept():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = DecisionSpans(provider.get_tracer("test"), every=4)
    for i in range(12):
        spans(record(changed=i in (5, 6)))
    exported = exporter.get_finished_spans()
    # 1 in 4 of the unchanged (the 1st, 5th, 9th decision) plus the two changes (6th, 7th).
    assert len(exported) == 5
    assert sum(span.attributes["throttllem.clock_changed"] for span in exported) == 2


def test_a_request_span_carries_its_energy_and_ends_at_its_completion_time(monkeypatch):
    async def scenario():
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/v1/traces", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{runner.addresses[0][1]}")
        tracing = setup_tracing(Settings())
        ledger = RequestEnergyLedger()
        spans = RequestSpans(ledger)
        ledger.tick(100.0, 0.0)
        request_id = "ab" * 16
        ledger.open(request_id, "llama", "")
        span = tracing.provider.get_tracer("test").start_span("POST /v1/completions", start_time=START_NS)
        ledger.add_tokens(request_id, 10)
        ledger.finish(request_id, 1.0)
        spans.park(request_id, span, START_NS + 1_500_000_000)
        parked = len(spans)
        spans.settle(ledger.tick(112.5, 2.0))
        await asyncio.to_thread(tracing.shutdown)
        await runner.cleanup()
        return receiver, parked, len(spans)

    receiver, parked, left = asyncio.run(scenario())
    assert (parked, left) == (1, 0)  # held until its energy was final, then ended
    ((_, span),) = receiver.spans()
    attrs = attributes(span.attributes)
    assert attrs[ATTR_REQUEST_ENERGY_J] == 12.5 and attrs[ATTR_REQUEST_TOKENS] == 10
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (START_NS, START_NS + 1_500_000_000)
