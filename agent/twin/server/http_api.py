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

The model is decoupled (`decoupled=True`, the default): the TensorRT-LLM backend's
`decoupled_mode`, which streaming needs. Then, as Triton does, KServe `infer` is refused (501);
with `decoupled=False` infer runs one generation (`kserve_infer`), and `stream: true` is the
backend's error. The Triton extensions served: `model_configuration` (`.../config`,
`triton_config`), `model_repository` (`v2/repository/index`; load and unload refused as Triton's
default model control mode refuses them), `statistics` (`v2/models[/...]/stats`, counted here
as requests end: `triton_stats`), `binary_tensor_data` and `parameters` (infer).

Optionally the port also answers trtllm-serve's `GET /metrics` (reference/interfaces.md §1.6):
the executor iteration stats since the last call, as a JSON array, so a client can read every
iteration with its latency (Triton itself only exports the last one per stats poll, as gauges).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress

from aiohttp import web

from agent.twin.engine import RequestRejectedError
from agent.twin.server.collectors import IterationStatsQueue
from agent.twin.server.gpu_control import GpuControl, gpu_routes
from agent.twin.server.kserve_infer import (
    DECOUPLED_ERROR,
    INFER_HEADER_LENGTH,
    SharedMemoryNotFoundError,
    encode_response,
    ensemble_keys,
    parse_infer,
)
from agent.twin.server.protocol import (
    MODEL_VERSION,
    MULTIPLE_RESPONSES_ERROR,
    SERVER_METADATA,
    STREAMING_NEEDS_DECOUPLED_ERROR,
    BadRequestError,
    GenerateParams,
    ResponseTiming,
    dumps,
    error_body,
    generate_params,
    model_metadata,
    parse_generate,
    parse_json,
    response_body,
    response_outputs,
    sse_event,
)
from agent.twin.server.realtime import Chunk, Generation, RealtimeTwin
from agent.twin.server.triton_config import MODEL_CONTROL_ERROR, ensemble_config, repository_index
from agent.twin.server.triton_stats import ServedRequest, TritonStatistics

JSON = "application/json"
NANOS = 1_000_000_000
SERVER_NOT_READY = "Server not ready"

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
    except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's body limit, in Triton's error shape
        return _json(error_body(f"request body too large: {exc.text}"), status=413)


class TritonApi:
    """Handlers for one served model name."""

    def __init__(self, runtime: RealtimeTwin, model_name: str, *, decoupled: bool = True) -> None:
        self.runtime = runtime
        self.model_name = model_name
        self.decoupled = decoupled
        self.max_batch_size = runtime.setup.engine.max_batch_size  # the ensemble's (triton_max_batch_size)
        self.stats = TritonStatistics(model_name)

    def _unknown_model(self, request: web.Request) -> str | None:
        """Triton's message when the path names another model or version, else None."""
        model = request.match_info["model"]
        version = request.match_info.get("version")
        if model != self.model_name:
            return f"Request for unknown model: '{model}' is not found"
        if version is not None and version != MODEL_VERSION:
            return f"Request for unknown model: '{model}' version {version} is not found"
        return None

    def _epoch_ns(self, twin_s: float) -> int:
        """Twin time as nanoseconds since the epoch on the twin clock."""
        return round((self.runtime.clock.epoch_s + twin_s) * NANOS)

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

    async def model_config(self, request: web.Request) -> web.Response:
        """`GET /v2/models/<m>[/versions/<v>]/config`: the model configuration extension."""
        unknown = self._unknown_model(request)
        if unknown is not None:
            return _json(error_body(unknown), status=400)
        config = ensemble_config(self.model_name, self.max_batch_size, decoupled=self.decoupled)
        return _json(dumps(config, sort_keys=False))

    async def repository_index(self, request: web.Request) -> web.Response:
        """`POST /v2/repository/index`, body empty or `{"ready": bool}`."""
        body = await request.read()
        ready_only = False
        if body:
            try:
                document = parse_json(body)
            except BadRequestError as exc:
                return _json(error_body(str(exc)), status=400)
            if isinstance(document, dict) and "ready" in document:
                ready_only = document["ready"]
                if not isinstance(ready_only, bool):
                    return _json(error_body("Invalid value for 'ready': expected a boolean"), status=400)
        if not self.runtime.running:
            return _json(error_body(SERVER_NOT_READY), status=503)
        index = repository_index(self.model_name, ready=True, ready_only=ready_only)
        return _json(dumps(index, sort_keys=False))

    async def repository_control(self, request: web.Request) -> web.Response:
        """`POST /v2/repository/models/<m>/load|unload`: refused, as with model control mode none."""
        body = await request.read()
        if body:
            try:
                document = parse_json(body)
            except BadRequestError as exc:
                return _json(error_body(str(exc)), status=400)
            parameters = document.get("parameters") if isinstance(document, dict) else None
            if (
                request.match_info["action"] == "unload"
                and isinstance(parameters, dict)
                and not isinstance(parameters.get("unload_dependents", False), bool)
            ):
                return _json(
                    error_body("Unable to parse 'unload_dependents': expected a boolean"), status=400
                )
        return _json(error_body(MODEL_CONTROL_ERROR), status=503)

    async def all_model_stats(self, _: web.Request) -> web.Response:
        """`GET /v2/models/stats`: every model's statistics."""
        if not self.runtime.running:
            return _json(error_body(SERVER_NOT_READY), status=503)
        return _json(dumps(self.stats.document(self.stats.models()), sort_keys=False))

    async def model_stats(self, request: web.Request) -> web.Response:
        """`GET /v2/models/<m>[/versions/<v>]/stats`: one repository model's statistics."""
        if not self.runtime.running:
            return _json(error_body(SERVER_NOT_READY), status=503)
        model = request.match_info["model"]
        version = request.match_info.get("version")
        if model not in self.stats.models():
            return _json(error_body(f"requested model '{model}' is not available"), status=400)
        if version is not None and version != MODEL_VERSION:
            message = f"requested model version is not available for model '{model}'"
            return _json(error_body(message), status=400)
        return _json(dumps(self.stats.document([model]), sort_keys=False))

    def _refused(self) -> None:
        """Count a request the backend refused at once (it never reaches the engine's queue)."""
        now = self._epoch_ns(self.runtime.now_s())
        self.stats.record(ServedRequest(now, None, now, failed=True, responses=0))

    def _submit(self, params: GenerateParams) -> Generation:
        """Queue a parsed request; raises RequestRejectedError as the backend refuses one."""
        if params.stream and not self.decoupled:
            self._refused()
            raise RequestRejectedError(STREAMING_NEEDS_DECOUPLED_ERROR)
        try:
            return self.runtime.submit(
                params.prompt_tokens, params.max_tokens, params.output_tokens, stream=params.stream
            )
        except RequestRejectedError:
            self._refused()
            raise

    def _parse_generate(self, request: web.Request, body: bytes) -> GenerateParams:
        """A generate request for this model; raises BadRequestError."""
        unknown = self._unknown_model(request)
        if unknown is not None:
            raise BadRequestError(unknown)
        return parse_generate(body, self.model_name)

    async def _served(self, generation: Generation) -> AsyncIterator[Chunk]:
        """Every response of a generation; the statistics count it when the final one arrives."""
        responses = 0
        async for chunk in generation.responses():
            if chunk.error is None:
                responses += 1
            if chunk.final:
                scheduled = generation.first_scheduled_s
                self.stats.record(
                    ServedRequest(
                        arrival_ns=self._epoch_ns(generation.request.arrival_s),
                        first_scheduled_ns=None if scheduled is None else self._epoch_ns(scheduled),
                        end_ns=self._epoch_ns(chunk.time_s),
                        failed=chunk.error is not None,
                        responses=responses,
                    )
                )
            yield chunk

    def _timing(self, generation: Generation, chunk: Chunk) -> ResponseTiming:
        def ns(twin_s: float | None) -> int:
            assert twin_s is not None  # the driver sets every time before it delivers a response
            return self._epoch_ns(twin_s)

        return ResponseTiming(
            arrival_ns=ns(generation.request.arrival_s),
            first_scheduled_ns=ns(generation.first_scheduled_s),
            first_token_ns=ns(generation.first_token_s),
            last_token_ns=ns(chunk.time_s),
        )

    def _response(self, params: GenerateParams, generation: Generation, chunk: Chunk) -> str:
        timing = self._timing(generation, chunk)
        return response_body(self.model_name, params, chunk.tokens, timing, streamed=generation.stream)

    async def generate(self, request: web.Request) -> web.Response:
        """`POST .../generate`: one JSON answer when the model is done."""
        try:
            params = self._parse_generate(request, await request.read())
            generation = self._submit(params)
        except (BadRequestError, RequestRejectedError) as exc:
            return _json(error_body(str(exc)), status=400)
        chunks = [chunk async for chunk in self._served(generation)]
        if chunks[-1].error is not None:
            return _json(error_body(chunks[-1].error), status=400)
        if len(chunks) != 1:
            return _json(error_body(MULTIPLE_RESPONSES_ERROR))
        return _json(self._response(params, generation, chunks[0]))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """`POST .../generate_stream`: server-sent events, one per model response."""
        try:
            params = self._parse_generate(request, await request.read())
        except BadRequestError as exc:
            return _json(error_body(str(exc)), status=400)
        try:
            generation = self._submit(params)
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
        client_gone = False
        async for chunk in self._served(generation):
            if client_gone:
                continue  # the engine finishes the request regardless, as TRT-LLM does; it is counted
            payload = error_body(chunk.error) if chunk.error else self._response(params, generation, chunk)
            try:
                await response.write(sse_event(payload))
            except ConnectionResetError:
                client_gone = True
        if not client_gone:
            with suppress(ConnectionResetError):
                await response.write_eof()
        return response

    async def infer(self, request: web.Request) -> web.Response:
        """`POST .../infer`: KServe v2 inference with binary tensor data; one generation, one answer."""
        unknown = self._unknown_model(request)
        if unknown is not None:
            return _json(error_body(unknown), status=400)
        if self.decoupled:
            return _json(error_body(DECOUPLED_ERROR), status=501)
        try:
            infer_request = parse_infer(
                await request.read(), request.headers.get(INFER_HEADER_LENGTH), self.model_name
            )
            keys = ensemble_keys(infer_request, self.model_name, self.max_batch_size)
            params = generate_params(keys, self.model_name)
            generation = self._submit(params)
        except SharedMemoryNotFoundError as exc:
            return _json(error_body(str(exc)), status=404)
        except (BadRequestError, RequestRejectedError) as exc:
            return _json(error_body(str(exc)), status=400)
        chunks = [chunk async for chunk in self._served(generation)]
        final = chunks[-1]
        if final.error is not None:
            return _json(error_body(final.error), status=400)
        tensors = response_outputs(params, final.tokens, self._timing(generation, final), streamed=False)
        body, header_length = encode_response(self.model_name, infer_request, tensors)
        if header_length is None:
            return web.Response(body=body, content_type=JSON)
        return web.Response(
            body=body,
            content_type="application/octet-stream",
            headers={INFER_HEADER_LENGTH: str(header_length)},
        )


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
    *,
    decoupled: bool = True,
) -> web.Application:
    """The HTTP port: KServe v2 and Triton's extensions for the ensemble, and the twin GPU endpoint.

    `decoupled`: the model's transaction policy (streaming works; HTTP infer is refused). Given
    `iteration_stats`, also trtllm-serve's iteration stats endpoint.
    """
    api = TritonApi(runtime, model_name, decoupled=decoupled)
    app = web.Application(middlewares=[_triton_errors])
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.add_routes(
        [
            web.get("/v2/health/live", api.live, allow_head=False),
            web.get("/v2/health/ready", api.ready, allow_head=False),
            web.get("/v2", api.server_metadata, allow_head=False),
            web.get("/v2/models/stats", api.all_model_stats, allow_head=False),  # before {model}
            web.post("/v2/repository/index", api.repository_index),
            web.post("/v2/repository/models/{model}/{action:load|unload}", api.repository_control),
            *[
                route
                for base in (model, versioned)
                for route in (
                    web.get(base, api.model_metadata, allow_head=False),
                    web.get(base + "/ready", api.model_ready, allow_head=False),
                    web.get(base + "/config", api.model_config, allow_head=False),
                    web.get(base + "/stats", api.model_stats, allow_head=False),
                    web.post(base + "/generate", api.generate),
                    web.post(base + "/generate_stream", api.generate_stream),
                    web.post(base + "/infer", api.infer),
                )
            ],
            *gpu_routes(gpu),
            *(iteration_stats_routes(iteration_stats) if iteration_stats is not None else ()),
        ]
    )
    return app
