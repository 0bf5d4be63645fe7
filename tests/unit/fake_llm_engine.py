"""A fake LLM engine on a loopback port for the gateway tests.

Speaks Triton's generate / generate_stream (reference/interfaces.md §2.1, `data: <json>\\n\\n`
without `[DONE]`) and OpenAI completions / chat completions (§3.3, ending in `data: [DONE]`),
with a delay between events and an optional gate after the first event, so a test can see
that the gateway relays each event before the engine has sent the next.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

TOKEN = " tok"


def triton_event(model: str, tokens: int, *, with_count: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "batch_index": 0,
        "context_logits": 0.0,
        "cum_log_probs": 0.0,
        "generation_logits": 0.0,
        "model_name": model,
        "model_version": "1",
        "output_log_probs": 0.0 if tokens == 1 else [0.0] * tokens,
        "sequence_end": False,
        "sequence_id": 0,
        "sequence_index": 0,
        "sequence_start": False,
        "text_output": TOKEN * tokens,
    }
    if with_count:
        body["num_output_tokens"] = tokens
    return body


def sse(document: object) -> bytes:
    data = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class FakeEngine:
    """Records what it receives; streams with `event_delay_s` between events."""

    def __init__(self) -> None:
        self.event_delay_s = 0.005
        self.gate: asyncio.Event | None = None  # when set: wait for it after the first event
        self.sent_events = 0
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []  # method, path, headers, body
        self.disconnected = asyncio.Event()
        self.response_headers: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/models/{model}/generate", self.generate)
        app.router.add_post("/v2/models/{model}/generate_stream", self.generate_stream)
        app.router.add_post("/v2/models/{model}/versions/{version}/generate_stream", self.generate_stream)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_route("*", "/echo{tail:.*}", self.echo)
        return app

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.received.append((request.method, request.path_qs, dict(request.headers), body))
        return body

    async def ready(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=200)

    async def echo(self, request: web.Request) -> web.Response:
        """What arrived, as JSON; answers with the extra headers the test asked for."""
        body = await self._record(request)
        document = {
            "method": request.method,
            "path_qs": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body.decode(),
        }
        return web.json_response(document, headers=self.response_headers)

    async def generate(self, request: web.Request) -> web.Response:
        document = json.loads(await self._record(request))
        document = {**document.pop("parameters", {}), **document}
        model = request.match_info["model"]
        if model == "broken":
            return web.json_response({"error": "unexpected inference output"}, status=400)
        if model == "slow":
            await asyncio.sleep(5)
        tokens = int(document.get("output_tokens", document["max_tokens"]))
        body = triton_event(model, tokens, with_count=bool(document.get("return_num_output_tokens")))
        return web.json_response(body)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        document = json.loads(await self._record(request))
        model = request.match_info["model"]
        per_event = 2 if document.get("return_num_output_tokens") else 1
        events = [
            sse(triton_event(model, per_event, with_count=per_event > 1))
            for _ in range(int(document["max_tokens"]) // per_event)
        ]
        if model == "failing":
            events[-1] = sse({"error": "engine failed mid-stream"})
        if model == "crash":  # two events, then the connection drops
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"".join(events[:2]))
            await asyncio.sleep(self.event_delay_s)
            assert request.transport is not None
            request.transport.close()
            return response
        if model == "split":  # CRLF line ends, cut every 50 bytes and between each CR and its LF
            joined = b"".join(events).replace(b"\n", b"\r\n")
            cuts = sorted({*range(0, len(joined), 50), *(i + 1 for i, c in enumerate(joined) if c == 13)})
            events = [joined[a:b] for a, b in zip(cuts, [*cuts[1:], len(joined)], strict=True)]
        return await self._stream(request, events)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            document = json.loads(await self._record(request))
        except ValueError:
            error = {"message": "invalid JSON", "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error}, status=400)
        tokens = int(document.get("max_completion_tokens") or document.get("max_tokens") or 16)
        chat = request.path.endswith("/chat/completions")
        if not document.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": TOKEN * tokens}
            else:
                choice["text"] = TOKEN * tokens
            body: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
            if not chat:
                body["usage"] = {"prompt_tokens": 4, "total_tokens": 4 + tokens, "completion_tokens": tokens}
            return web.json_response(body)
        key, kind = ("delta", "chat.completion.chunk") if chat else ("text", "text_completion")

        def chunk(piece: object, finish: str | None = None) -> bytes:
            choice = {"index": 0, key: piece, "logprobs": None, "finish_reason": finish}
            return sse({"id": "cmpl-1", "object": kind, "created": 1, "model": "m", "choices": [choice]})

        events = [chunk({"role": "assistant", "content": ""})] if chat else []
        events += [chunk({"content": TOKEN} if chat else TOKEN) for _ in range(tokens)]
        events.append(chunk({} if chat else "", finish="length"))
        if (document.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 4, "total_tokens": 4 + tokens + 2, "completion_tokens": tokens + 2}
            events.append(sse({"id": "cmpl-1", "object": kind, "choices": [], "usage": usage}))
        events.append(sse("[DONE]"))
        return await self._stream(request, events)

    async def _stream(self, request: web.Request, pieces: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        try:
            for i, piece in enumerate(pieces):
                if i == 1 and self.gate is not None:
                    await self.gate.wait()
                await response.write(piece)
                self.sent_events += 1
                await asyncio.sleep(self.event_delay_s)
            await response.write_eof()
        except ConnectionResetError:
            self.disconnected.set()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise
        return response


@asynccontextmanager
async def serve(app: web.Application, **server_kwargs: Any) -> AsyncIterator[str]:
    """Run `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.5, **server_kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
