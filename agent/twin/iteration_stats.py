"""TensorRT-LLM iteration statistics, byte for byte in the formats TRT-LLM and its Triton backend emit.

One `IterationStats` record describes one engine iteration, as the TRT-LLM executor's
`IterationStats` does (in-flight batching only). From it this module writes:

- the executor JSON (`JsonSerialization::toJsonStr`, nlohmann `dump()`), which trtllm-serve's
  `GET /metrics` returns as a JSON array of records;
- the flat JSON the Triton `tensorrtllm` backend builds in `WaitForStats()`, its verbose log line,
  and the `nv_trt_llm_*` gauge values that backend sets from that JSON;
- the `EngineStats` the control core consumes.

It also parses the executor JSON back, leniently, for the sidecar's trtllm-serve adapter.
Sources (see reference/interfaces.md §1.2, §1.3, §1.5, §1.6, §9):
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

import calendar
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.domain import EngineStats

_T = TypeVar("_T")
_MICROS = 1_000_000
_TIMESTAMP_FORMAT = "%m-%d-%Y %H:%M:%S"
# Where the stats line is logged in the backend release whose logs interfaces.md §1.2 quotes.
_TRITON_LOG_SOURCE = "model_instance_state.cc:1115"


def _float32(value: float) -> float:
    """The value a C++ `float` member holds, widened back to double as nlohmann does when dumping."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True, slots=True)
class KvCacheStats:
    """The executor's `KvCacheStats`: the paged KV-cache pool after the iteration."""

    max_num_blocks: int  # maxNumBlocks: blocks in the primary pool
    free_num_blocks: int  # freeNumBlocks
    used_num_blocks: int  # usedNumBlocks
    tokens_per_block: int  # tokensPerBlock
    alloc_total_blocks: int | None  # allocTotalBlocks: blocks handed out since start (new + reused)
    alloc_new_blocks: int | None  # allocNewBlocks: of those, freshly allocated
    reused_blocks: int | None  # reusedBlocks: of those, served from the prefix cache
    missed_blocks: int | None  # missedBlocks: prefix-cache lookups that missed; newer releases only

    @property
    def cache_hit_rate(self) -> float | None:
        """`cacheHitRate`, computed as TRT-LLM does: reused / (reused + missed) in C++ `float`."""
        if self.reused_blocks is None or self.missed_blocks is None:
            return None
        if self.reused_blocks == 0:
            return 0.0
        reused = _float32(self.reused_blocks)
        return _float32(reused / _float32(reused + _float32(self.missed_blocks)))


@dataclass(frozen=True, slots=True)
class InflightBatchingStats:
    """The executor's `InflightBatchingStats`: what the in-flight batcher scheduled this iteration."""

    num_scheduled_requests: int  # numScheduledRequests: requests in this iteration's batch
    num_context_requests: int  # numContextRequests: of which in prefill (context phase)
    num_gen_requests: int  # numGenRequests: of which decoding
    num_paused_requests: int  # numPausedRequests: preempted, waiting to resume
    num_ctx_tokens: int  # numCtxTokens: prefill tokens processed
    micro_batch_id: int  # microBatchId: 0 unless pipeline parallelism overlaps micro-batches
    avg_num_decoded_tokens_per_iter: float | None  # C++ float; > 1 only with speculative decoding

    def __post_init__(self) -> None:
        """Hold the average as the C++ `float` it is, so a serialise/parse round trip is exact."""
        if self.avg_num_decoded_tokens_per_iter is not None:
            object.__setattr__(
                self, "avg_num_decoded_tokens_per_iter", _float32(self.avg_num_decoded_tokens_per_iter)
            )


@dataclass(frozen=True, slots=True)
class IterationStats:
    """One engine iteration as TRT-LLM's executor `IterationStats` reports it (in-flight batching).

    Only `iter` is always present; anything else may be missing from a parsed record (older
    releases, trimmed examples) and is then None.
    """

    timestamp: float | None  # end of the iteration, epoch seconds
    iter: int  # iteration counter, from 0 when the executor starts
    iter_latency_ms: float | None  # iterLatencyMS: wall time of this iteration
    new_active_requests_queue_latency_ms: float | None  # queue time summed over requests started now
    num_new_active_requests: int | None  # requests that left the queue and became active now
    num_active_requests: int | None  # admitted and not finished
    num_queued_requests: int | None  # waiting in the executor's request queue
    num_completed_requests: int | None  # finished in this iteration
    max_num_active_requests: int | None  # capacity: max sequences the engine holds at once
    gpu_mem_usage: int | None  # gpuMemUsage: runtime GPU memory, bytes
    cpu_mem_usage: int | None  # cpuMemUsage: runtime CPU memory, bytes
    pinned_mem_usage: int | None  # pinnedMemUsage: runtime pinned host memory, bytes
    kv_cache_stats: KvCacheStats | None  # kvCacheStats
    inflight_batching_stats: InflightBatchingStats | None  # inflightBatchingStats


# ---------------------------------------------------------------------------------------------
# Timestamps


def _epoch_micros(timestamp: float) -> int:
    """Epoch seconds to whole microseconds (nearest; see the module docstring)."""
    return round(timestamp * _MICROS)


def _format_utc(micros: int, fmt: str) -> str:
    seconds, fraction = divmod(micros, _MICROS)
    return time.strftime(fmt, time.gmtime(seconds)) + f".{fraction:06d}"


def _format_timestamp(timestamp: float) -> str:
    """TRT-LLM's `getCurrentTimestamp()` form, e.g. "10-02-2024 23:45:42.275675" (UTC)."""
    return _format_utc(_epoch_micros(timestamp), _TIMESTAMP_FORMAT)


def _timestamp_micros(text: str) -> int:
    """Epoch microseconds of a TRT-LLM timestamp; the older form without microseconds is accepted."""
    head, dot, fraction = text.partition(".")
    try:
        seconds = calendar.timegm(time.strptime(head, _TIMESTAMP_FORMAT))
    except ValueError as exc:
        raise ValueError(f"timestamp {text!r} is not MM-DD-YYYY HH:MM:SS[.ffffff]") from exc
    if not dot:
        return seconds * _MICROS
    if len(fraction) != 6 or not fraction.isdigit():
        raise ValueError(f"timestamp {text!r} must have exactly 6 fractional digits")
    return seconds * _MICROS + int(fraction)


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
# Parsing executor JSON (trtllm-serve /metrics)


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value


def _req_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = _opt_int(obj, key, where)
    if value is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return value


def _opt_float(obj: dict[str, Any], key: str, where: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    return float(value)


def _opt_object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{where}: {key!r} must be an object, got {value!r}")
    return value


def _parse_kv_cache(obj: dict[str, Any], where: str) -> KvCacheStats:
    return KvCacheStats(
        max_num_blocks=_req_int(obj, "maxNumBlocks", where),
        free_num_blocks=_req_int(obj, "freeNumBlocks", where),
        used_num_blocks=_req_int(obj, "usedNumBlocks", where),
        tokens_per_block=_req_int(obj, "tokensPerBlock", where),
        alloc_total_blocks=_opt_int(obj, "allocTotalBlocks", where),
        alloc_new_blocks=_opt_int(obj, "allocNewBlocks", where),
        reused_blocks=_opt_int(obj, "reusedBlocks", where),
        missed_blocks=_opt_int(obj, "missedBlocks", where),
    )


def _parse_inflight_batching(obj: dict[str, Any], where: str) -> InflightBatchingStats:
    return InflightBatchingStats(
        num_scheduled_requests=_req_int(obj, "numScheduledRequests", where),
        num_context_requests=_req_int(obj, "numContextRequests", where),
        num_gen_requests=_req_int(obj, "numGenRequests", where),
        num_paused_requests=_req_int(obj, "numPausedRequests", where),
        num_ctx_tokens=_req_int(obj, "numCtxTokens", where),
        micro_batch_id=_req_int(obj, "microBatchId", where),
        avg_num_decoded_tokens_per_iter=_opt_float(obj, "avgNumDecodedTokensPerIter", where),
    )


def _parse_record(obj: object, where: str) -> IterationStats:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    timestamp = obj.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise ValueError(f"{where}: 'timestamp' must be a string, got {timestamp!r}")
    kv = _opt_object(obj, "kvCacheStats", where)
    ifb = _opt_object(obj, "inflightBatchingStats", where)
    return IterationStats(
        timestamp=None if timestamp is None else _timestamp_micros(timestamp) / _MICROS,
        iter=_req_int(obj, "iter", where),
        iter_latency_ms=_opt_float(obj, "iterLatencyMS", where),
        new_active_requests_queue_latency_ms=_opt_float(obj, "newActiveRequestsQueueLatencyMS", where),
        num_new_active_requests=_opt_int(obj, "numNewActiveRequests", where),
        num_active_requests=_opt_int(obj, "numActiveRequests", where),
        num_queued_requests=_opt_int(obj, "numQueuedRequests", where),
        num_completed_requests=_opt_int(obj, "numCompletedRequests", where),
        max_num_active_requests=_opt_int(obj, "maxNumActiveRequests", where),
        gpu_mem_usage=_opt_int(obj, "gpuMemUsage", where),
        cpu_mem_usage=_opt_int(obj, "cpuMemUsage", where),
        pinned_mem_usage=_opt_int(obj, "pinnedMemUsage", where),
        kv_cache_stats=None if kv is None else _parse_kv_cache(kv, f"{where} kvCacheStats"),
        inflight_batching_stats=(
            None if ifb is None else _parse_inflight_batching(ifb, f"{where} inflightBatchingStats")
        ),
    )


def parse_executor_json(text: str) -> list[IterationStats]:
    """Records from executor JSON: one object, or the array trtllm-serve's `/metrics` returns.

    Lenient, because the key set grows with every TRT-LLM release: unknown keys are ignored and
    absent or null ones become None. Strict where guessing would mislead: invalid JSON, a
    record without `iter`, or a value of the wrong type raise `ValueError`.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"iteration stats are not valid JSON: {exc}") from exc
    records = data if isinstance(data, list) else [data]
    return [_parse_record(obj, f"iteration stats record {i}") for i, obj in enumerate(records)]


# ---------------------------------------------------------------------------------------------
# Triton tensorrtllm backend


def _need(value: _T | None, name: str) -> _T:
    """The value of a field this output cannot do without; a clear error if the record lacks it."""
    if value is None:
        raise ValueError(f"iteration stats lack {name}")
    return value


def to_triton_stats_json(stats: IterationStats) -> str:
    """The flat JSON `WaitForStats()` builds from one record, key order and number format included.

    Integers print as `std::to_string` does; the two doubles with `%f` (6 decimals). The
    disaggregated-serving pair is 0: it sums per-request stats, which Triton leaves off by default
    (`request_stats_max_iterations` = 0). KV keys are omitted when the record has no KV stats, as
    the backend does; without in-flight batching stats it logs "Missing stats" and skips the
    record, so that raises `ValueError` here.
    """
    ifb = _need(stats.inflight_batching_stats, "inflightBatchingStats")
    active = _need(stats.num_active_requests, "numActiveRequests")
    timestamp = _format_timestamp(_need(stats.timestamp, "timestamp"))
    fields: list[tuple[str, str]] = [
        ("Active Request Count", str(active)),
        ("Iteration Counter", str(stats.iter)),
        ("Max Request Count", str(_need(stats.max_num_active_requests, "maxNumActiveRequests"))),
        ("Runtime CPU Memory Usage", str(_need(stats.cpu_mem_usage, "cpuMemUsage"))),
        ("Runtime GPU Memory Usage", str(_need(stats.gpu_mem_usage, "gpuMemUsage"))),
        ("Runtime Pinned Memory Usage", str(_need(stats.pinned_mem_usage, "pinnedMemUsage"))),
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
            ("Reused KV cache blocks", str(_need(kv.reused_blocks, "kvCacheStats.reusedBlocks"))),
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
    logged_at = _need(stats.timestamp, "timestamp") if logged_at_s is None else logged_at_s
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
            _timestamp_micros(flat[key]) if key == "Timestamp" else flat[key] for key in keys if key in flat
        ]
        if values:
            families[family] = dict(zip(labels, values, strict=False))
    return families


# ---------------------------------------------------------------------------------------------
# Control-core view


def to_engine_stats(stats: IterationStats) -> EngineStats:
    """The core's `EngineStats` from one record (milliseconds become seconds).

    Raises `ValueError` if the record lacks what the core needs: timestamp, active requests, KV
    and in-flight batching stats.
    """
    ifb = _need(stats.inflight_batching_stats, "inflightBatchingStats")
    kv = _need(stats.kv_cache_stats, "kvCacheStats")
    latency_ms = stats.iter_latency_ms
    return EngineStats(
        timestamp_s=_need(stats.timestamp, "timestamp"),
        iteration=stats.iter,
        active_requests=_need(stats.num_active_requests, "numActiveRequests"),
        queued_requests=stats.num_queued_requests,
        scheduled_requests=ifb.num_scheduled_requests,
        context_requests=ifb.num_context_requests,
        generation_requests=ifb.num_gen_requests,
        paused_requests=ifb.num_paused_requests,
        context_tokens=ifb.num_ctx_tokens,
        kv_blocks_used=kv.used_num_blocks,
        kv_blocks_max=kv.max_num_blocks,
        tokens_per_block=kv.tokens_per_block,
        iteration_latency_s=None if latency_ms is None else latency_ms / 1000.0,
    )
