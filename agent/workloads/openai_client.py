"""The load generator's OpenAI-compatible client (vLLM, trtllm-serve, the twin), on the official SDK.

One request is one streamed `completions` or `chat.completions` call with
`stream_options={"include_usage": True}`, read through `with_streaming_response` so the
gateway's `X-Throttllem-Request-Id` header is in hand. The SDK retries nothing
(`max_retries=0`): the load generator retries 429/503 itself, after their Retry-After, as for
Triton. Its timeout is bounded: CONNECT_TIMEOUT_S to connect, READ_TIMEOUT_S between two reads.

Counting tokens: a chunk whose text (completions) or `delta.content` (chat) is not empty is one
token event, timed when it arrives — the twin and vLLM's default stream one token per chunk. The
output token count is the usage chunk's `completion_tokens` (exact) when the server sends one,
else the number of token events. When chunks carry several tokens, TTFT is the first event, TPOT
divides by the exact count, and the recorded token gaps are between chunks (fewer than tokens
- 1): tokens that arrive together were not seen apart. An answer is whole only when a choice says
its `finish_reason`; a stream that ends without one is an error.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import openai

from agent.domain import Request
from agent.workloads.loadgen import (
    ERROR_TEXT_CHARS,
    PROMPT_WORD,
    RETRY_STATUSES,
    Refusal,
    RequestResult,
    TokenRecording,
    failed,
    retry_after_s,
    twin_keys,
)
from agent.workloads.request_energy import REQUEST_ID_HEADER

CONNECT_TIMEOUT_S = 10.0
# Between two reads of one answer: an engine (or the gateway's admission) may hold a request
# before its first token; the live demo allows 300 s for the longest answer's tail.
READ_TIMEOUT_S = 300.0
PLACEHOLDER_API_KEY = "unused"  # the SDK needs a key; engines started without --api-key ignore it


class ModelListError(RuntimeError):
    """The server's model list could not be read; the message says why, in one line."""


def _client(base_url: str, api_key: str | None, timeout: openai.Timeout) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{base_url.rstrip('/')}/v1",
        api_key=api_key or PLACEHOLDER_API_KEY,
        max_retries=0,
        timeout=timeout,
    )


def _message(exc: openai.APIError) -> str:
    """The server's error message (or the SDK's), cut to ERROR_TEXT_CHARS."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(text, str) and text:
            return text[:ERROR_TEXT_CHARS]
    return (exc.message or type(exc).__name__)[:ERROR_TEXT_CHARS]


async def served_models(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model names `GET {base_url}/v1/models` lists (ModelListError when it cannot be read)."""
    async with _client(base_url, api_key, openai.Timeout(timeout_s)) as client:
        try:
            page = await client.models.list()
        except openai.APIStatusError as exc:
            raise ModelListError(
                f"GET {base_url.rstrip('/')}/v1/models answered HTTP {exc.status_code}: {_message(exc)}"
            ) from None
        except openai.APIError as exc:
            raise ModelListError(f"cannot reach {base_url}: {_message(exc)}") from None
        return [model.id for model in page.data]


class OpenAIStreamer:
    """Streams one trace request at a time (many at once) as a completion or a chat completion."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        model: str,
        *,
        chat: bool,
        record: TokenRecording,
        with_twin_keys: bool,
    ) -> None:
        self._client = client
        self._model = model
        self._chat = chat
        self._record = record
        self._with_twin_keys = with_twin_keys

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        base_url: str,
        model: str,
        *,
        chat: bool,
        record: TokenRecording,
        with_twin_keys: bool = True,
        api_key: str | None = None,
    ) -> AsyncIterator[OpenAIStreamer]:
        """A streamer against `base_url` (its /v1 routes), its connections closed on the way out."""
        timeout = openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        async with _client(base_url, api_key, timeout) as client:
            yield cls(client, model, chat=chat, record=record, with_twin_keys=with_twin_keys)

    def arguments(self, request: Request) -> dict[str, Any]:
        """The SDK call's arguments for one trace request."""
        prompt = PROMPT_WORD * request.prompt_tokens
        arguments: dict[str, Any] = {
            "model": self._model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._chat:
            arguments["messages"] = [{"role": "user", "content": prompt}]
        else:
            arguments["prompt"] = prompt
        if self._with_twin_keys:
            arguments["extra_body"] = twin_keys(request)
        return arguments

    async def attempt(self, request: Request, start: float) -> RequestResult | Refusal:
        """One streamed call; a 429/503 comes back as a `Refusal` for the caller to retry."""
        resource = self._client.chat.completions if self._chat else self._client.completions
        try:
            async with resource.with_streaming_response.create(**self.arguments(request)) as response:
                ref = response.headers.get(REQUEST_ID_HEADER)
                return await self._read(await response.parse(), request, start, ref)
        except openai.APIStatusError as exc:
            ref = exc.response.headers.get(REQUEST_ID_HEADER)
            if exc.status_code in RETRY_STATUSES:
                wait_s = retry_after_s(exc.response.headers.get("Retry-After", "1"))
                return Refusal(exc.status_code, wait_s, _message(exc), ref)
            return failed(request, exc.status_code, _message(exc), ref)
        except openai.APIError as exc:  # no answer: refused, reset or timed out before the stream
            return failed(request, 0, f"{type(exc).__name__}: {_message(exc)}")

    async def _read(
        self, stream: openai.AsyncStream[Any], request: Request, start: float, ref: str | None
    ) -> RequestResult:
        """Token events, the usage count and the finish reason from one stream (see the docstring)."""
        first = math.nan
        events = 0
        usage_tokens: int | None = None
        finished = False
        error: str | None = None
        times: list[float] = []
        try:
            async for chunk in stream:
                if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    text = choice.delta.content if self._chat else choice.text
                    if text:
                        events += 1
                        now = time.monotonic() - start
                        if events == 1:
                            first = now
                        if self._record.times:
                            times.append(now)
                    finished = finished or choice.finish_reason is not None
        except openai.APIError as exc:  # an error event, a cut connection or a timeout mid-answer
            error = f"{type(exc).__name__}: {_message(exc)}"
        except ValueError as exc:  # a data line that is not JSON
            error = f"malformed event: {exc}"[:ERROR_TEXT_CHARS]
        if error is None and not finished:
            error = "the stream ended without a finish_reason: the answer is incomplete"
        return RequestResult(
            request.request_id,
            200,
            first,
            time.monotonic() - start,
            events if usage_tokens is None else usage_tokens,
            0,
            error,
            tuple(times),
            gateway_request_id=ref,
        )
