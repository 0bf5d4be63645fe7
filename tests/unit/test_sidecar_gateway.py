"""The gateway end to end on loopback: a real client, the gateway, a fake engine behind it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.gateway import (
    Gateway,
    GatewayLimits,
    build_gateway_app,
    server_options,
    start_gateway_site,
)
from agent.sidecar.prompt_tokens import EstimateCounter
from agent.sidecar.tracker import RequestTracker, Ticket
from tests.unit.fake_llm_engine import FakeEngine, serve


class RecordingTracker(RequestTracker):
    """The real tracker, plus a record of the tokens the gateway reported per request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(MaxTokensPredictor(), **kwargs)
        self.tokens: dict[int, int] = {}
        self.first_tokens = 0

    def first_token(self, ticket: Ticket) -> None:
        super().first_token(ticket)
        self.first_tokens += 1
        self.tokens[ticket.request_id] = self.tokens.get(ticket.request_id, 0) + 1

    def add_tokens(self, ticket: Ticket, tokens: int) -> None:
        super().add_tokens(ticket, tokens)
        self.tokens[ticket.request_id] += tokens

    def assert_empty(self) -> None:
        assert self.held == 0 and self.in_flight == 0
        assert self.view().running == 0 and self.view().queued == 0


@dataclass
class Stack:
    engine: FakeEngine
    tracker: RecordingTracker
    gateway: Gateway
    url: str
    client: aiohttp.ClientSession
    spans: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def only_span(self) -> ReadableSpan:
        (span,) = self.finished()
        return span


ECHO_ALLOWED = GatewayLimits(allow_paths=("/echo*",))  # the fake engine's echo route, allow-listed


@asynccontextmanager
async def serve_gateway(gateway: Gateway, **server: Any) -> AsyncIterator[str]:
    """The gateway served as the sidecar serves it (server options, guarded site); its base URL."""
    runner = web.AppRunner(
        build_gateway_app(gateway), shutdown_timeout=0.5, **{**server_options(gateway.limits), **server}
    )
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        await start_gateway_site(runner, sock)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


@asynccontextmanager
async def stack(
    upstream_url: str | None = None,
    gateway_server: dict[str, Any] | None = None,
    engine_server: dict[str, Any] | None = None,
    request_timeout_s: float = 10.0,
    limits: GatewayLimits = ECHO_ALLOWED,
    **tracker_kwargs: Any,
) -> AsyncIterator[Stack]:
    engine = FakeEngine()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracker = RecordingTracker(**tracker_kwargs)
    async with serve(engine.app(), **(engine_server or {})) as engine_url:
        gateway = Gateway(
            tracker,
            upstream_url or engine_url,
            prompt_tokens=EstimateCounter(),
            request_timeout_s=request_timeout_s,
            tracer_provider=provider,
            limits=limits,
        )
        async with (
            serve_gateway(gateway, **(gateway_server or {})) as url,
            aiohttp.ClientSession() as client,
        ):
            yield Stack(engine, tracker, gateway, url, client, exporter)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def sse_data(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- Triton generate ---------------------------------------------------------------------------


def test_generate_is_forwarded_and_counted_as_max_tokens_without_a_count():
    async def scenario() -> None:
        async with stack() as s:
            body = {"text_input": "x" * 40, "parameters": {"max_tokens": 7}}
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate?q=1", json=body) as resp:
                assert resp.status == 200
                document = await resp.json()
            assert document["text_output"] == " tok" * 7
            method, path_qs, _, sent = s.engine.received[0]
            assert (method, path_qs, json.loads(sent)) == ("POST", "/v2/models/ensemble/generate?q=1", body)
            assert list(s.tracker.tokens.values()) == [7]
            assert s.tracker.counters.completed == 1
            s.tracker.assert_empty()
            span = s.only_span()
            assert span.name == "POST /v2/models/{model}/generate"
            assert span.attributes["gen_ai.usage.input_tokens"] == 10
            assert span.attributes["gen_ai.request.max_tokens"] == 7
            assert span.attributes["gen_ai.usage.output_tokens"] == 7
            assert span.attributes["gen_ai.request.model"] == "ensemble"
            assert s.gateway.stats.body_tokens == 7

    run(scenario)


def test_generate_uses_the_answers_token_count_when_it_has_one():
    async def scenario() -> None:
        async with stack() as s:
            body = {
                "text_input": "hi",
                "max_tokens": 20,
                "output_tokens": 3,
                "return_num_output_tokens": True,
            }
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body) as resp:
                assert resp.status == 200
            assert list(s.tracker.tokens.values()) == [3]

    run(scenario)


def test_an_engine_error_is_relayed_as_is_and_the_request_fails():
    async def scenario() -> None:
        async with stack() as s:
            body = {"text_input": "hi", "max_tokens": 5}
            async with s.client.post(f"{s.url}/v2/models/broken/generate", json=body) as resp:
                assert resp.status == 400
                assert await resp.json() == {"error": "unexpected inference output"}
            assert s.tracker.counters.failed == 1 and s.tracker.tokens == {}
            s.tracker.assert_empty()
            span = s.only_span()
            assert span.attributes["throttllem.outcome"] == "upstream_error"
            assert span.attributes["http.response.status_code"] == 400
            assert span.status.status_code is StatusCode.ERROR

    run(scenario)


# -- Triton generate_stream ----------------------------------------------------------------------


def test_generate_stream_is_relayed_event_by_event_and_each_event_is_a_token():
    async def scenario() -> None:
        async with stack() as s:
            s.engine.gate = asyncio.Event()  # the engine stops after its first event until we say
            body = {"text_input": "hello", "max_tokens": 6, "stream": True}
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate_stream", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                assert "Content-Length" not in resp.headers
                first = await resp.content.readuntil(b"\n\n")
                assert json.loads(first.removeprefix(b"data: "))["text_output"] == " tok"
                assert s.engine.sent_events == 1  # the client has it before the engine sent more
                assert s.tracker.first_tokens == 1
                s.engine.gate.set()
                rest = await resp.read()
            events = sse_data(first + rest)
            assert len(events) == 6
            assert list(s.tracker.tokens.values()) == [6]
            assert s.tracker.counters.completed == 1
            s.tracker.assert_empty()
            span = s.only_span()
            assert span.attributes["gen_ai.request.stream"] is True
            assert span.attributes["gen_ai.usage.output_tokens"] == 6
            assert span.attributes["throttllem.ttft_s"] >= 0
            assert s.gateway.stats.streamed_tokens == 6

    run(scenario)


def test_generate_stream_uses_a_per_event_token_count_when_there_is_one():
    async def scenario() -> None:
        async with stack() as s:
            body = {"text_input": "hello", "max_tokens": 8, "stream": True, "return_num_output_tokens": True}
            url = f"{s.url}/v2/models/ensemble/versions/1/generate_stream"
            async with s.client.post(url, json=body) as resp:
                events = sse_data(await resp.read())
            assert len(events) == 4  # two tokens each
            assert list(s.tracker.tokens.values()) == [8]
            assert s.only_span().name == "POST /v2/models/{model}/versions/{version}/generate_stream"

    run(scenario)


def test_events_split_across_reads_are_each_counted_once():
    async def scenario() -> None:
        async with stack() as s:
            s.engine.event_delay_s = 0.002
            body = {"text_input": "hello", "max_tokens": 3, "stream": True}
            async with s.client.post(f"{s.url}/v2/models/split/generate_stream", json=body) as resp:
                raw = await resp.read()
            assert s.engine.sent_events > 10  # the engine really sent it in pieces
            assert raw.count(b"data: ") == 3
            assert list(s.tracker.tokens.values()) == [3]

    run(scenario)


def test_an_error_event_in_a_200_stream_fails_the_request():
    async def scenario() -> None:
        async with stack() as s:
            body = {"text_input": "hello", "max_tokens": 4, "stream": True}
            async with s.client.post(f"{s.url}/v2/models/failing/generate_stream", json=body) as resp:
                assert resp.status == 200
                events = sse_data(await resp.read())
            assert json.loads(events[-1]) == {"error": "engine failed mid-stream"}
            assert list(s.tracker.tokens.values()) == [3]
            assert s.tracker.counters.failed == 1
            assert s.only_span().attributes["throttllem.outcome"] == "upstream_error"

    run(scenario)


def test_an_engine_that_breaks_mid_stream_truncates_the_clients_stream_too():
    async def scenario() -> None:
        async with stack() as s:
            body = {"text_input": "hello", "max_tokens": 5, "stream": True}
            async with s.client.post(f"{s.url}/v2/models/crash/generate_stream", json=body) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            assert list(s.tracker.tokens.values()) == [2]
            assert s.tracker.counters.failed == 1 and s.gateway.stats.upstream_errors == 1
            s.tracker.assert_empty()
            assert s.only_span().attributes["throttllem.outcome"] == "upstream_error"

    run(scenario)


# -- OpenAI-compatible -------------------------------------------------------------------------


def test_openai_completion_stream_counts_text_chunks_and_trusts_the_final_usage():
    async def scenario() -> None:
        async with stack() as s:
            body = {"model": "m", "prompt": "abcdefgh", "max_tokens": 5, "stream": True}
            async with s.client.post(f"{s.url}/v1/completions", json=body) as resp:
                events = sse_data(await resp.read())
            assert events[-1] == "[DONE]" and len(events) == 7  # 5 tokens, finish, [DONE]
            assert list(s.tracker.tokens.values()) == [5]
            body["stream_options"] = {"include_usage": True}  # the engine's usage says 7
            async with s.client.post(f"{s.url}/v1/completions", json=body) as resp:
                await resp.read()
            assert list(s.tracker.tokens.values()) == [5, 7]
            spans = s.finished()
            assert [span.name for span in spans] == ["POST /v1/completions"] * 2
            assert spans[0].attributes["gen_ai.usage.input_tokens"] == 2
            assert spans[0].attributes["gen_ai.request.model"] == "m"
            s.tracker.assert_empty()

    run(scenario)


def test_openai_chat_stream_does_not_count_the_role_chunk():
    async def scenario() -> None:
        async with stack() as s:
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 3,
            }
            async with s.client.post(f"{s.url}/v1/chat/completions", json=body) as resp:
                events = sse_data(await resp.read())
            assert events[-1] == "[DONE]" and len(events) == 6  # role, 3 tokens, finish, [DONE]
            assert list(s.tracker.tokens.values()) == [3]

    run(scenario)


def test_openai_non_streamed_answers_count_usage_or_the_text():
    async def scenario() -> None:
        async with stack() as s:
            body = {"model": "m", "prompt": "hi"}  # no max_tokens: the OpenAI default of 16
            async with s.client.post(f"{s.url}/v1/completions", json=body) as resp:
                assert (await resp.json())["usage"]["completion_tokens"] == 16
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
            async with s.client.post(f"{s.url}/v1/chat/completions", json=chat) as resp:
                assert (await resp.json())["choices"][0]["message"]["content"] == " tok" * 4
            # no usage in the chat answer: its 16 characters estimate to 4 tokens
            assert list(s.tracker.tokens.values()) == [16, 4]
            assert [span.attributes["gen_ai.request.max_tokens"] for span in s.finished()] == [16, 4]

    run(scenario)


# -- pass-through, admission, failures ---------------------------------------------------------


def test_everything_else_passes_through_untracked():
    async def scenario() -> None:
        async with stack() as s:
            async with s.client.get(f"{s.url}/v2/health/ready") as resp:
                assert resp.status == 200 and await resp.read() == b""
            payload = b"x" * 200_000
            async with s.client.put(f"{s.url}/echo/some/where?a=1&b=%20", data=payload) as resp:
                document = await resp.json()
            assert document["method"] == "PUT" and document["path_qs"] == "/echo/some/where?a=1&b=%20"
            assert len(document["body"]) == len(payload)
            async with s.client.get(f"{s.url}/v2/models/ensemble/generate") as resp:
                assert resp.status == 405  # the gateway's answer now: generate takes POST only
                assert resp.headers["Allow"] == "POST"
            assert s.tracker.counters.arrived == 0
            assert s.gateway.stats.requests[("passthrough", "ok")] == 2
            assert s.gateway.stats.requests[("passthrough", "refused")] == 1
            assert s.finished() == []

    run(scenario)


def test_hop_by_hop_headers_are_dropped_both_ways_and_x_forwarded_for_is_set():
    async def scenario() -> None:
        async with stack() as s:
            s.engine.response_headers = {"Connection": "X-Engine-Hop", "X-Engine-Hop": "1", "X-Engine": "2"}
            headers = {
                "Connection": "keep-alive, X-Client-Hop",
                "X-Client-Hop": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Forwarded-For": "10.0.0.1",
                "X-End-To-End": "yes",
            }
            async with s.client.get(f"{s.url}/echo", headers=headers) as resp:
                received = (await resp.json())["headers"]
                assert resp.headers["X-Engine"] == "2" and "X-Engine-Hop" not in resp.headers
            for name in ("x-client-hop", "keep-alive", "te", "proxy-authorization"):
                assert name not in received
            assert received["x-end-to-end"] == "yes"
            assert received["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
            assert received["host"] == s.gateway.upstream_url.removeprefix("http://")

    run(scenario)


def test_a_full_hold_queue_answers_429_with_retry_after_in_the_routes_error_shape():
    async def scenario() -> None:
        async with stack(max_held=1, retry_after_s=1.2, max_hold_s=30) as s:
            s.tracker.gating = True
            body = {"text_input": "hi", "max_tokens": 2}
            held = asyncio.create_task(s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body))
            await eventually(lambda: s.tracker.held == 1)
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "2"
                assert "1 requests already wait" in (await resp.json())["error"]
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with s.client.post(f"{s.url}/v1/chat/completions", json=chat) as resp:
                assert resp.status == 429
                error = (await resp.json())["error"]
                assert error["code"] == 429 and error["type"] == "hold_queue_full" and error["message"]
            s.tracker.release_all()
            async with await held as resp:
                assert resp.status == 200
            assert s.gateway.stats.rejected[429] == 2
            assert s.tracker.counters.rejected == 2 and s.tracker.counters.completed == 1
            outcomes = sorted(span.attributes["throttllem.outcome"] for span in s.finished())
            assert outcomes == ["ok", "rejected", "rejected"]
            s.tracker.assert_empty()

    run(scenario)


def test_a_held_request_reaches_the_engine_only_after_release():
    async def scenario() -> None:
        async with stack(max_hold_s=30) as s:
            s.tracker.gating = True
            body = {"text_input": "hi", "max_tokens": 2}
            held = asyncio.create_task(s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body))
            await eventually(lambda: s.tracker.held == 1)
            await asyncio.sleep(0.1)
            assert s.engine.received == []
            (request_id,) = s.tracker.view().queued_ids
            s.tracker.release([int(request_id)])
            async with await held as resp:
                assert resp.status == 200
            assert len(s.engine.received) == 1
            span = s.only_span()
            assert span.attributes["throttllem.held_s"] >= 0.1
            assert span.attributes["throttllem.request_id"] == int(request_id)

    run(scenario)


def test_an_unreachable_engine_is_502_and_leaves_no_ticket_behind():
    async def scenario() -> None:
        async with stack(upstream_url=f"http://127.0.0.1:{free_port()}") as s:
            body = {"text_input": "hi", "max_tokens": 2}
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate_stream", json=body) as resp:
                assert resp.status == 502
                assert "failed before answering" in (await resp.json())["error"]
            async with s.client.post(f"{s.url}/v1/completions", json={"prompt": "x"}) as resp:
                assert resp.status == 502 and (await resp.json())["error"]["type"] == "bad_gateway"
            async with s.client.get(f"{s.url}/v2/health/ready") as resp:
                assert resp.status == 502
            s.tracker.assert_empty()
            assert s.tracker.counters.failed == 2
            assert s.gateway.stats.upstream_errors == 3
            assert [span.attributes["throttllem.outcome"] for span in s.finished()] == ["upstream_error"] * 2

    run(scenario)


def test_a_silent_engine_is_504_after_the_request_timeout():
    async def scenario() -> None:
        async with stack(request_timeout_s=0.2, engine_server={"handler_cancellation": True}) as s:
            body = {"text_input": "hi", "max_tokens": 2}
            async with s.client.post(f"{s.url}/v2/models/slow/generate", json=body) as resp:
                assert resp.status == 504
                assert "timed out" in (await resp.json())["error"]
            s.tracker.assert_empty()
            assert s.only_span().attributes["http.response.status_code"] == 504

    run(scenario)


@pytest.mark.parametrize("handler_cancellation", [False, True])
def test_a_client_that_leaves_mid_stream_cancels_the_upstream_and_fails_its_ticket(handler_cancellation):
    async def scenario() -> None:
        server = {"handler_cancellation": handler_cancellation}
        async with stack(gateway_server=server) as s:
            s.engine.event_delay_s = 0.02
            body = {"text_input": "hello", "max_tokens": 200, "stream": True}
            resp = await s.client.post(f"{s.url}/v2/models/ensemble/generate_stream", json=body)
            await resp.content.readuntil(b"\n\n")
            resp.close()  # drops the connection
            await eventually(lambda: s.tracker.counters.failed == 1)
            s.tracker.assert_empty()
            await asyncio.wait_for(s.engine.disconnected.wait(), 3)
            assert s.engine.sent_events < 200
            await eventually(lambda: len(s.finished()) == 1)
            assert s.only_span().attributes["throttllem.outcome"] == "client_disconnected"

    run(scenario)


def test_traceparent_carries_the_gateway_span_and_continues_the_clients_trace():
    async def scenario() -> None:
        async with stack() as s:
            client_trace = "0af7651916cd43dd8448eb211c80319c"
            headers = {"traceparent": f"00-{client_trace}-b7ad6b7169203331-01"}
            body = {"text_input": "hi", "max_tokens": 2}
            async with s.client.post(f"{s.url}/v2/models/m/generate", json=body, headers=headers) as resp:
                assert resp.status == 200
            span = s.only_span()
            context = span.get_span_context()
            sent = s.engine.received[0][2]["traceparent"]
            assert sent == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
            assert f"{context.trace_id:032x}" == client_trace
            assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
            assert span.kind is SpanKind.SERVER
            assert span.status.status_code is StatusCode.UNSET
            assert span.attributes["throttllem.outcome"] == "ok"
            assert span.attributes["http.response.status_code"] == 200
            assert span.attributes["http.route"] == "/v2/models/{model}/generate"

    run(scenario)


def test_a_closed_gateway_refuses_with_503():
    async def scenario() -> None:
        async with stack() as s:
            await s.gateway.close()
            async with s.client.post(f"{s.url}/v1/completions", json={"prompt": "x"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            async with s.client.get(f"{s.url}/v2/health/ready") as resp:
                assert resp.status == 503
            assert s.tracker.counters.arrived == 0 and s.engine.received == []

    run(scenario)


def test_a_body_that_is_not_json_is_forwarded_and_tracked_by_its_size():
    async def scenario() -> None:
        async with stack() as s:
            async with s.client.post(f"{s.url}/v1/completions", data=b"not json " * 10) as resp:
                assert resp.status == 400  # the engine's own answer, relayed
                assert (await resp.json())["error"]["message"] == "invalid JSON"
            assert s.engine.received[0][3] == b"not json " * 10
            span = s.only_span()
            assert span.attributes["gen_ai.usage.input_tokens"] == 23  # 90 chars / 4
            assert span.attributes["gen_ai.request.max_tokens"] == 16
            s.tracker.assert_empty()

    run(scenario)
