"""TensorRT-LLM executor iteration statistics: the record, its JSON parser, and the core's view.

One `IterationStats` record describes one engine iteration, as the TRT-LLM executor's
`IterationStats` does (in-flight batching only). trtllm-serve's `GET /metrics` returns these
records as a JSON array; the Triton `tensorrtllm` backend exports the last one of each poll as
`nv_trt_llm_*` gauges. The sidecar's adapters read them from there; the twin
(`agent.twin.iteration_stats`) writes them. Both share this module, so the record has one
definition and what reads the twin's output is the code that reads a real engine.

Sources (reference/interfaces.md §1.2, §1.5, §1.6): `NVIDIA/TensorRT-LLM:cpp/tensorrt_llm/executor/
jsonSerialization.cpp@086f692`, `cpp/include/tensorrt_llm/executor/types.h`,
`cpp/tensorrt_llm/common/timestampUtils.cpp`.

Timestamps: TRT-LLM writes the end of the iteration as `%m-%d-%Y %H:%M:%S.uuuuuu` in the engine's
local time. We read it as UTC, the time zone a Triton or trtllm-serve container runs in by default.
"""

from __future__ import annotations

import calendar
import json
import struct
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.domain import EngineStats

_T = TypeVar("_T")
MICROS = 1_000_000  # microseconds per second
TIMESTAMP_FORMAT = "%m-%d-%Y %H:%M:%S"  # TRT-LLM's timestamp, before the ".uuuuuu" fraction


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


def timestamp_micros(text: str) -> int:
    """Epoch microseconds of a TRT-LLM timestamp; the older form without microseconds is accepted."""
    head, dot, fraction = text.partition(".")
    try:
        seconds = calendar.timegm(time.strptime(head, TIMESTAMP_FORMAT))
    except ValueError as exc:
        raise ValueError(f"timestamp {text!r} is not MM-DD-YYYY HH:MM:SS[.ffffff]") from exc
    if not dot:
        return seconds * MICROS
    if len(fraction) != 6 or not fraction.isdigit():
        raise ValueError(f"timestamp {text!r} must have exactly 6 fractional digits")
    return seconds * MICROS + int(fraction)


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


def parse_executor_record(obj: object, where: str) -> IterationStats:
    """One decoded JSON object as a record; `where` names it in error messages.

    Public so a reader can parse an array record by record and skip a bad one without losing the
    rest (trtllm-serve adapter); the rules are those of `parse_executor_json`.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    timestamp = obj.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise ValueError(f"{where}: 'timestamp' must be a string, got {timestamp!r}")
    kv = _opt_object(obj, "kvCacheStats", where)
    ifb = _opt_object(obj, "inflightBatchingStats", where)
    return IterationStats(
        timestamp=None if timestamp is None else timestamp_micros(timestamp) / MICROS,
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
    return [parse_executor_record(obj, f"iteration stats record {i}") for i, obj in enumerate(records)]


# ---------------------------------------------------------------------------------------------
# Required fields


def need(value: _T | None, name: str) -> _T:
    """The value of a field this output cannot do without; a clear error if the record lacks it."""
    if value is None:
        raise ValueError(f"iteration stats lack {name}")
    return value


# ---------------------------------------------------------------------------------------------
# Control-core view


def to_engine_stats(stats: IterationStats) -> EngineStats:
    """The core's `EngineStats` from one record (milliseconds become seconds).

    Raises `ValueError` if the record lacks what the core needs: timestamp, active requests, KV
    and in-flight batching stats.
    """
    ifb = need(stats.inflight_batching_stats, "inflightBatchingStats")
    kv = need(stats.kv_cache_stats, "kvCacheStats")
    latency_ms = stats.iter_latency_ms
    return EngineStats(
        timestamp_s=need(stats.timestamp, "timestamp"),
        iteration=stats.iter,
        active_requests=need(stats.num_active_requests, "numActiveRequests"),
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
