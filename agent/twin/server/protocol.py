"""Triton's generate extension as the TensorRT-LLM `ensemble` model answers it, plus KServe metadata.

Requests (reference/interfaces.md §2.1; `server:src/http_server.cc`): every top-level key and
every key of `parameters` maps to the ensemble input of that name; other keys are ignored
(Triton turns them into request parameters the model never reads). A key given in both places
takes its top-level value. Scalars may also come as one-element lists (1-D tensors).

Twin-only keys (`TWIN_KEYS`), harmless to a real Triton (they become ignored request
parameters); a KServe infer request gives them in its `parameters`:

- `prompt_tokens` (int >= 1): the prompt's length in tokens. Without it the twin estimates
  `ceil(len(text_input) / 4)`, at least 1, since it has no tokenizer.
- `output_tokens` (int >= 1): stop after this many tokens, as if the model emitted its end
  token; capped by `max_tokens`. Without it every request generates exactly `max_tokens`
  tokens (a live request's true length is unknown until it ends).

Responses carry every output the ensemble produces (`response_outputs`, shared with KServe
infer) plus `model_name`, `model_version`, the request's `id` and the response parameters, keys
sorted (Triton builds them from a `std::map`), compact JSON. Generated text is synthetic:
`TOKEN_TEXT` per token. Without `exclude_input_in_output` a non-streaming
answer starts with the prompt, as TRT-LLM's does; streamed chunks carry new tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_TEXT = " tok"  # the text of every generated token
CHARS_PER_TOKEN = 4  # prompt length estimate when the request does not say
MODEL_VERSION = "1"
# Triton 2.45's extension list (`core:src/server.cc`) less what the twin does not serve:
# classification, sequence, schedule_policy, system and CUDA shared memory, trace, logging.
SERVER_METADATA = {
    "name": "triton",
    "version": "2.45.0",
    "extensions": [
        "model_repository",
        "model_repository(unload_dependents)",
        "model_configuration",
        "binary_tensor_data",
        "parameters",
        "statistics",
    ],
}
MULTIPLE_RESPONSES_ERROR = (
    "generate expects model to produce exactly 1 response, use generate stream for model that "
    "generates various number of responses"
)
# The TensorRT-LLM backend's refusal of `stream` when the model is not decoupled.
STREAMING_NEEDS_DECOUPLED_ERROR = "Streaming is only supported if model is deployed using decoupled mode."
# The twin-only keys: request parameters a real Triton ignores (see the module docstring).
TWIN_KEYS = ("prompt_tokens", "output_tokens")
# What every ensemble response carries besides its tensors (response parameters).
RESPONSE_PARAMETERS: dict[str, object] = {"sequence_end": False, "sequence_id": 0, "sequence_start": False}

# The ensemble's inputs and outputs: (name, datatype, dims without the batch dimension), from
# `TensorRT-LLM:triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt@2a9abd9`
# (logits as FP32, the default `logits_datatype`).
ENSEMBLE_INPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_input", "BYTES", (1,)),
    ("decoder_text_input", "BYTES", (1,)),
    ("max_tokens", "INT32", (1,)),
    ("num_return_sequences", "INT32", (1,)),
    ("bad_words", "BYTES", (-1,)),
    ("stop_words", "BYTES", (-1,)),
    ("exclude_input_in_output", "BOOL", (1,)),
    ("end_id", "INT32", (1,)),
    ("pad_id", "INT32", (1,)),
    ("top_k", "INT32", (1,)),
    ("top_p", "FP32", (1,)),
    ("temperature", "FP32", (1,)),
    ("length_penalty", "FP32", (1,)),
    ("repetition_penalty", "FP32", (1,)),
    ("min_tokens", "INT32", (1,)),
    ("presence_penalty", "FP32", (1,)),
    ("frequency_penalty", "FP32", (1,)),
    ("seed", "UINT64", (1,)),
    ("return_log_probs", "BOOL", (1,)),
    ("return_context_logits", "BOOL", (1,)),
    ("return_generation_logits", "BOOL", (1,)),
    ("return_perf_metrics", "BOOL", (1,)),
    ("return_num_input_tokens", "BOOL", (1,)),
    ("return_num_output_tokens", "BOOL", (1,)),
    ("beam_width", "INT32", (1,)),
    ("stream", "BOOL", (1,)),
    ("prompt_embedding_table", "FP16", (-1, -1)),
    ("prompt_table_extra_id", "UINT64", (1,)),
    ("prompt_vocab_size", "INT32", (1,)),
    ("embedding_bias_words", "BYTES", (-1,)),
    ("embedding_bias_weights", "FP32", (-1,)),
    ("lora_task_id", "UINT64", (1,)),
    ("lora_weights", "FP16", (-1, -1)),
    ("lora_config", "INT32", (-1, 3)),
    ("guided_decoding_guide_type", "BYTES", (1,)),
    ("guided_decoding_guide", "BYTES", (1,)),
)
REQUIRED_INPUTS = ("text_input", "max_tokens")
ENSEMBLE_OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_output", "BYTES", (-1,)),
    ("cum_log_probs", "FP32", (-1,)),
    ("output_log_probs", "FP32", (-1, -1)),
    ("context_logits", "FP32", (-1, -1)),
    ("generation_logits", "FP32", (-1, -1, -1)),
    ("batch_index", "INT32", (1,)),
    ("sequence_index", "INT32", (1,)),
    ("kv_cache_alloc_new_blocks", "INT32", (1,)),
    ("kv_cache_reused_blocks", "INT32", (1,)),
    ("kv_cache_alloc_total_blocks", "INT32", (1,)),
    ("arrival_time_ns", "INT64", (1,)),
    ("first_scheduled_time_ns", "INT64", (1,)),
    ("first_token_time_ns", "INT64", (1,)),
    ("last_token_time_ns", "INT64", (1,)),
    ("acceptance_rate", "FP32", (1,)),
    ("total_accepted_draft_tokens", "INT32", (1,)),
    ("total_draft_tokens", "INT32", (1,)),
    ("num_input_tokens", "INT32", (1,)),
    ("num_output_tokens", "INT32", (1,)),
)
_INPUT_NAMES = frozenset(name for name, _, _ in ENSEMBLE_INPUTS)


class BadRequestError(ValueError):
    """A generate request Triton would refuse with HTTP 400."""


def dumps(payload: object, *, sort_keys: bool = True) -> str:
    """Compact JSON in raw UTF-8, as Triton's RapidJSON writer emits it (generate responses: keys sorted)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)


def error_body(message: str) -> str:
    """Triton's error document."""
    return dumps({"error": message})


def sse_event(payload: str) -> bytes:
    """One server-sent event exactly as Triton frames a streamed response."""
    return f"data: {payload}\n\n".encode()


def model_metadata(model_name: str) -> dict[str, Any]:
    """`GET /v2/models/<m>`: the ensemble's tensors with the batch dimension first."""

    def tensors(specs: tuple[tuple[str, str, tuple[int, ...]], ...]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": [-1, *dims]} for n, d, dims in specs]

    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": "ensemble",
        "inputs": tensors(ENSEMBLE_INPUTS),
        "outputs": tensors(ENSEMBLE_OUTPUTS),
    }


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """What the twin takes from one generate request."""

    request_id: str | None  # `id`, echoed in every response
    text_input: str
    max_tokens: int
    stream: bool  # ask the model for one response per token
    prompt_tokens: int  # given (`prompt_tokens`) or estimated from `text_input`
    output_tokens: int | None  # twin-only early stop; None: generate max_tokens
    exclude_input_in_output: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    return_perf_metrics: bool


@dataclass(frozen=True, slots=True)
class ResponseTiming:
    """TRT-LLM's perf-metric outputs, nanoseconds since the epoch."""

    arrival_ns: int
    first_scheduled_ns: int
    first_token_ns: int
    last_token_ns: int


def _scalar(name: str, value: object) -> object:
    """A one-element 1-D tensor is its element."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRequestError(f"input '{name}' must hold exactly one element, got {len(value)}")
        return value[0]
    return value


def _as_int(name: str, value: object, minimum: int) -> int:
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"unable to parse input '{name}': expected an integer, got {value!r}")
    if value < minimum:
        raise BadRequestError(f"input '{name}' must be at least {minimum}, got {value}")
    return value


def _as_bool(name: str, value: object) -> bool:
    value = _scalar(name, value)
    if not isinstance(value, bool):
        raise BadRequestError(f"unable to parse input '{name}': expected a boolean, got {value!r}")
    return value


def estimate_prompt_tokens(text: str) -> int:
    """Prompt length without a tokenizer: about four characters per token, at least one."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def parse_json(body: bytes) -> object:
    """A request body's JSON; BadRequestError, worded as Triton words it, when it is not JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"failed to parse the request JSON buffer: {exc}") from exc
    except RecursionError as exc:  # nesting deeper than the parser recurses
        raise BadRequestError("failed to parse the request JSON buffer: the JSON nests too deep") from exc


def parse_generate(body: bytes, model_name: str) -> GenerateParams:
    """Validate one generate request body; raises BadRequestError with Triton-like messages."""
    document = parse_json(body)
    if not isinstance(document, dict):
        raise BadRequestError("failed to parse the request JSON buffer: expected a JSON object")
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError("'parameters' must be a JSON object")
    top_level = {k: v for k, v in document.items() if k != "parameters"}
    return generate_params({**parameters, **top_level}, model_name)


def generate_params(keys: Mapping[str, object], model_name: str) -> GenerateParams:
    """What the twin takes from a request's inputs (by name), its `id` and the twin-only keys.

    Shared by generate (the body's keys) and KServe infer (the input tensors, the request's
    `id` and its parameters); raises BadRequestError.
    """
    request_id = keys.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f"'id' must be a string, got {request_id!r}")
    given = sorted(k for k in keys if k in _INPUT_NAMES)
    missing = [name for name in REQUIRED_INPUTS if name not in keys]
    if missing:
        raise BadRequestError(
            f"[request id: {request_id or '<id_unknown>'}] expected number of inputs between "
            f"{len(REQUIRED_INPUTS)} and {len(ENSEMBLE_INPUTS)} but got {len(given)} inputs for model "
            f"'{model_name}'. Got input(s) {given}, but missing required input(s) {missing}. "
            "Please provide all required input(s)."
        )
    text = _scalar("text_input", keys["text_input"])
    if not isinstance(text, str):
        raise BadRequestError(f"unable to parse input 'text_input': expected a string, got {text!r}")

    def flag(name: str) -> bool:
        return _as_bool(name, keys[name]) if name in keys else False

    prompt = keys.get("prompt_tokens")
    output = keys.get("output_tokens")
    return GenerateParams(
        request_id=request_id,
        text_input=text,
        max_tokens=_as_int("max_tokens", keys["max_tokens"], 1),
        stream=flag("stream"),
        prompt_tokens=estimate_prompt_tokens(text) if prompt is None else _as_int("prompt_tokens", prompt, 1),
        output_tokens=None if output is None else _as_int("output_tokens", output, 1),
        exclude_input_in_output=flag("exclude_input_in_output"),
        return_num_input_tokens=flag("return_num_input_tokens"),
        return_num_output_tokens=flag("return_num_output_tokens"),
        return_perf_metrics=flag("return_perf_metrics"),
    )


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output tensor of an ensemble response, as KServe infer sends it."""

    name: str
    datatype: str  # KServe datatype, from ENSEMBLE_OUTPUTS
    shape: tuple[int, ...]  # batch dimension first
    values: tuple[object, ...]  # elements in row-major order


def response_outputs(
    params: GenerateParams, tokens: int, timing: ResponseTiming, *, streamed: bool
) -> list[OutputTensor]:
    """The tensors one response carries (`tokens` new tokens), in ENSEMBLE_OUTPUTS order.

    Shapes are TensorRT-LLM's for one request and one beam: [batch, beam] for per-sequence
    values, [batch, beam, tokens] for per-token log probs, the logits as one-element dummies
    unless asked for. The optional outputs come only when the request asks for them.
    """
    text = TOKEN_TEXT * tokens
    if not streamed and not params.exclude_input_in_output:
        text = params.text_input + text
    produced: dict[str, tuple[tuple[int, ...], tuple[object, ...]]] = {
        "text_output": ((1, 1), (text,)),
        "cum_log_probs": ((1, 1), (0.0,)),
        "output_log_probs": ((1, 1, tokens), (0.0,) * tokens),
        "context_logits": ((1, 1, 1), (0.0,)),
        "generation_logits": ((1, 1, 1, 1), (0.0,)),
        "batch_index": ((1, 1), (0,)),
        "sequence_index": ((1, 1), (0,)),
    }
    if params.return_num_input_tokens:
        produced["num_input_tokens"] = ((1, 1), (params.prompt_tokens,))
    if params.return_num_output_tokens:
        produced["num_output_tokens"] = ((1, 1), (tokens,))
    if params.return_perf_metrics:
        produced |= {
            "arrival_time_ns": ((1, 1), (timing.arrival_ns,)),
            "first_scheduled_time_ns": ((1, 1), (timing.first_scheduled_ns,)),
            "first_token_time_ns": ((1, 1), (timing.first_token_ns,)),
            "last_token_time_ns": ((1, 1), (timing.last_token_ns,)),
        }
    return [
        OutputTensor(name, datatype, *produced[name])
        for name, datatype, _ in ENSEMBLE_OUTPUTS
        if name in produced
    ]


def response_body(
    model_name: str,
    params: GenerateParams,
    tokens: int,
    timing: ResponseTiming,
    *,
    streamed: bool,
) -> str:
    """One generate response carrying `tokens` new tokens (one streamed chunk, or the whole answer).

    Each output tensor is a key: a one-element tensor as its element, others as a flat list.
    """
    body: dict[str, Any] = {**RESPONSE_PARAMETERS, "model_name": model_name, "model_version": MODEL_VERSION}
    if params.request_id is not None:
        body["id"] = params.request_id
    for tensor in response_outputs(params, tokens, timing, streamed=streamed):
        body[tensor.name] = tensor.values[0] if len(tensor.values) == 1 else list(tensor.values)
    return dumps(body)
