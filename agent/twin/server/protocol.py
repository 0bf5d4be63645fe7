"""Triton's generate extension as the TensorRT-LLM `ensemble` model answers it, plus KServe metadata.

Requests (reference/interfaces.md §2.1; `server:src/http_server.cc`): every top-level key and
every key of `parameters` maps to the ensemble input of that name; other keys are ignored
(Triton turns them into request parameters the model never reads). A key given in both places
takes its top-level value. Scalars may also come as one-element lists (1-D tensors).

Twin-only keys, harmless to a real Triton (they become ignored request parameters):

- `prompt_tokens` (int >= 1): the prompt's length in tokens. Without it the twin estimates
  `ceil(len(text_input) / 4)`, at least 1, since it has no tokenizer.
- `output_tokens` (int >= 1): stop after this many tokens, as if the model emitted its end
  token; capped by `max_tokens`. Without it every request generates exactly `max_tokens`
  tokens (a live request's true length is unknown until it ends).

Responses carry every output the ensemble produces plus `model_name`, `model_version` and the
request's `id`, keys sorted (Triton builds them from a `std::map`), compact JSON. Generated
text is synthetic: `TOKEN_TEXT` per token. Without `exclude_input_in_output` a non-streaming
answer starts with the prompt, as TRT-LLM's does; streamed chunks carry new tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOKEN_TEXT = " tok"  # the text of every generated token
CHARS_PER_TOKEN = 4  # prompt length estimate when the request does not say
MODEL_VERSION = "1"
SERVER_METADATA = {
    "name": "triton",
    "version": "2.45.0",
    "extensions": [
        "classification",
        "sequence",
        "model_repository",
        "model_repository(unload_dependents)",
        "schedule_policy",
        "model_configuration",
        "system_shared_memory",
        "cuda_shared_memory",
        "binary_tensor_data",
        "parameters",
        "statistics",
        "trace",
        "logging",
    ],
}
MULTIPLE_RESPONSES_ERROR = (
    "generate expects model to produce exactly 1 response, use generate stream for model that "
    "generates various number of responses"
)

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


def parse_generate(body: bytes, model_name: str) -> GenerateParams:
    """Validate one generate request body; raises BadRequestError with Triton-like messages."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"failed to parse the request JSON buffer: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequestError("failed to parse the request JSON buffer: expected a JSON object")
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError("'parameters' must be a JSON object")
    keys = {**parameters, **{k: v for k, v in document.items() if k != "parameters"}}
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


def response_body(
    model_name: str,
    params: GenerateParams,
    tokens: int,
    timing: ResponseTiming,
    *,
    streamed: bool,
) -> str:
    """One response carrying `tokens` new tokens (one streamed chunk, or the whole answer)."""
    text = TOKEN_TEXT * tokens
    if not streamed and not params.exclude_input_in_output:
        text = params.text_input + text
    body: dict[str, Any] = {
        "batch_index": 0,
        "context_logits": 0.0,
        "cum_log_probs": 0.0,
        "generation_logits": 0.0,
        "model_name": model_name,
        "model_version": MODEL_VERSION,
        "output_log_probs": 0.0 if tokens == 1 else [0.0] * tokens,
        "sequence_end": False,
        "sequence_id": 0,
        "sequence_index": 0,
        "sequence_start": False,
        "text_output": text,
    }
    if params.request_id is not None:
        body["id"] = params.request_id
    if params.return_num_input_tokens:
        body["num_input_tokens"] = params.prompt_tokens
    if params.return_num_output_tokens:
        body["num_output_tokens"] = tokens
    if params.return_perf_metrics:
        body |= {
            "arrival_time_ns": timing.arrival_ns,
            "first_scheduled_time_ns": timing.first_scheduled_ns,
            "first_token_time_ns": timing.first_token_ns,
            "last_token_time_ns": timing.last_token_ns,
        }
    return dumps(body)
