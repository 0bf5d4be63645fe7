"""TensorRT-LLM iteration statistics, byte for byte in the formats TRT-LLM and its Triton backend emit.

One `IterationStats` record describes one engine iteration, as the TRT-LLM executor's
`IterationStats` does (in-flight batching only). From it this module writes:

- the executor JSON (`JsonSerialization::toJsonStr`, nlohmann `dump()`), which trtllm-serve's
  `GET /metrics` returns as a JSON array of records;
- the flat JSON the Triton `tensorrtllm` backend builds in `WaitForStats()`, its verbose log line,
  and the `nv_trt_llm_*` gauge values that backend sets from that JSON;
- the `EngineStats` the control core consumes.

The record, its lenient JSON parser and the `EngineStats` conversion live in
`agent.engines.trtllm_stats`, shared with the sidecar's adapters that read real engines; they are
re-exported here. Sources (see reference/interfaces.md §1.2, §1.3, §1.5, §1.6, §9):
`NVIDIA/TensorRT-LLM:cpp/tensorrt_llm/executor/jsonSerialization.cpp@086f692`,
`cpp/include/tensorrt_llm/executor/types.h`, `cpp/tensorrt_llm/common/timestampUtils.cpp`,
`triton_backend/inflight_batcher_llm/src/model_instance_state.cc@0c8de69` (`WaitForStats`),
`.../custom_metrics_reporter/custom_metrics_reporter.cc@0d5352f`,
`triton-inference-server/common:src/logging.cc` (log preamble, JSON-escaped messages).

Timestamps: TRT-LLM writes the end of the iteration as `%m-%d-%Y %H:%M:%S.uuuuuu` in the engine's
local time. We always use UTC so output does not depend on the host's time zone; a Triton
container runs in UTC by default, where the two agree. Times are rounded to the nearest
microsecond: TRT-LLM truncates its integer clock, but our clock is a float, and truncating a
float that sits a hair below a microsecond boundary would drop that microsecond.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from agent.engines.trtllm_stats import (
    MICROS,
    TIMESTAMP_FORMAT,
    InflightBatchingStats,
    IterationStats,
    KvCacheStats,
    need,
    parse_executor_json,
    timestamp_micros,
    to_engine_stats,
)

__all__ = [
    "InflightBatchingStats",
    "IterationStats",
    "KvCacheStats",
    "parse_executor_json",
    "to_engine_stats",
    "to_executor_json",
    "to_triton_log_line",
    "to_triton_stats_json",
    "triton_gauge_values",
]

# Where the stats line is logged in the backend release whose logs interfaces.md §1.2 quotes.
_TRITON_LOG_SOURCE = "model_instance_state.cc:1115"


# ---------------------------------------------------------------------------------------------
# Timestamps


def _epoch_micros(timestamp: float) -> int:
    """Epoch seconds to whole microseconds (nearest; see the module docstring)."""
    return round(timestamp * MICROS)


def _format_utc(micros: int, fmt: str) -> str:
    seconds, fraction = divmod(micros, MICROS)
    return time.strftime(fmt, time.gmtime(seconds)) + f".{fraction:06d}"


def _format_timestamp(timestamp: float) -> str:
    """TRT-LLM's `getCurrentTimestamp()` form, e.g. "10-02-2024 23:45:42.275675" (UTC)."""
    return _format_utc(_epoch_micros(timestamp), TIMESTAMP_FORMAT)


# ---------------------------------------------------------------------------------------------
# Executor JSON (nlohmann)


def _nlohmann_double(value: float) -> str:
    """A double as nlohmann's `dump()` prints it.

    Shortest round-trip digits (nlohmann's Grisu2; Python's repr finds the same digits), placed
    by nlohmann's `format_buffer`: plain notation for decimal exponents in (-4, 15], otherwise
    `d.ddde+XX`; integral values keep a ".0"; NaN and infinities become null.
    """
    if not math.isfinite(value):
        return "null"
    if value == 0.0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + int(exponent or 0)  # the decimal point sits after this many digits
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 15:
        text = digits + "0" * (n - k) + ".0"
    elif 0 < n <= 15:
        text = digits[:n] + "." + digits[n:]
    elif -4 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        head = digits if k == 1 else digits[0] + "." + digits[1:]
        e = n - 1
        text = f"{head}e{'-' if e < 0 else '+'}{abs(e):02d}"
    return sign + text


def _dump(value: object) -> str:
    """Serialise like nlohmann `dump()`: compact, keys sorted (its default object is a std::map)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{_dump(value[key])}" for key in sorted(value)) + "}"
    if isinstance(value, float):
        return _nlohmann_double(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _double(value: float | None) -> float | None:
    """A C++ double member: printed with a decimal point even when integral."""
    return None if value is None else float(value)


def _kv_cache_json(kv: KvCacheStats) -> dict[str, Any]:
    return {
        "maxNumBlocks": kv.max_num_blocks,
        "freeNumBlocks": kv.free_num_blocks,
        "usedNumBlocks": kv.used_num_blocks,
        "tokensPerBlock": kv.tokens_per_block,
        "allocTotalBlocks": kv.alloc_total_blocks,
        "allocNewBlocks": kv.alloc_new_blocks,
        "reusedBlocks": kv.reused_blocks,
        "missedBlocks": kv.missed_blocks,
        "cacheHitRate": kv.cache_hit_rate,
    }


def _inflight_batching_json(ifb: InflightBatchingStats) -> dict[str, Any]:
    return {
        "numScheduledRequests": ifb.num_scheduled_requests,
        "numContextRequests": ifb.num_context_requests,
        "numGenRequests": ifb.num_gen_requests,
        "numPausedRequests": ifb.num_paused_requests,
        "numCtxTokens": ifb.num_ctx_tokens,
        "microBatchId": ifb.micro_batch_id,
        "avgNumDecodedTokensPerIter": _double(ifb.avg_num_decoded_tokens_per_iter),
    }


def to_executor_json(stats: IterationStats) -> str:
    """One record exactly as `JsonSerialization::toJsonStr(IterationStats)` dumps it.

    Keys are the C++ member names of the 2026 serializer, sorted at every level, compact.
    Keys we fill or leave null, and why:

    - the fields of `IterationStats`, `kvCacheStats` and `inflightBatchingStats`: filled (null
      where a parsed record lacked them);
    - `cacheHitRate`: derived from reused/missed blocks as TRT-LLM computes it, in C++ `float`,
      so 4 reused of 3125 prints 0.0012799999676644802 (the trtllm-serve docs show a rounded
      0.00128);
    - the ForwardPass fields the PyTorch backend fills from the same scheduler state:
      `scheduledNumPrefillRequests` = numContextRequests, `scheduledSumPrefillTokens` =
      numCtxTokens, `scheduledNumDecodeRequests` = numGenRequests, `queuedNumPrefillRequests`
      = numQueuedRequests, `queuedNumDecodeRequests` = numPausedRequests;
    - null, because no field determines them: `scheduledSumPrefillKvTokens`,
      `scheduledSumDecodeKvTokens`, `queuedSumPrefillTokens`, `queuedSumDecodeKvTokens` (per-request
      token sums), `maxBatchSize{Static,TunerRecommended,Runtime}` and
      `maxNumTokens{Static,TunerRecommended,Runtime}` (engine limits and the dynamic tuner),
      `staticBatchingStats` (we model in-flight batching only), `specDecodingStats` (no
      speculative decoding).

    `crossKvCacheStats` is a member of the C++ struct but not of the serializer, so it is absent.
    """
    kv = stats.kv_cache_stats
    ifb = stats.inflight_batching_stats
    record: dict[str, Any] = {
        "timestamp": None if stats.timestamp is None else _format_timestamp(stats.timestamp),
        "iter": stats.iter,
        "iterLatencyMS": _double(stats.iter_latency_ms),
        "newActiveRequestsQueueLatencyMS": _double(stats.new_active_requests_queue_latency_ms),
        "numNewActiveRequests": stats.num_new_active_requests,
        "numActiveRequests": stats.num_active_requests,
        "numQueuedRequests": stats.num_queued_requests,
        "numCompletedRequests": stats.num_completed_requests,
        "maxNumActiveRequests": stats.max_num_active_requests,
        "maxBatchSizeStatic": None,
        "maxBatchSizeTunerRecommended": None,
        "maxBatchSizeRuntime": None,
        "maxNumTokensStatic": None,
        "maxNumTokensTunerRecommended": None,
        "maxNumTokensRuntime": None,
        "gpuMemUsage": stats.gpu_mem_usage,
        "cpuMemUsage": stats.cpu_mem_usage,
        "pinnedMemUsage": stats.pinned_mem_usage,
        "kvCacheStats": None if kv is None else _kv_cache_json(kv),
        "staticBatchingStats": None,
        "inflightBatchingStats": None if ifb is None else _inflight_batching_json(ifb),
        "specDecodingStats": None,
        "scheduledNumPrefillRequests": None if ifb is None else ifb.num_context_requests,
        "scheduledSumPrefillTokens": None if ifb is None else ifb.num_ctx_tokens,
        "scheduledSumPrefillKvTokens": None,
        "scheduledNumDecodeRequests": None if ifb is None else ifb.num_gen_requests,
        "scheduledSumDecodeKvTokens": None,
        "queuedNumPrefillRequests": stats.num_queued_requests,
        "queuedSumPrefillTokens": None,
        "queuedNumDecodeRequests": None if ifb is None else ifb.num_paused_requests,
        "queuedSumDecodeKvTokens": None,
    }
    return _dump(record)


# ---------------------------------------------------------------------------------------------
# Triton tensorrtllm backend


def to_triton_stats_json(stats: IterationStats) -> str:
    """The flat JSON `WaitForStats()` builds from one record, key order and number format included.

    Integers print as `std::to_string` does; the two doubles with `%f` (6 decimals). The
    disaggregated-serving pair is 0: it sums per-request stats, which Triton leaves off by default
    (`request_stats_max_iterations` = 0). KV keys are omitted when the record has no KV stats, as
    the backend does; without in-flight batching stats it logs "Missing stats" and skips the
    record, so that raises `ValueError` here.
    """
    ifb = need(stats.inflight_batching_stats, "inflightBatchingStats")
    active = need(stats.num_active_requests, "numActiveRequests")
    timestamp = _format_timestamp(need(stats.timestamp, "timestamp"))
    fields: list[tuple[str, str]] = [
        ("Active Request Count", str(active)),
        ("Iteration Counter", str(stats.iter)),
        ("Max Request Count", str(need(stats.max_num_active_requests, "maxNumActiveRequests"))),
        ("Runtime CPU Memory Usage", str(need(stats.cpu_mem_usage, "cpuMemUsage"))),
        ("Runtime GPU Memory Usage", str(need(stats.gpu_mem_usage, "gpuMemUsage"))),
        ("Runtime Pinned Memory Usage", str(need(stats.pinned_mem_usage, "pinnedMemUsage"))),
        ("Timestamp", f'"{timestamp}"'),
        ("Context Requests", str(ifb.num_context_requests)),
        ("Generation Requests", str(ifb.num_gen_requests)),
        ("MicroBatch ID", str(ifb.micro_batch_id)),
        ("Paused Requests", str(ifb.num_paused_requests)),
        ("Scheduled Requests", str(ifb.num_scheduled_requests)),
        ("Total Context Tokens", str(ifb.num_ctx_tokens)),
        ("Waiting Requests", str(active - ifb.num_scheduled_requests)),
    ]
    kv = stats.kv_cache_stats
    if kv is not None:
        fraction = kv.used_num_blocks / kv.max_num_blocks if kv.max_num_blocks > 0 else 0.0
        fields += [
            ("Free KV cache blocks", str(kv.free_num_blocks)),
            ("Max KV cache blocks", str(kv.max_num_blocks)),
            ("Tokens per KV cache block", str(kv.tokens_per_block)),
            ("Used KV cache blocks", str(kv.used_num_blocks)),
            ("Reused KV cache blocks", str(need(kv.reused_blocks, "kvCacheStats.reusedBlocks"))),
            ("Fraction used KV cache blocks", f"{fraction:f}"),
        ]
    fields += [("KV cache transfer time", f"{0.0:f}"), ("Request count", "0")]
    return "{" + ",".join(f'"{key}":{value}' for key, value in fields) + "}"


def to_triton_log_line(stats: IterationStats, *, pid: int, logged_at_s: float | None = None) -> str:
    """The verbose log line Triton >= 24.x writes for one record (without the newline).

    Triton's default log format: `I<MMDD> <HH:MM:SS.uuuuuu> <pid> <file>:<line>] <message>`, time
    in UTC, the message JSON-escaped in quotes. `logged_at_s` is when the stats thread drained
    the record (a little after the iteration); it defaults to the iteration's own timestamp.
    """
    message = to_triton_stats_json(stats)
    logged_at = need(stats.timestamp, "timestamp") if logged_at_s is None else logged_at_s
    preamble = _format_utc(_epoch_micros(logged_at), "I%m%d %H:%M:%S")
    return f"{preamble} {pid} {_TRITON_LOG_SOURCE}] {json.dumps(message)}"


# (family, category labels, JSON keys): custom_metrics_reporter.cc pairs them by position.
_TRITON_GAUGE_FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "nv_trt_llm_request_metrics",
        ("active", "max", "scheduled", "context", "waiting"),
        (
            "Active Request Count",
            "Max Request Count",
            "Scheduled Requests",
            "Context Requests",
            "Waiting Requests",
        ),
    ),
    (
        "nv_trt_llm_runtime_memory_metrics",
        ("cpu", "gpu", "pinned"),
        ("Runtime CPU Memory Usage", "Runtime GPU Memory Usage", "Runtime Pinned Memory Usage"),
    ),
    (
        "nv_trt_llm_kv_cache_block_metrics",
        ("max", "free", "used", "tokens_per", "reused", "fraction"),
        (
            "Max KV cache blocks",
            "Free KV cache blocks",
            "Used KV cache blocks",
            "Tokens per KV cache block",
            "Reused KV cache blocks",
            "Fraction used KV cache blocks",
        ),
    ),
    (
        "nv_trt_llm_inflight_batcher_metrics",
        ("total_context_tokens", "generation_requests", "micro_batch_id", "paused_requests"),
        ("Total Context Tokens", "Generation Requests", "MicroBatch ID", "Paused Requests"),
    ),
    (
        "nv_trt_llm_general_metrics",
        ("timestamp", "iteration_counter"),
        ("Timestamp", "Iteration Counter"),
    ),
)


def triton_gauge_values(stats: IterationStats) -> dict[str, dict[str, float]]:
    """Gauge family -> {category label value -> value} as the backend sets them for one record.

    Computed the way `UpdateCustomMetrics` does, from the flat JSON: so `waiting` is active minus
    scheduled, `fraction` is used/max rounded to 6 decimals by `%f`, and `timestamp` is epoch
    microseconds (an int) parsed back from the timestamp string. A family none of whose keys is
    present (KV stats missing) is left out, as the backend leaves those gauges untouched. The
    disaggregated-serving family is a counter, not a gauge, and is not included.
    """
    flat = json.loads(to_triton_stats_json(stats))
    families: dict[str, dict[str, float]] = {}
    for family, labels, keys in _TRITON_GAUGE_FAMILIES:
        values = [
            timestamp_micros(flat[key]) if key == "Timestamp" else flat[key] for key in keys if key in flat
        ]
        if values:
            families[family] = dict(zip(labels, values, strict=False))
    return families
