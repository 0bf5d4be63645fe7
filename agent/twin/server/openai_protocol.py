r"""OpenAI-compatible requests and answers, in the words of vLLM and of trtllm-serve.

Requests (`POST /v1/completions`, `POST /v1/chat/completions`) are read the same way for both
servers; what differs is how each one answers, which `OpenAiDialect` holds:

- vLLM (~0.11, `vllm/entrypoints/openai/protocol.py`, `serving_completion.py`, `serving_chat.py`):
  non-streamed bodies are `model_dump()` of its pydantic models (every field, nulls included);
  completion chunks `model_dump_json(exclude_unset=False)` (reference/interfaces.md §3.3), chat
  chunks `exclude_unset=True`, the usage chunk `exclude_none=True`. Errors are
  `{"error": {"message", "type", "param", "code"}}`; an unknown model is 404 `NotFoundError`;
  a body that does not validate is 400 of type "Bad Request" (its RequestValidationError
  handler), one the serving layer refuses 400 `BadRequestError`.
- trtllm-serve (`tensorrt_llm/serve/openai_protocol.py@0076e93`,
  `postprocess_handlers.py@01bf192`, `openai_server.py@0005772`): every choice carries
  `avg_decoded_tokens_per_iter` (1.0 without speculative decoding, as the twin's iteration
  stats say), usage `prompt_tokens_details.cached_tokens`; chat chunks are `exclude_none=True`
  and the first (role) chunk is written `data: {json} \n\n` with a space before the blank
  line; streamed ids are the engine's request id (`cmpl-7`, `chatcmpl-7`). It answers any
  `model` (echoing it back) and its errors are the flat `{"object": "error", "message",
  "type", "param", "code"}`, except a body that does not validate: `{"error": "<text>"}`.

Both frame streams as `data: <json>\n\n`, one chunk per generated token, then `data: [DONE]`;
the chunk with the last token carries `finish_reason`: "length" when the request used all its
`max_tokens` (checked first, as vLLM's `check_stop` does), else "stop".

`max_tokens` defaults like vLLM for both servers: 16 for completions; for chat (where
`max_completion_tokens` wins over `max_tokens`) whatever the context window leaves after the
prompt. vLLM refuses a prompt that fills the window and a `max_tokens` that overflows it, with
its own messages; trtllm-serve leaves both to the engine (the twin's `RequestRejectedError`).

Twin-only keys, as in `agent.twin.server.protocol` (the `openai` SDK sends them via
`extra_body`): `prompt_tokens` (int >= 1, the prompt's length; without it the text is
estimated at four characters per token; chat adds `CHAT_TOKENS_PER_MESSAGE` per message for
its template) and `output_tokens` (int >= 1, stop early as at an end token, capped by
`max_tokens`). Generated text is synthetic: `TOKEN_TEXT` per token.

The twin serves one prompt and one choice per request (`n` = 1); other OpenAI keys are
accepted and ignored, as vLLM does with keys it does not know.
"""

from __future__ import annotations

import enum
import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from agent.twin.server.protocol import CHARS_PER_TOKEN, TOKEN_TEXT, dumps, estimate_prompt_tokens

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default, the OpenAI API's too
# Tokens a chat template adds around each message; the same estimate as the gateway's
# (`agent.sidecar.llm_protocol.CHAT_TOKENS_PER_MESSAGE`), so both size a chat request alike.
CHAT_TOKENS_PER_MESSAGE = 4
ASSISTANT = "assistant"
VLLM_VERSION = "0.11.0"
TRTLLM_VERSION = "1.0.0"
DONE_EVENT = b"data: [DONE]\n\n"


class ErrorKind(enum.Enum):
    """Why a request is refused: decides the status and, per server, the document."""

    VALIDATION = "validation"  # the body does not parse into the server's request model (400)
    BAD_REQUEST = "bad_request"  # the serving layer refuses it (400)
    NOT_FOUND = "not_found"  # no such model (404)
    TOO_LARGE = "too_large"  # the body exceeds the twin's bound (413)
    INTERNAL = "internal"  # the engine stopped before answering (500)


_STATUS = {
    ErrorKind.VALIDATION: HTTPStatus.BAD_REQUEST,
    ErrorKind.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    ErrorKind.NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorKind.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorKind.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}


class OpenAiError(Exception):
    """A request the server answers with an error document."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status(self) -> HTTPStatus:
        """The HTTP status it is answered with."""
        return _STATUS[self.kind]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the twin takes from one completions or chat completions body."""

    chat: bool
    model: str | None  # as the body names it; None when absent
    prompt_tokens: int  # given (`prompt_tokens`) or estimated from the text
    max_tokens: int | None  # as asked (chat: `max_completion_tokens`, else `max_tokens`); None: default
    output_tokens: int | None  # twin-only early stop; None: generate max_tokens
    stream: bool
    include_usage: bool  # `stream_options.include_usage`: a last chunk with usage
    continuous_usage: bool  # `stream_options.continuous_usage_stats` too: usage in every chunk


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What every chunk of one streamed answer repeats."""

    chat: bool
    response_id: str
    created: int  # epoch seconds at the request's start
    model: str
    prompt_tokens: int


def finish_reason(tokens: int, max_tokens: int) -> str:
    """Why an answer of `tokens` ended: "length" if it used all of max_tokens, else "stop" (an end token)."""
    return "length" if tokens >= max_tokens else "stop"


def token_text(tokens: int) -> str:
    """The synthetic text of `tokens` generated tokens."""
    return TOKEN_TEXT * tokens


# -- requests -----------------------------------------------------------------------------


def _document(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers past Python's digit
    # limit; RecursionError a body nested deeper than the parser's stack.
    except (ValueError, RecursionError) as exc:
        raise OpenAiError(ErrorKind.VALIDATION, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise OpenAiError(ErrorKind.VALIDATION, "the body must be a JSON object")
    return document


def _optional_int(document: dict[str, Any], key: str) -> int | None:
    value = document.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise OpenAiError(ErrorKind.VALIDATION, f"'{key}': input should be a valid integer, got {value!r}")
    return value


def _optional_bool(document: dict[str, Any], key: str, default: bool) -> bool:
    value = document.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OpenAiError(ErrorKind.VALIDATION, f"'{key}': input should be a valid boolean, got {value!r}")
    return value


def _twin_count(document: dict[str, Any], key: str) -> int | None:
    value = _optional_int(document, key)
    if value is not None and value < 1:
        raise OpenAiError(ErrorKind.VALIDATION, f"'{key}' must be at least 1, got {value}")
    return value


def _prompt_tokens(prompt: object) -> int:
    """A completions `prompt`: a string, token ids, or a list holding one of those."""
    if isinstance(prompt, str):
        return estimate_prompt_tokens(prompt)
    if not isinstance(prompt, list):
        raise OpenAiError(
            ErrorKind.VALIDATION, f"'prompt' must be a string or a list, got {type(prompt).__name__}"
        )
    if prompt and all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        return len(prompt)  # token ids: exact
    if len(prompt) != 1:
        raise OpenAiError(
            ErrorKind.BAD_REQUEST,
            f"the twin serves one prompt per request, got a list of {len(prompt)} prompts",
        )
    if not isinstance(prompt[0], str | list):
        raise OpenAiError(
            ErrorKind.VALIDATION, f"'prompt' items must be strings or token ids, got {prompt!r}"
        )
    return _prompt_tokens(prompt[0])


def _message_chars(message: object, index: int) -> int:
    """Characters of one chat message's text: its `content` string or its `text` parts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise OpenAiError(ErrorKind.VALIDATION, f"'messages'[{index}] must be an object with a string 'role'")
    content = message.get("content")
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise OpenAiError(
            ErrorKind.VALIDATION, f"'messages'[{index}].content must be a string, a list of parts or null"
        )
    return sum(
        len(part["text"])
        for part in content
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def chat_prompt_tokens(messages: object) -> int:
    """Estimated tokens of a conversation: its text plus the template's few tokens per message."""
    if not isinstance(messages, list):
        raise OpenAiError(ErrorKind.VALIDATION, "'messages' must be a list of messages")
    tokens = sum(
        math.ceil(_message_chars(message, i) / CHARS_PER_TOKEN) + CHAT_TOKENS_PER_MESSAGE
        for i, message in enumerate(messages)
    )
    return max(1, tokens)


def parse_request(body: bytes, *, chat: bool, dialect: OpenAiDialect) -> GenerationRequest:
    """Validate a completions (`chat` False) or chat completions body; raises OpenAiError."""
    document = _document(body)
    model = document.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAiError(ErrorKind.VALIDATION, f"'model': input should be a valid string, got {model!r}")
    if model is None and dialect.model_required:
        raise OpenAiError(ErrorKind.VALIDATION, "'model': field required")
    key = "messages" if chat else "prompt"
    if key not in document:
        raise OpenAiError(ErrorKind.VALIDATION, f"'{key}': field required")
    estimate = chat_prompt_tokens(document[key]) if chat else _prompt_tokens(document[key])
    max_tokens = _optional_int(document, "max_tokens")
    if chat:
        max_tokens = _optional_int(document, "max_completion_tokens") or max_tokens
    n = _optional_int(document, "n")
    if n is not None and n != 1:
        raise OpenAiError(ErrorKind.BAD_REQUEST, f"the twin serves one choice per request (n=1), got n={n}")
    stream = _optional_bool(document, "stream", False)
    options = document.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise OpenAiError(ErrorKind.VALIDATION, "'stream_options' must be an object")
    if options and not stream:
        raise OpenAiError(ErrorKind.VALIDATION, dialect.stream_options_error)
    include_usage = stream and options is not None and _optional_bool(options, "include_usage", True)
    prompt_tokens = _twin_count(document, "prompt_tokens")
    return GenerationRequest(
        chat=chat,
        model=model,
        prompt_tokens=estimate if prompt_tokens is None else prompt_tokens,
        max_tokens=max_tokens,
        output_tokens=_twin_count(document, "output_tokens"),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=include_usage and _optional_bool(options or {}, "continuous_usage_stats", False),
    )


def _positive_max_tokens(max_tokens: int) -> int:
    if max_tokens < 1:
        raise OpenAiError(ErrorKind.BAD_REQUEST, f"max_tokens must be at least 1, got {max_tokens}.")
    return max_tokens


# -- answers ------------------------------------------------------------------------------


def sse(payload: dict[str, Any], *, space: bool = False) -> bytes:
    r"""One server-sent event (`space`: trtllm-serve's first chat chunk, `data: {json} \n\n`)."""
    return f"data: {dumps(payload, sort_keys=False)}{' ' if space else ''}\n\n".encode()


def _random_id() -> str:
    return uuid.uuid4().hex


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    """UsageInfo's fields in its declaration order."""
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


class OpenAiDialect(ABC):
    """How one server answers: ids, field sets, error documents and its context-length rules."""

    name: str  # the `--api` value
    version: str  # what `GET /version` reports
    model_required: bool  # the request model has no default
    stream_options_error: str  # its validator's message for stream_options without stream

    @abstractmethod
    def error_document(self, error: OpenAiError) -> dict[str, Any]:
        """The error body for `error`."""

    @abstractmethod
    def answered_model(self, asked: str | None, served: str) -> str:
        """The model name the answer carries; raises OpenAiError for a model it does not serve."""

    @abstractmethod
    def engine_max_tokens(self, request: GenerationRequest, max_model_len: int) -> int:
        """The engine request's max_tokens; raises OpenAiError where the server refuses it first."""

    @abstractmethod
    def models(self, served: str, max_model_len: int, created: int) -> dict[str, Any]:
        """`GET /v1/models`."""

    @abstractmethod
    def stream_id(self, chat: bool, engine_request_id: int) -> str:
        """The id every chunk of a streamed answer carries."""

    @abstractmethod
    def response(self, context: StreamContext, tokens: int, reason: str) -> dict[str, Any]:
        """A whole answer of `tokens` tokens (the context's id and time, not a stream's)."""

    @abstractmethod
    def first_chat_event(self, context: StreamContext, continuous_usage: bool) -> bytes:
        """The chat stream's role chunk, sent with the first token."""

    @abstractmethod
    def token_event(
        self, context: StreamContext, text: str, reason: str | None, usage: dict[str, Any] | None
    ) -> bytes:
        """One chunk of new text; `reason` on the last, `usage` with continuous usage stats."""

    @abstractmethod
    def usage_event(self, context: StreamContext, completion_tokens: int) -> bytes:
        """The last chunk with `include_usage`: no choices, the request's usage."""

    def new_context(self, request: GenerationRequest, model: str, response_id: str) -> StreamContext:
        """The fields one answer repeats, stamped now."""
        return StreamContext(request.chat, response_id, int(time.time()), model, request.prompt_tokens)

    def response_id(self, chat: bool) -> str:
        """The id of a non-streamed answer (a fresh UUID, as both servers' pydantic defaults)."""
        return f"{'chatcmpl' if chat else 'cmpl'}-{_random_id()}"

    def continuous_usage(self, context: StreamContext, completion_tokens: int) -> dict[str, Any]:
        """The usage a chunk carries with `continuous_usage_stats`."""
        return _usage(context.prompt_tokens, completion_tokens)

    def error_event(self, error: OpenAiError) -> bytes:
        """An error inside an already started stream."""
        return sse(self.error_document(error))


def _object(context: StreamContext, *, chunk: bool) -> str:
    if context.chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _head(context: StreamContext, *, chunk: bool) -> dict[str, Any]:
    return {
        "id": context.response_id,
        "object": _object(context, chunk=chunk),
        "created": context.created,
        "model": context.model,
    }


class VllmDialect(OpenAiDialect):
    """vLLM's OpenAI server (V1 engine)."""

    name = "vllm"
    version = VLLM_VERSION
    model_required = False  # vLLM falls back to its first served model
    stream_options_error = "Stream options can only be defined when `stream=True`."

    def error_document(self, error: OpenAiError) -> dict[str, Any]:
        """`ErrorResponse(error=ErrorInfo(...))`; validation errors are typed by the status phrase."""
        kinds = {
            ErrorKind.VALIDATION: HTTPStatus.BAD_REQUEST.phrase,
            ErrorKind.BAD_REQUEST: "BadRequestError",
            ErrorKind.NOT_FOUND: "NotFoundError",
            ErrorKind.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE.phrase,
            ErrorKind.INTERNAL: "InternalServerError",
        }
        return {
            "error": {
                "message": error.message,
                "type": kinds[error.kind],
                "param": None,
                "code": error.status,
            }
        }

    def answered_model(self, asked: str | None, served: str) -> str:
        """`_check_model`: only the served name (or none at all)."""
        if asked is None or asked == served:
            return served
        raise OpenAiError(ErrorKind.NOT_FOUND, f"The model `{asked}` does not exist.")

    def engine_max_tokens(self, request: GenerationRequest, max_model_len: int) -> int:
        """`_validate_input`: the prompt must leave room, an explicit max_tokens must fit."""
        prompt = request.prompt_tokens
        if prompt >= max_model_len:
            raise OpenAiError(
                ErrorKind.BAD_REQUEST,
                f"This model's maximum context length is {max_model_len} tokens. However, your request "
                f"has {prompt} input tokens. Please reduce the length of the input messages.",
            )
        asked = request.max_tokens
        if asked is None:
            asked = max_model_len - prompt if request.chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        if prompt + asked > max_model_len:
            raise OpenAiError(
                ErrorKind.BAD_REQUEST,
                f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {prompt} input tokens "
                f"({asked} > {max_model_len} - {prompt}).",
            )
        return _positive_max_tokens(asked)

    def models(self, served: str, max_model_len: int, created: int) -> dict[str, Any]:
        """`ModelList` of one `ModelCard` with vLLM's permission record."""
        permission = {
            "id": f"modelperm-{_random_id()}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": served,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": served,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [permission],
        }
        return {"object": "list", "data": [card]}

    def stream_id(self, chat: bool, engine_request_id: int) -> str:
        """A fresh UUID per request, like its non-streamed ids."""
        return self.response_id(chat)

    def response(self, context: StreamContext, tokens: int, reason: str) -> dict[str, Any]:
        """`CompletionResponse` / `ChatCompletionResponse`, `model_dump()`."""
        text = token_text(tokens)
        if context.chat:
            message = {"role": ASSISTANT, "reasoning_content": None, "content": text, "tool_calls": []}
            choice = {"index": 0, "message": message, "logprobs": None}
            choice |= {"finish_reason": reason, "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            choice |= {"stop_reason": None, "prompt_logprobs": None}
        body = _head(context, chunk=False) | {
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(context.prompt_tokens, tokens) | {"prompt_tokens_details": None},
        }
        if context.chat:
            body["prompt_logprobs"] = None
        return body | {"kv_transfer_params": None}

    def continuous_usage(self, context: StreamContext, completion_tokens: int) -> dict[str, Any]:
        """Completion chunks dump every field (`prompt_tokens_details` too); chat chunks only those set."""
        usage = _usage(context.prompt_tokens, completion_tokens)
        return usage if context.chat else usage | {"prompt_tokens_details": None}

    def first_chat_event(self, context: StreamContext, continuous_usage: bool) -> bytes:
        """Role and empty content, `exclude_unset=True`."""
        choice = {"index": 0, "delta": {"role": ASSISTANT, "content": ""}, "logprobs": None}
        chunk = _head(context, chunk=True) | {"choices": [choice | {"finish_reason": None}]}
        if continuous_usage:
            chunk["usage"] = self.continuous_usage(context, 0)
        return sse(chunk)

    def token_event(
        self, context: StreamContext, text: str, reason: str | None, usage: dict[str, Any] | None
    ) -> bytes:
        """Completions: every field (`usage` null unless continuous); chat: only those set."""
        if context.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None}
            choice["finish_reason"] = reason
            if reason is not None:
                choice["stop_reason"] = None
            chunk = _head(context, chunk=True) | {"choices": [choice]}
            if usage is not None:
                chunk["usage"] = usage
            return sse(chunk)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        return sse(_head(context, chunk=True) | {"choices": [choice], "usage": usage})

    def usage_event(self, context: StreamContext, completion_tokens: int) -> bytes:
        """`exclude_none=True`: no `prompt_tokens_details`."""
        usage = _usage(context.prompt_tokens, completion_tokens)
        return sse(_head(context, chunk=True) | {"choices": [], "usage": usage})


class TrtllmServeDialect(OpenAiDialect):
    """TensorRT-LLM's `trtllm-serve`."""

    name = "trtllm-serve"
    version = TRTLLM_VERSION
    model_required = True
    stream_options_error = "Stream options can only be defined when stream is true."
    AVG_DECODED_TOKENS_PER_ITER = 1.0

    def error_document(self, error: OpenAiError) -> dict[str, Any]:
        """`ErrorResponse` flat; its RequestValidationError handler answers `{"error": str(exc)}`."""
        if error.kind is ErrorKind.VALIDATION:
            return {"error": error.message}
        kinds = {
            ErrorKind.BAD_REQUEST: "BadRequestError",
            ErrorKind.NOT_FOUND: "NotFoundError",
            ErrorKind.TOO_LARGE: "BadRequestError",
            ErrorKind.INTERNAL: "InternalServerError",
        }
        return {
            "object": "error",
            "message": error.message,
            "type": kinds[error.kind],
            "param": None,
            "code": error.status,
        }

    def answered_model(self, asked: str | None, served: str) -> str:
        """trtllm-serve checks no model name: the answer echoes the request's."""
        assert asked is not None  # required by its request model (parse_request)
        return asked

    def engine_max_tokens(self, request: GenerationRequest, max_model_len: int) -> int:
        """The defaults vLLM uses; whether it fits is the engine's to say."""
        asked = request.max_tokens
        if asked is None:
            room = max_model_len - request.prompt_tokens
            return max(1, room) if request.chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        return _positive_max_tokens(asked)

    def models(self, served: str, max_model_len: int, created: int) -> dict[str, Any]:
        """`ModelList(data=[ModelCard(id=model)])`."""
        card = {"id": served, "object": "model", "created": created, "owned_by": "tensorrt_llm"}
        return {"object": "list", "data": [card]}

    def stream_id(self, chat: bool, engine_request_id: int) -> str:
        """`f"{prefix}-{rsp.id}"`: the engine's request id."""
        return f"{'chatcmpl' if chat else 'cmpl'}-{engine_request_id}"

    def _usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return _usage(prompt, completion) | {"prompt_tokens_details": {"cached_tokens": 0}}

    def continuous_usage(self, context: StreamContext, completion_tokens: int) -> dict[str, Any]:
        """Every chunk's usage has the cached-token details."""
        return self._usage(context.prompt_tokens, completion_tokens)

    def response(self, context: StreamContext, tokens: int, reason: str) -> dict[str, Any]:
        """`completion_response_post_processor` / `chat_response_post_processor`, `model_dump()`."""
        text = token_text(tokens)
        avg = self.AVG_DECODED_TOKENS_PER_ITER
        if context.chat:
            message = {"role": ASSISTANT, "content": text, "reasoning_content": "", "reasoning": None}
            choice = {"index": 0, "message": message | {"tool_calls": []}, "logprobs": None}
            choice |= {"finish_reason": reason, "stop_reason": None, "mm_embedding_handle": None}
            tail: dict[str, Any] = {"prompt_token_ids": None, "prompt_token_ids_b64": None}
        else:
            choice = {"index": 0, "text": text, "token_ids": None, "logprobs": None, "context_logits": None}
            choice |= {"finish_reason": reason, "stop_reason": None}
            tail = {"prompt_token_ids": None}
        choice |= {"disaggregated_params": None, "avg_decoded_tokens_per_iter": avg}
        usage = self._usage(context.prompt_tokens, tokens)
        return _head(context, chunk=False) | {"choices": [choice], "usage": usage} | tail

    def first_chat_event(self, context: StreamContext, continuous_usage: bool) -> bytes:
        """`yield_first_chat`: the role alone, `exclude_none=True`, a space before the blank line."""
        chunk = _head(context, chunk=True) | {"choices": [{"index": 0, "delta": {"role": ASSISTANT}}]}
        if continuous_usage:
            chunk["usage"] = self._usage(context.prompt_tokens, 0)
        return sse(chunk, space=True)

    def token_event(
        self, context: StreamContext, text: str, reason: str | None, usage: dict[str, Any] | None
    ) -> bytes:
        """Completions dump every field; chat chunks drop the nulls."""
        avg = self.AVG_DECODED_TOKENS_PER_ITER
        if context.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text, "reasoning_content": ""}}
            if reason is not None:
                choice["finish_reason"] = reason
            chunk = _head(context, chunk=True) | {"choices": [choice | {"avg_decoded_tokens_per_iter": avg}]}
            if usage is not None:
                chunk["usage"] = usage
            return sse(chunk)
        choice = {"index": 0, "text": text, "token_ids": None, "logprobs": None, "finish_reason": reason}
        choice |= {"stop_reason": None, "avg_decoded_tokens_per_iter": avg}
        return sse(_head(context, chunk=True) | {"choices": [choice], "usage": usage})

    def usage_event(self, context: StreamContext, completion_tokens: int) -> bytes:
        """`model_dump_json()` of the final usage chunk: every field."""
        usage = self._usage(context.prompt_tokens, completion_tokens)
        return sse(_head(context, chunk=True) | {"choices": [], "usage": usage})
