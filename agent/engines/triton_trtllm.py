"""Triton with the TensorRT-LLM backend: `EngineStats` from the `nv_trt_llm_*` gauges.

The C++ `tensorrtllm` backend drains the executor's iteration stats every
`stats_check_period_ms` (100 ms by default) and sets one gauge per JSON key of the *last*
iteration drained (reference/interfaces.md §1.1-§1.3). So a scrape shows one iteration: the
gauges rebuild that executor record (`triton_record`), and `to_engine_stats` (shared with
trtllm-serve and the twin) turns it into the core's view. What the gauges cannot tell, and so
stays unknown: the executor queue length (`queued_requests` is None: "waiting" is active minus
scheduled, not the queue) and the iteration latency (None).

Quirks handled:

- `general_type="timestamp"` is epoch microseconds in current backends and was epoch seconds in
  the release the backend README quotes: values below 1e12 are read as seconds.
- Every gauge is registered at model load and reads 0 until the first stats poll, so a zero
  timestamp means "no iteration yet" (None, healthy), and a KV `max` of 0 means the engine sends
  no KV-cache stats (the backend then leaves those gauges unset).
- Essential families (request, KV-cache, in-flight batcher, general) missing — as on Triton's
  LLM-API Python model, which registers no `nv_trt_llm_*` metrics at all, or with static
  batching — give None and an unhealthy `health` whose error names them.
- `paused_requests` and `micro_batch_id` are absent from older backends: read as 0, logged once.
- Several models or versions on one server: `model` and `version` select one; by default the
  only one present, else `EngineConfigError` listing the choices.
- The iteration counter going backwards (or the same counter with another timestamp) is an
  engine restart: logged and counted in `health.restarts`; the same counter and timestamp as
  the last poll is nothing new (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Unpack

from agent.domain import EngineStats
from agent.engines.base import MAX_COUNTER, IterationChange, MissingMetricsError, plausible
from agent.engines.http import HttpOptions, HttpPollingAdapter
from agent.engines.prometheus_text import (
    Samples,
    count,
    label_choices,
    only_families,
    parse_samples,
    select,
    values_by_label,
)
from agent.engines.trtllm_stats import InflightBatchingStats, IterationStats, KvCacheStats, to_engine_stats

REQUEST = "nv_trt_llm_request_metrics"
KV_CACHE = "nv_trt_llm_kv_cache_block_metrics"
INFLIGHT_BATCHER = "nv_trt_llm_inflight_batcher_metrics"
GENERAL = "nv_trt_llm_general_metrics"
STATIC_BATCHING = "nv_trt_llm_v1_metrics"
_PREFIX = "nv_trt_llm_"

# family -> (category label, series EngineStats needs, series read as 0 when absent)
_FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    GENERAL: ("general_type", ("iteration_counter", "timestamp"), ()),
    REQUEST: ("request_type", ("active", "scheduled", "context"), ()),
    KV_CACHE: ("kv_cache_block_type", ("max", "used", "tokens_per"), ()),
    INFLIGHT_BATCHER: (
        "inflight_batcher_specific_metric",
        ("generation_requests", "total_context_tokens"),
        ("paused_requests", "micro_batch_id"),
    ),
}
_SECONDS_BELOW = 1e12  # a timestamp gauge below this is epoch seconds (old backends), else µs
_LLMAPI_HINT = (
    "Triton's LLM-API Python model exports no nv_trt_llm_* metrics; serve with the C++ tensorrtllm"
    " backend (inflight_batcher_llm) or use the trtllm-serve adapter"
)


@dataclass(frozen=True, slots=True)
class TritonReading:
    """The executor record the gauges of one scrape show, and the series that had to be assumed 0."""

    record: IterationStats
    defaulted: tuple[str, ...]  # `family{label="value"}` of optional series read as 0


def _series(family: str, label: str, value: str) -> str:
    return f'{family}{{{label}="{value}"}}'


def _missing_hint(present: set[str]) -> str:
    if not present:
        return f"no nv_trt_llm_* metrics at all. {_LLMAPI_HINT}"
    if STATIC_BATCHING in present and INFLIGHT_BATCHER not in present:
        return "static (V1) batching is not supported; build the engine for in-flight batching"
    return "the engine cannot be steered without them; check the tensorrtllm backend version and its stats"


def triton_record(
    samples: Samples, *, model: str | None = None, version: str | None = None
) -> TritonReading | None:
    """The iteration the `nv_trt_llm_*` gauges show for one model, or None before the first one.

    Raises `MissingMetricsError` naming what is absent, `EngineConfigError` when the model
    selection is ambiguous or matches nothing, `MalformedMetricsError` for values that are not
    counts.
    """
    present = {name for name in samples if name.startswith(_PREFIX)}
    if not present:
        raise MissingMetricsError((f"{_PREFIX}*",), _missing_hint(present))
    chosen = select(
        label_choices(samples, present, ("model", "version")),
        (model, version),
        ("model", "version"),
        "nv_trt_llm_* metrics",
    )
    match = {"model": chosen[0], "version": chosen[1]}
    values: dict[str, dict[str, float]] = {}
    missing: list[str] = []
    defaulted: list[str] = []
    for family, (label, required, optional) in _FAMILIES.items():
        found = values_by_label(samples, family, label, match)
        values[family] = found
        if not found:
            missing.append(family)
            continue
        missing += [_series(family, label, v) for v in required if v not in found]
        defaulted += [_series(family, label, v) for v in optional if v not in found]
    if missing:
        raise MissingMetricsError(tuple(missing), _missing_hint(present))

    general, request, kv = values[GENERAL], values[REQUEST], values[KV_CACHE]
    raw_timestamp = count(general["timestamp"], _series(GENERAL, "general_type", "timestamp"), MAX_COUNTER)
    if raw_timestamp == 0:
        return None
    timestamp_s = raw_timestamp if raw_timestamp < _SECONDS_BELOW else raw_timestamp / 1e6
    iteration = count(
        general["iteration_counter"], _series(GENERAL, "general_type", "iteration_counter"), MAX_COUNTER
    )
    kv_max = count(kv["max"], _series(KV_CACHE, "kv_cache_block_type", "max"))
    if kv_max == 0:
        raise MissingMetricsError(
            (KV_CACHE,), "its gauges were never set (max is 0): the engine reports no KV-cache stats"
        )

    def get(family: str, key: str, fallback: int | None = None) -> int:
        label = _FAMILIES[family][0]
        found = values[family]
        if key not in found and fallback is not None:
            return fallback
        return count(found[key], _series(family, label, key))

    used = get(KV_CACHE, "used")
    record = IterationStats(
        timestamp=timestamp_s,
        iter=iteration,
        iter_latency_ms=None,
        new_active_requests_queue_latency_ms=None,
        num_new_active_requests=None,
        num_active_requests=get(REQUEST, "active"),
        num_queued_requests=None,
        num_completed_requests=None,
        max_num_active_requests=get(REQUEST, "max") if "max" in request else None,
        gpu_mem_usage=None,
        cpu_mem_usage=None,
        pinned_mem_usage=None,
        kv_cache_stats=KvCacheStats(
            max_num_blocks=kv_max,
            free_num_blocks=get(KV_CACHE, "free", fallback=max(kv_max - used, 0)),
            used_num_blocks=used,
            tokens_per_block=get(KV_CACHE, "tokens_per"),
            alloc_total_blocks=None,
            alloc_new_blocks=None,
            reused_blocks=get(KV_CACHE, "reused") if "reused" in kv else None,
            missed_blocks=None,
        ),
        inflight_batching_stats=InflightBatchingStats(
            num_scheduled_requests=get(REQUEST, "scheduled"),
            num_context_requests=get(REQUEST, "context"),
            num_gen_requests=get(INFLIGHT_BATCHER, "generation_requests"),
            num_paused_requests=get(INFLIGHT_BATCHER, "paused_requests", fallback=0),
            num_ctx_tokens=get(INFLIGHT_BATCHER, "total_context_tokens"),
            micro_batch_id=get(INFLIGHT_BATCHER, "micro_batch_id", fallback=0),
            avg_num_decoded_tokens_per_iter=None,
        ),
    )
    return TritonReading(record=record, defaulted=tuple(defaulted))


class TritonTrtllmAdapter(HttpPollingAdapter):
    """Scrapes Triton's metrics port (default 8002) for one TensorRT-LLM model.

    `model` / `version` are the label values of the model to read (e.g. "tensorrt_llm", "1");
    None picks the only one present. `http`: timeout and session, see `HttpPollingAdapter`.
    """

    kind = "triton"
    accept = "text/plain; version=0.0.4"

    def __init__(
        self, url: str, *, model: str | None = None, version: str | None = None, **http: Unpack[HttpOptions]
    ) -> None:
        super().__init__(url, **http)
        self.model = model
        self.version = version
        self._defaults_logged: set[str] = set()

    def _ingest(self, body: str) -> list[EngineStats]:
        reading = triton_record(
            parse_samples(only_families(body, _PREFIX)), model=self.model, version=self.version
        )
        if reading is None:
            return []
        for series in set(reading.defaulted) - self._defaults_logged:
            self._log.info("%s: %s is not exported by this backend; reading it as 0", self.name, series)
            self._defaults_logged.add(series)
        record = reading.record
        if self._observe(record.iter, record.timestamp) is IterationChange.SAME:
            return []
        return [plausible(to_engine_stats(record))]
