r"""Triton's HTTP API (port 8000) for one TensorRT-LLM ensemble model, served by the real-time twin.

Routes and answers follow `triton-inference-server/server:src/http_server.cc` (reference/
interfaces.md §2): health is 200 with an empty body or 400; errors are `{"error": "..."}` with
status 400; unknown paths 404 and wrong methods 405, both with an error document.

`generate` waits for the whole answer. Like Triton, it needs the model to send exactly one
response: with `"stream": true` the model sends one per token and Triton answers HTTP 200 with
an error document. `generate_stream` sends each response as `data: <json>\n\n` (no `[DONE]`);
without `"stream": true` the model sends one response, so the stream has one event. An error
raised by the engine (a request that can never fit) is the first response: HTTP 400, as a
plain error document from `generate` and as an event from `generate_stream`.

Optionally the port also answers trtllm-serve's `GET /metrics` (reference/interfaces.md §1.6):
the executor iteration stats since the last call, as a JSON array, so a client can read every
iteration with its latency (Triton itself only exports the last one per stats poll, as gauges).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.twin.engine import RequestRejectedError
from agent.twin.server.collectors import IterationStatsQueue
from agent.twin.server.gpu_control import GpuControl, gpu_routes
from agent.twin.server.protocol import (
    MODEL_VERSION,
    MULTIPLE_RESPONSES_ERROR,
    SERVER_METADATA,
    BadRequestError,
    GenerateParams,
    ResponseTiming,
    dumps,
    error_body,
    model_metadata,
    parse_generate,
    response_body,
    sse_event,
)
from agent.twin.server.realtime import Chunk, Generation, RealtimeTwin

JSON = "application/json"
NANOS = 1_000_000_000

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(text: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=text, content_type=JSON)


@web.middleware
async def _triton_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Routing errors as Triton words them: a JSON error document, not aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json(error_body("Not Found"), status=404)
    except web.HTTPMethodNotAllowed:
        return _json(error_body("Method Not Allowed"), status=405)


class TritonApi:
    """Handlers for one served model name."""

    def __init__(self, runtime: RealtimeTwin, model_name: str) -> None:
        self.runtime = runtime
        self.model_name = model_name

    def _unknown_model(self, request: web.Request) -> str | None:
        """Triton's message when the path names another model or version, else None."""
        model = request.match_info["model"]
        version = request.match_info.get("version")
        if model != self.model_name:
            return f"Request for unknown model: '{model}' is not found"
        if version is not None and version != MODEL_VERSION:
            return f"Request for unknown model: '{model}' version {version} is not found"
        return None

    async def live(self, _: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return web.Response(status=200)

    async def ready(self, _: web.Request) -> web.Response:
        """Readiness: the engine loop runs."""
        return web.Response(status=200 if self.runtime.running else 400)

    async def server_metadata(self, _: web.Request) -> web.Response:
        """`GET /v2`."""
        return _json(dumps(SERVER_METADATA, sort_keys=False))

    async def model_metadata(self, request: web.Request) -> web.Response:
        """`GET /v2/models/<m>[/versions/<v>]`."""
        unknown = self._unknown_model(request)
        if unknown is not None:
            return _json(error_body(unknown), status=400)
        return _json(dumps(model_metadata(self.model_name), sort_keys=False))

    async def model_ready(self, request: web.Request) -> web.Response:
        """`GET /v2/models/<m>[/versions/<v>]/ready`: 200 or 400, empty body."""
        ok = self._unknown_model(request) is None and self.runtime.running
        return web.Response(status=200 if ok else 400)

    def _submit(self, request: web.Request, body: bytes) -> tuple[GenerateParams, Generation]:
        """Parse and queue a generate request; raises BadRequestError or RequestRejectedError."""
        unknown = self._unknown_model(request)
        if unknown is not None:
            raise BadRequestError(unknown)
        params = parse_generate(body, self.model_name)
        generation = self.runtime.submit(
            params.prompt_tokens, params.max_tokens, params.output_tokens, stream=params.stream
        )
        return params, generation

    def _response(self, params: GenerateParams, generation: Generation, chunk: Chunk) -> str:
        epoch_s = self.runtime.clock.epoch_s

        def ns(twin_s: float | None) -> int:
            assert twin_s is not None  # the driver sets every time before it delivers a response
            return round((epoch_s + twin_s) * NANOS)

        timing = ResponseTiming(
            arrival_ns=ns(generation.request.arrival_s),
            first_scheduled_ns=ns(generation.first_scheduled_s),
            first_token_ns=ns(generation.first_token_s),
            last_token_ns=ns(chunk.time_s),
        )
        return response_body(self.model_name, params, chunk.tokens, timing, streamed=generation.stream)

    async def generate(self, request: web.Request) -> web.Response:
        """`POST .../generate`: one JSON answer when the model is done."""
        try:
            params, generation = self._submit(request, await request.read())
        except (BadRequestError, RequestRejectedError) as exc:
            return _json(error_body(str(exc)), status=400)
        chunks = [chunk async for chunk in generation.responses()]
        if chunks[-1].error is not None:
            return _json(error_body(chunks[-1].error), status=400)
        if len(chunks) != 1:
            return _json(error_body(MULTIPLE_RESPONSES_ERROR))
        return _json(self._response(params, generation, chunks[0]))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """`POST .../generate_stream`: server-sent events, one per model response."""
        try:
            params, generation = self._submit(request, await request.read())
        except BadRequestError as exc:
            return _json(error_body(str(exc)), status=400)
        except RequestRejectedError as exc:
            return web.Response(
                status=400,
                body=sse_event(error_body(str(exc))),
                content_type="text/event-stream",
                charset="utf-8",
            )
        response = web.StreamResponse(status=200)
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in generation.responses():
                payload = (
                    error_body(chunk.error) if chunk.error else self._response(params, generation, chunk)
                )
                await response.write(sse_event(payload))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; the engine finishes the request regardless, as TRT-LLM does
        return response


def iteration_stats_routes(queue: IterationStatsQueue) -> list[web.RouteDef]:
    """trtllm-serve's `GET /metrics`: the iteration records since the last call, drained."""

    async def metrics(_: web.Request) -> web.Response:
        return _json(queue.drain_json())

    return [web.get("/metrics", metrics, allow_head=False)]


def triton_app(
    runtime: RealtimeTwin,
    model_name: str,
    gpu: GpuControl,
    iteration_stats: IterationStatsQueue | None = None,
) -> web.Application:
    """The HTTP port: KServe v2 health and metadata, generate and the twin GPU endpoint.

    Given `iteration_stats`, also trtllm-serve's iteration stats endpoint.
    """
    api = TritonApi(runtime, model_name)
    app = web.Application(middlewares=[_triton_errors])
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.add_routes(
        [
            web.get("/v2/health/live", api.live, allow_head=False),
            web.get("/v2/health/ready", api.ready, allow_head=False),
            web.get("/v2", api.server_metadata, allow_head=False),
            *[
                route
                for base in (model, versioned)
                for route in (
                    web.get(base, api.model_metadata, allow_head=False),
                    web.get(base + "/ready", api.model_ready, allow_head=False),
                    web.post(base + "/generate", api.generate),
                    web.post(base + "/generate_stream", api.generate_stream),
                )
            ],
            *gpu_routes(gpu),
            *(iteration_stats_routes(iteration_stats) if iteration_stats is not None else ()),
        ]
    )
    return app
