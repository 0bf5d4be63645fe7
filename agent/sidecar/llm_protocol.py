"""What the gateway reads from LLM requests and responses: sizes in, tokens out, errors back.

Two APIs reach the engine through the gateway (reference/interfaces.md):

- Triton's generate extension (§2.1): `text_input`, `max_tokens` (top level or in `parameters`,
  scalar or 1-element list; the llmapi model's `sampling_param_max_tokens`), `stream`;
  responses are one JSON document, or `data: <json>` events without a `[DONE]`. Errors are
  `{"error": "<message>"}`, also as an event inside a 200 stream.
- Triton's KServe v2 inference (`/v2/models/{m}/infer`): the same ensemble inputs as named
  tensors, `{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data":
  [...]}, {"name": "max_tokens", ...}]}`; the answer's `outputs` list `text_output` and, when
  asked for, `num_output_tokens`.
- OpenAI-compatible completions and chat completions (§3.3): `prompt` / `messages`,
  `max_tokens` / `max_completion_tokens`, `stream`; events end with `data: [DONE]`; `usage`
  carries exact counts when present. Errors are `{"error": {"message", "type", "param", "code"}}`.

The twin accepts two optional keys a real Triton ignores (`agent.twin.server.protocol`): the
request's `prompt_tokens` and, with `return_num_output_tokens`, each response's
`num_output_tokens` (tokens in that response). Both are used when present: they are exact.

A body the engine could not take either is refused here (`MalformedRequestError`, a 400 in
the route's shape) rather than sized: token counts beyond INT32 (TRT-LLM's `max_tokens` is an
INT32 tensor, vLLM's limits are smaller still) and JSON nested deeper than `MAX_JSON_DEPTH`,
checked before parsing (the parser would recurse until RecursionError).

Everything here is plain data in, plain data out: the gateway does the I/O.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.sidecar.prompt_tokens import PromptTokenCounter

OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default, also vLLM's
# Tokens a chat template adds around each message (role markers, separators): a small,
# model-independent estimate, after the OpenAI cookbook's "3 per message + 3 for the reply".
CHAT_TOKENS_PER_MESSAGE = 4
MAX_TOKEN_COUNT = 2**31 - 1  # INT32, the type of TRT-LLM's max_tokens tensor
# Real requests nest a few levels (chat content parts, tool schemas: ~10-20); this is far above.
MAX_JSON_DEPTH = 128
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # possessive: linear on long strings
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_DEPTH_BLOCK = 1 << 18


class MalformedRequestError(ValueError):
    """A request no engine would run: answered 400 without forwarding it."""


class Api(enum.Enum):
    """Which API a path speaks: decides the error document's shape."""

    TRITON = "triton"
    OPENAI = "openai"


class Kind(enum.Enum):
    """The tracked operations."""

    GENERATE = "generate"
    GENERATE_STREAM = "generate_stream"
    INFER = "infer"
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class Route:
    """One tracked route: its aiohttp path template (also its name in spans and stats)."""

    path: str
    api: Api
    kind: Kind


TRACKED_ROUTES = (
    Route("/v2/models/{model}/generate", Api.TRITON, Kind.GENERATE),
    Route("/v2/models/{model}/generate_stream", Api.TRITON, Kind.GENERATE_STREAM),
    Route("/v2/models/{model}/versions/{version}/generate", Api.TRITON, Kind.GENERATE),
    Route("/v2/models/{model}/versions/{version}/generate_stream", Api.TRITON, Kind.GENERATE_STREAM),
    Route("/v2/models/{model}/infer", Api.TRITON, Kind.INFER),
    Route("/v2/models/{model}/versions/{version}/infer", Api.TRITON, Kind.INFER),
    Route("/v1/completions", Api.OPENAI, Kind.COMPLETIONS),
    Route("/v1/chat/completions", Api.OPENAI, Kind.CHAT),
)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the scoreboard needs to know about a request before it runs."""

    model: str | None  # the path's model (Triton) or the body's `model` (OpenAI)
    stream: bool  # the client asked for tokens as they are generated
    prompt_tokens: int
    max_tokens: int
    parsed: bool  # the body was a JSON object; False: sizes are estimates from the raw bytes


def api_for_path(path: str) -> Api:
    """The API an untracked path most likely speaks, for the gateway's own error answers."""
    return Api.OPENAI if path.startswith("/v1/") else Api.TRITON


def error_body(api: Api, status: int, message: str) -> bytes:
    """An error document in the API's own shape."""
    if api is Api.TRITON:
        return json.dumps({"error": message}).encode()
    error = {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": None, "code": status}
    return json.dumps({"error": error}).encode()


_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "forbidden",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    429: "hold_queue_full",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def read_request(
    route: Route,
    body: bytes | bytearray,
    path_model: str | None,
    counter: PromptTokenCounter,
    default_max_tokens: int,
    *,
    binary_header_length: str | None = None,
) -> RequestFacts:
    """Sizes of one request; a body that is not a JSON object is sized from its raw text.

    `binary_header_length`: the request's `Inference-Header-Content-Length` (KServe binary
    tensors: the JSON is that many bytes, tensor data follows). MalformedRequestError when the
    body nests too deep or a token count is out of range.
    """
    body, binary = split_binary_tensors(body, binary_header_length)
    check_json_depth(body)
    document = _json(body)
    fallback_max = (
        OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS if route.kind is Kind.COMPLETIONS else default_max_tokens
    )
    if not isinstance(document, dict):
        text = body.decode("utf-8", errors="replace")
        return RequestFacts(path_model, False, counter.count(text), fallback_max, parsed=False)
    if route.kind is Kind.INFER:
        return _triton_request(_infer_keys(document, binary), path_model, counter, fallback_max)
    if route.api is Api.TRITON:
        return _triton_request(document, path_model, counter, fallback_max)
    if route.kind is Kind.CHAT:
        max_tokens = _count(document, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _count(document, "max_tokens")
        prompt = _chat_prompt_tokens(document.get("messages"), counter)
    else:
        max_tokens = _count(document, "max_tokens")
        prompt = _completion_prompt_tokens(document.get("prompt"), counter)
    model = document.get("model")
    return RequestFacts(
        model=model if isinstance(model, str) else path_model,
        stream=document.get("stream") is True,
        prompt_tokens=prompt,
        max_tokens=max_tokens if max_tokens is not None and max_tokens > 0 else fallback_max,
        parsed=True,
    )


def _triton_request(
    document: dict[str, Any], model: str | None, counter: PromptTokenCounter, fallback_max: int
) -> RequestFacts:
    """Top-level keys win over `parameters`, as Triton maps both to the same input tensors."""
    parameters = document.get("parameters")
    keys = {**(parameters if isinstance(parameters, dict) else {}), **document}
    max_tokens = _count(keys, "max_tokens")
    if max_tokens is None:
        max_tokens = _count(keys, "sampling_param_max_tokens")
    prompt = _count(keys, "prompt_tokens")
    if prompt is None or prompt < 1:
        text = _scalar(keys.get("text_input"))
        prompt = counter.count(text) if isinstance(text, str) else 0
    return RequestFacts(
        model=model,
        stream=_scalar(keys.get("stream")) is True,
        prompt_tokens=prompt,
        max_tokens=max_tokens if max_tokens is not None and max_tokens > 0 else fallback_max,
        parsed=True,
    )


def split_binary_tensors(
    body: bytes | bytearray, header_length: str | None
) -> tuple[bytes | bytearray, bytes | bytearray]:
    """(JSON, binary tensor data) of a body; all JSON without a usable header length."""
    if header_length is None or not header_length.isdigit() or int(header_length) > len(body):
        return body, b""
    split = int(header_length)
    return body[:split], body[split:]


def _infer_keys(document: dict[str, Any], binary: bytes | bytearray = b"") -> dict[str, Any]:
    """A KServe v2 message's tensors by name (their first element), as generate would have them.

    `inputs` and `outputs` alike; a tensor sent as binary data (`parameters.binary_data_size`)
    takes the next that many bytes of `binary`, in the order the tensors are listed.
    """
    keys: dict[str, Any] = {}
    parameters = document.get("parameters")
    if isinstance(parameters, dict):
        keys["parameters"] = parameters
    tensors = document.get("inputs", document.get("outputs"))
    offset = 0
    for tensor in tensors if isinstance(tensors, list) else ():
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            continue
        size = _binary_size(tensor)
        if size is None:
            keys[tensor["name"]] = _flat_first(tensor.get("data"))
            continue
        data = binary[offset : offset + size]
        offset += size
        keys[tensor["name"]] = _first_binary_element(data, tensor.get("datatype"))
    return keys


def _binary_size(tensor: dict[str, Any]) -> int | None:
    parameters = tensor.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


_BINARY_INTS = {"INT32": (4, True), "INT64": (8, True), "UINT32": (4, False), "UINT64": (8, False)}


def _first_binary_element(data: bytes | bytearray, datatype: object) -> object:
    """The first element of a binary tensor (little-endian; BYTES: 4-byte length, then the bytes)."""
    if datatype == "BYTES":
        if len(data) < 4:
            return None
        length = int.from_bytes(data[:4], "little")
        return (
            bytes(data[4 : 4 + length]).decode("utf-8", errors="replace") if 4 + length <= len(data) else None
        )
    if datatype == "BOOL":
        return bool(data[0]) if data else None
    width, signed = _BINARY_INTS.get(datatype, (0, False)) if isinstance(datatype, str) else (0, False)
    if not width or len(data) < width:
        return None
    return int.from_bytes(data[:width], "little", signed=signed)


def _flat_first(data: object) -> object:
    """The first element of a tensor's data, flattened or nested by its shape ([[x]] is x)."""
    while isinstance(data, list) and data:
        data = data[0]
    return data


def check_json_depth(body: bytes | bytearray) -> None:
    """MalformedRequestError when arrays and objects nest deeper than MAX_JSON_DEPTH.

    Strings are cut out first (brackets inside them do not nest), then the depth is the
    running sum of +1 per opening and -1 per closing bracket, in numpy: linear and in C, a
    block at a time so the running sums of a 16 MiB body never take more than a few MiB.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:
        return
    depth = 0
    for start in range(0, len(brackets), _DEPTH_BLOCK):
        block = np.frombuffer(
            brackets, dtype=np.uint8, count=min(_DEPTH_BLOCK, len(brackets) - start), offset=start
        )
        running = np.cumsum(_BRACKET_STEP[block], dtype=np.int64) + depth
        if int(running.max()) > MAX_JSON_DEPTH:
            raise MalformedRequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        depth = int(running[-1])


def _completion_prompt_tokens(prompt: object, counter: PromptTokenCounter) -> int:
    """`prompt` is a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return counter.count(prompt)
    if not isinstance(prompt, list):
        return 0
    if all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return sum(_completion_prompt_tokens(item, counter) for item in prompt)


def _chat_prompt_tokens(messages: object, counter: PromptTokenCounter) -> int:
    """Each message's text (a string or `text` parts) plus the template's few tokens."""
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += counter.count(content)
        elif isinstance(content, list):
            total += sum(
                counter.count(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        total += CHAT_TOKENS_PER_MESSAGE
    return total


class ResponseTokens:
    """Output tokens of one response, from its events or its whole body.

    `failed` turns True when a 2xx response carries an error document or event (Triton sends
    errors inside an already-started 200 stream; vLLM does the same for OpenAI streams).
    """

    def __init__(self, route: Route, facts: RequestFacts, counter: PromptTokenCounter) -> None:
        self.route = route
        self.facts = facts
        self.counter = counter
        self.failed = False
        self.done = False  # the stream's end marker (OpenAI `[DONE]`) went by: the answer is whole
        self.total = 0  # tokens counted so far from events

    def event(self, data: bytes) -> int:
        """New tokens in one event's data."""
        if self.route.api is Api.TRITON:
            new = self._triton(data, per_response=1 if self.facts.stream else self.facts.max_tokens)
        else:
            new = self._openai_event(data)
        self.total += new
        return new

    def body(self, body: bytes, binary_header_length: str | None = None) -> int:
        """Tokens in a whole (non-streamed) answer; `binary_header_length` as for `read_request`."""
        if self.route.kind is Kind.INFER:
            return self._infer(*split_binary_tensors(body, binary_header_length))
        body = bytes(split_binary_tensors(body, binary_header_length)[0])
        if self.route.api is Api.TRITON:
            return self._triton(body, per_response=self.facts.max_tokens)
        document = _json(body)
        if not isinstance(document, dict) or self._is_error(document):
            return 0
        usage = _usage_tokens(document)
        if usage is not None:
            return usage
        texts = (_choice_text(choice) for choice in _choices(document))
        return sum(self.counter.count(text) for text in texts)

    def _triton(self, data: bytes, per_response: int) -> int:
        """One Triton response: its `num_output_tokens` if given, else `per_response`.

        With streaming (decoupled model) TRT-LLM sends one response per generated token by
        default; without, the single response holds the whole answer (up to `max_tokens`).
        """
        document = _json(data)
        if not isinstance(document, dict):
            return per_response
        if self._is_error(document):
            return 0
        given = _int(document.get("num_output_tokens"))
        return per_response if given is None or given < 0 else given

    def _infer(self, body: bytes | bytearray, binary: bytes | bytearray) -> int:
        """A KServe v2 answer: its `num_output_tokens` output if given, else `max_tokens`."""
        document = _json(body)
        if not isinstance(document, dict) or self._is_error(document):
            return 0
        outputs = _infer_keys({"outputs": document.get("outputs")}, binary)
        given = _int(outputs.get("num_output_tokens"))
        return self.facts.max_tokens if given is None or given < 0 else given

    def _openai_event(self, data: bytes) -> int:
        """Choices that carry output (1 each, or their `token_ids`); `usage` corrects the total."""
        if data.strip() == b"[DONE]":
            self.done = True
            return 0
        document = _json(data)
        if not isinstance(document, dict) or self._is_error(document):
            return 0
        total = self.total + sum(_choice_tokens(choice) for choice in _choices(document))
        usage = _usage_tokens(document)  # cumulative: last chunk, or every chunk with continuous stats
        if usage is not None:
            total = max(total, usage)
        return total - self.total

    def _is_error(self, document: dict[str, Any]) -> bool:
        error = "error" in document or document.get("object") == "error"
        self.failed = self.failed or error
        return error


def _choices(document: dict[str, Any]) -> list[dict[str, Any]]:
    choices = document.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _choice_tokens(choice: dict[str, Any]) -> int:
    """Tokens in one streamed choice: its token ids if listed (trtllm-serve), else 1 if not empty."""
    token_ids = choice.get("token_ids")
    if isinstance(token_ids, list):
        return len(token_ids)
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat: content, reasoning_content, tool_calls... but not the role
        return int(any(value for key, value in delta.items() if key != "role"))
    return int(bool(choice.get("text")))


def _choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _usage_tokens(document: dict[str, Any]) -> int | None:
    usage = document.get("usage")
    return _int(usage.get("completion_tokens")) if isinstance(usage, dict) else None


def _json(data: bytes | bytearray) -> object:
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def _scalar(value: object) -> object:
    """A Triton input given as a 1-element list is the same as the scalar."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _count(keys: dict[str, Any], name: str) -> int | None:
    """A token count the request gives, refused beyond what an engine takes."""
    value = _int(keys.get(name))
    if value is not None and not -MAX_TOKEN_COUNT <= value <= MAX_TOKEN_COUNT:
        raise MalformedRequestError(f"{name} must be at most {MAX_TOKEN_COUNT} in magnitude, got {value}")
    return value


def _int(value: object) -> int | None:
    value = _scalar(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
