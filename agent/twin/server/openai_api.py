"""The HTTP port as vLLM's or trtllm-serve's OpenAI-compatible server, in front of the real-time twin.

Routes (reference/interfaces.md §1.6, §3): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (bodies: `openai_protocol`), `GET /health` (200 with an empty
body while the engine runs, else 503), `GET /version`, `GET /metrics` (vLLM: its Prometheus
page, `vllm_metrics`; trtllm-serve: the drained iteration stats JSON, as with Triton's
`--iteration-stats-endpoint`), trtllm-serve's `GET /health_generate` (a one-token chat), and
the twin GPU endpoint (`gpu_control`).

Streams are server-sent events, one chunk per token as the engine produces it, the role
chunk of a chat stream with its first token, then the usage chunk if asked, then
`data: [DONE]`. Every request is streamed by the engine (one response per token) and gathered
here when the client asked for one answer, as both servers' engines stream to their API layer.
A client that leaves mid-stream stops the writing, not the engine: the request runs to its
end, as on the Triton port (the real servers abort it; the twin has no abort).

Both servers are FastAPI apps, so routing errors are FastAPI's: 404 `{"detail": "Not Found"}`
and 405 `{"detail": "Method Not Allowed"}` with `Allow`. Bodies are bounded like the Triton
port's (aiohttp's `client_max_size`, 1 MiB); a larger one is 413 in the server's error shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.twin.engine import RequestRejectedError
from agent.twin.server.collectors import IterationStatsQueue
from agent.twin.server.gpu_control import GpuControl, gpu_routes
from agent.twin.server.http_api import iteration_stats_routes
from agent.twin.server.openai_protocol import (
    DONE_EVENT,
    ErrorKind,
    GenerationRequest,
    OpenAiDialect,
    OpenAiError,
    StreamContext,
    TrtllmServeDialect,
    VllmDialect,
    chat_prompt_tokens,
    finish_reason,
    parse_request,
    token_text,
)
from agent.twin.server.protocol import dumps
from agent.twin.server.realtime import Generation, RealtimeTwin
from agent.twin.server.vllm_metrics import VllmMetrics

MAX_BODY_BYTES = 1024**2  # the Triton port's bound: aiohttp's default client_max_size
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
SHUTDOWN_MESSAGE = "the twin server is shutting down"
HEALTH_UNAVAILABLE = "LLM is unavailable. Please check the server logs for more details."
HEALTH_MESSAGES = [{"role": "user", "content": "hi"}]  # trtllm-serve's health_generate request

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(document: dict[str, Any], status: int = HTTPStatus.OK) -> web.Response:
    """A JSON answer as Starlette's JSONResponse writes it: compact, `application/json`, no charset."""
    return web.Response(status=status, body=dumps(document, sort_keys=False).encode(), content_type=JSON)


def _fastapi_errors(
    dialect: OpenAiDialect,
) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    """Routing errors as FastAPI answers them; an oversized body in the server's error shape."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _json({"detail": "Not Found"}, HTTPStatus.NOT_FOUND)
        except web.HTTPMethodNotAllowed as exc:
            response = _json({"detail": "Method Not Allowed"}, HTTPStatus.METHOD_NOT_ALLOWED)
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            return response
        except web.HTTPRequestEntityTooLarge:
            error = OpenAiError(ErrorKind.TOO_LARGE, f"the request body exceeds {MAX_BODY_BYTES} bytes")
            return _json(dialect.error_document(error), error.status)

    return middleware


class OpenAiApi:
    """Handlers for one served model in one server's dialect."""

    def __init__(
        self,
        runtime: RealtimeTwin,
        model_name: str,
        dialect: OpenAiDialect,
        on_submit: Callable[[Generation], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.model_name = model_name
        self.dialect = dialect
        self.on_submit = on_submit  # told of every request the engine accepted
        self.max_model_len = runtime.setup.max_seq_len

    def _error(self, error: OpenAiError) -> web.Response:
        return _json(self.dialect.error_document(error), error.status)

    async def models(self, _: web.Request) -> web.Response:
        """`GET /v1/models`."""
        return _json(self.dialect.models(self.model_name, self.max_model_len, int(time.time())))

    async def version(self, _: web.Request) -> web.Response:
        """`GET /version`."""
        return _json({"version": self.dialect.version})

    async def health(self, _: web.Request) -> web.Response:
        """`GET /health`: 200 with an empty body while the engine runs."""
        if self.runtime.running:
            return web.Response(status=HTTPStatus.OK)
        if isinstance(self.dialect, TrtllmServeDialect):
            return web.Response(status=HTTPStatus.SERVICE_UNAVAILABLE, text=HEALTH_UNAVAILABLE)
        return web.Response(status=HTTPStatus.SERVICE_UNAVAILABLE)

    async def health_generate(self, _: web.Request) -> web.Response:
        """trtllm-serve's `GET /health_generate`: a one-token chat ("hi") through the engine."""
        request = GenerationRequest(
            chat=True,
            model=self.model_name,
            prompt_tokens=chat_prompt_tokens(HEALTH_MESSAGES),
            max_tokens=1,
            output_tokens=None,
            stream=False,
            include_usage=False,
            continuous_usage=False,
        )
        try:
            generation = self._submit(request, self.dialect.engine_max_tokens(request, self.max_model_len))
        except OpenAiError as exc:
            return web.Response(
                status=HTTPStatus.INTERNAL_SERVER_ERROR, text=f"Generation health check failed: {exc}"
            )
        chunks = [chunk async for chunk in generation.responses()]
        if chunks[-1].error is not None:
            return web.Response(
                status=HTTPStatus.INTERNAL_SERVER_ERROR, text="Generation health check failed"
            )
        return web.Response(status=HTTPStatus.OK, text="Generation health check OK")

    def _submit(self, request: GenerationRequest, max_tokens: int) -> Generation:
        """Queue on the engine, streamed; raises OpenAiError for a request the engine refuses."""
        try:
            generation = self.runtime.submit(
                request.prompt_tokens, max_tokens, request.output_tokens, stream=True
            )
        except RequestRejectedError as exc:
            raise OpenAiError(ErrorKind.BAD_REQUEST, str(exc)) from exc
        if self.on_submit is not None:
            self.on_submit(generation)
        return generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`."""
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self._generate(request, chat=True)

    async def _generate(self, http: web.Request, *, chat: bool) -> web.StreamResponse:
        dialect = self.dialect
        try:
            request = parse_request(await http.read(), chat=chat, dialect=dialect)
            model = dialect.answered_model(request.model, self.model_name)
            max_tokens = dialect.engine_max_tokens(request, self.max_model_len)
            generation = self._submit(request, max_tokens)
        except OpenAiError as exc:
            return self._error(exc)
        if request.stream:
            response_id = dialect.stream_id(chat, generation.request.request_id)
            context = dialect.new_context(request, model, response_id)
            return await self._stream(http, request, context, generation, max_tokens)
        context = dialect.new_context(request, model, dialect.response_id(chat))
        tokens = 0
        async for chunk in generation.responses():
            if chunk.error is not None:
                return self._error(OpenAiError(ErrorKind.INTERNAL, chunk.error))
            tokens += chunk.tokens
        return _json(dialect.response(context, tokens, finish_reason(tokens, max_tokens)))

    async def _stream(
        self,
        http: web.Request,
        request: GenerationRequest,
        context: StreamContext,
        generation: Generation,
        max_tokens: int,
    ) -> web.StreamResponse:
        """One event per engine response (one token each), then usage if asked, then `[DONE]`."""
        dialect = self.dialect
        response = web.StreamResponse(status=HTTPStatus.OK)
        response.content_type = EVENT_STREAM
        response.charset = "utf-8"
        response.enable_chunked_encoding()
        await response.prepare(http)
        tokens = 0
        try:
            async for chunk in generation.responses():
                if chunk.error is not None:
                    await response.write(dialect.error_event(OpenAiError(ErrorKind.INTERNAL, chunk.error)))
                    break
                if request.chat and tokens == 0:
                    await response.write(dialect.first_chat_event(context, request.continuous_usage))
                tokens += chunk.tokens
                reason = finish_reason(tokens, max_tokens) if chunk.final else None
                usage = dialect.continuous_usage(context, tokens) if request.continuous_usage else None
                await response.write(dialect.token_event(context, token_text(chunk.tokens), reason, usage))
            else:  # the answer is whole: no engine error ended it
                if request.include_usage:
                    await response.write(dialect.usage_event(context, tokens))
            await response.write(DONE_EVENT)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; the engine finishes the request regardless
        return response


def openai_app(
    runtime: RealtimeTwin,
    model_name: str,
    gpu: GpuControl,
    *,
    vllm_metrics: VllmMetrics | None = None,
    iteration_stats: IterationStatsQueue | None = None,
) -> web.Application:
    """The HTTP port as vLLM (given `vllm_metrics`) or trtllm-serve (given `iteration_stats`)."""
    if (vllm_metrics is None) == (iteration_stats is None):
        raise ValueError("give vllm_metrics (vLLM) or iteration_stats (trtllm-serve), not both or neither")
    dialect: OpenAiDialect = VllmDialect() if vllm_metrics is not None else TrtllmServeDialect()
    api = OpenAiApi(runtime, model_name, dialect, vllm_metrics.track if vllm_metrics is not None else None)
    app = web.Application(middlewares=[_fastapi_errors(dialect)], client_max_size=MAX_BODY_BYTES)
    routes = [
        web.get("/health", api.health, allow_head=False),
        web.get("/version", api.version, allow_head=False),
        web.get("/v1/models", api.models, allow_head=False),
        web.post("/v1/completions", api.completions),
        web.post("/v1/chat/completions", api.chat_completions),
        *gpu_routes(gpu),
    ]
    if vllm_metrics is not None:

        async def metrics(request: web.Request) -> web.Response:
            body, headers = vllm_metrics.scrape(
                request.headers.get("Accept"), request.headers.get("Accept-Encoding")
            )
            return web.Response(body=body, headers=headers)

        routes.append(web.get("/metrics", metrics, allow_head=False))
    else:
        assert iteration_stats is not None
        routes.append(web.get("/health_generate", api.health_generate, allow_head=False))
        routes.extend(iteration_stats_routes(iteration_stats))
    app.add_routes(routes)
    return app
