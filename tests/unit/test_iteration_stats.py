"""TRT-LLM iteration statistics: executor JSON, Triton flat JSON / log line / gauges, EngineStats.

Expected strings are written out by hand from interfaces.md §1.2, §1.5, §1.6 and the C++ sources
they cite, not produced by the code under test.
"""

import dataclasses
import json
import re
from datetime import UTC, datetime

import pytest

from agent.twin.iteration_stats import (
    InflightBatchingStats,
    IterationStats,
    KvCacheStats,
    parse_executor_json,
    to_engine_stats,
    to_executor_json,
    to_triton_log_line,
    to_triton_stats_json,
    triton_gauge_values,
)

# 10-02-2024 23:45:42.275675, the timestamp of the verbatim Triton log line in §1.2 (read as UTC).
TS = datetime(2024, 10, 2, 23, 45, 42, 275675, tzinfo=UTC).timestamp()
TS_MICROS = 1727912742275675


def make_stats(**overrides) -> IterationStats:
    """Numbers of the §1.2 log line (8 active, iter 6189, memory) and the §1.6 KV example."""
    fields = dict(
        timestamp=TS,
        iter=6189,
        iter_latency_ms=7.00688362121582,
        new_active_requests_queue_latency_ms=0.0,
        num_new_active_requests=0,
        num_active_requests=8,
        num_queued_requests=2,
        num_completed_requests=1,
        max_num_active_requests=8,
        gpu_mem_usage=1427313739,
        cpu_mem_usage=3060,
        pinned_mem_usage=637534388,
        kv_cache_stats=KvCacheStats(
            max_num_blocks=80,
            free_num_blocks=41,
            used_num_blocks=39,
            tokens_per_block=32,
            alloc_total_blocks=3126,
            alloc_new_blocks=3126,
            reused_blocks=4,
            missed_blocks=3121,
        ),
        inflight_batching_stats=InflightBatchingStats(
            num_scheduled_requests=6,
            num_context_requests=1,
            num_gen_requests=5,
            num_paused_requests=0,
            num_ctx_tokens=512,
            micro_batch_id=0,
            avg_num_decoded_tokens_per_iter=1.0,
        ),
    )
    fields.update(overrides)
    return IterationStats(**fields)


def with_ifb(stats: IterationStats, **changes) -> IterationStats:
    ifb = dataclasses.replace(stats.inflight_batching_stats, **changes)
    return dataclasses.replace(stats, inflight_batching_stats=ifb)


def with_kv(stats: IterationStats, **changes) -> IterationStats:
    kv = dataclasses.replace(stats.kv_cache_stats, **changes)
    return dataclasses.replace(stats, kv_cache_stats=kv)


def key_orders(text: str) -> list[list[str]]:
    """The key order of every JSON object in `text`, nested ones included."""
    orders: list[list[str]] = []

    def hook(pairs):
        orders.append([key for key, _ in pairs])
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return orders


# ---------------------------------------------------------------------------------------------
# Executor JSON

EXPECTED_EXECUTOR_JSON = (
    '{"cpuMemUsage":3060,"gpuMemUsage":1427313739,'
    '"inflightBatchingStats":{"avgNumDecodedTokensPerIter":1.0,"microBatchId":0,"numContextRequests":1,'
    '"numCtxTokens":512,"numGenRequests":5,"numPausedRequests":0,"numScheduledRequests":6},'
    '"iter":6189,"iterLatencyMS":7.00688362121582,'
    '"kvCacheStats":{"allocNewBlocks":3126,"allocTotalBlocks":3126,"cacheHitRate":0.0012799999676644802,'
    '"freeNumBlocks":41,"maxNumBlocks":80,"missedBlocks":3121,"reusedBlocks":4,"tokensPerBlock":32,'
    '"usedNumBlocks":39},'
    '"maxBatchSizeRuntime":null,"maxBatchSizeStatic":null,"maxBatchSizeTunerRecommended":null,'
    '"maxNumActiveRequests":8,'
    '"maxNumTokensRuntime":null,"maxNumTokensStatic":null,"maxNumTokensTunerRecommended":null,'
    '"newActiveRequestsQueueLatencyMS":0.0,"numActiveRequests":8,"numCompletedRequests":1,'
    '"numNewActiveRequests":0,"numQueuedRequests":2,"pinnedMemUsage":637534388,'
    '"queuedNumDecodeRequests":0,"queuedNumPrefillRequests":2,"queuedSumDecodeKvTokens":null,'
    '"queuedSumPrefillTokens":null,"scheduledNumDecodeRequests":5,"scheduledNumPrefillRequests":1,'
    '"scheduledSumDecodeKvTokens":null,"scheduledSumPrefillKvTokens":null,"scheduledSumPrefillTokens":512,'
    '"specDecodingStats":null,"staticBatchingStats":null,"timestamp":"10-02-2024 23:45:42.275675"}'
)

# The 2026 serializer's IterationStats keys (§1.5): every one is emitted, null when not derivable.
EXECUTOR_KEYS_2026 = {
    "timestamp", "iter", "iterLatencyMS", "newActiveRequestsQueueLatencyMS", "numNewActiveRequests",
    "numActiveRequests", "numQueuedRequests", "numCompletedRequests", "maxNumActiveRequests",
    "maxBatchSizeStatic", "maxBatchSizeTunerRecommended", "maxBatchSizeRuntime", "maxNumTokensStatic",
    "maxNumTokensTunerRecommended", "maxNumTokensRuntime", "gpuMemUsage", "cpuMemUsage", "pinnedMemUsage",
    "kvCacheStats", "staticBatchingStats", "inflightBatchingStats", "specDecodingStats",
    "scheduledNumPrefillRequests", "scheduledSumPrefillTokens", "scheduledSumPrefillKvTokens",
    "scheduledNumDecodeRequests", "scheduledSumDecodeKvTokens", "queuedNumPrefillRequests",
    "queuedSumPrefillTokens", "queuedNumDecodeRequests", "queuedSumDecodeKvTokens",
}  # fmt: skip


def test_executor_json_is_byte_exact():
    assert to_executor_json(make_stats()) == EXPECTED_EXECUTOR_JSON


def test_executor_json_has_exactly_the_2026_keys():
    data = json.loads(to_executor_json(make_stats()))
    assert set(data) == EXECUTOR_KEYS_2026
    assert set(data["kvCacheStats"]) == {
        "maxNumBlocks", "freeNumBlocks", "usedNumBlocks", "tokensPerBlock", "allocTotalBlocks",
        "allocNewBlocks", "reusedBlocks", "missedBlocks", "cacheHitRate",
    }  # fmt: skip
    assert set(data["inflightBatchingStats"]) == {
        "numScheduledRequests", "numContextRequests", "numGenRequests", "numPausedRequests",
        "numCtxTokens", "microBatchId", "avgNumDecodedTokensPerIter",
    }  # fmt: skip


def test_executor_json_keys_sorted_at_every_level_and_compact():
    text = to_executor_json(make_stats())
    orders = key_orders(text)
    assert len(orders) == 3  # kvCacheStats, inflightBatchingStats, the record
    for keys in orders:
        assert keys == sorted(keys)
    outside_strings = re.sub(r'"[^"]*"', '""', text)
    assert not re.search(r"\s", outside_strings)


def test_executor_json_round_trips():
    stats = make_stats()
    assert parse_executor_json(to_executor_json(stats)) == [stats]


def test_round_trip_keeps_absent_fields_absent():
    stats = make_stats(
        iter_latency_ms=None,
        num_queued_requests=None,
        kv_cache_stats=None,
        inflight_batching_stats=None,
    )
    text = to_executor_json(stats)
    data = json.loads(text)
    assert data["kvCacheStats"] is None and data["inflightBatchingStats"] is None
    assert data["scheduledNumPrefillRequests"] is None and data["queuedNumPrefillRequests"] is None
    assert parse_executor_json(text) == [stats]


def test_timestamp_is_rounded_to_the_microsecond_not_truncated():
    # A float clock advanced twice by 0.1 s lands a hair below .200000 (1727912742.1999998).
    clock = datetime(2024, 10, 2, 23, 45, 42, tzinfo=UTC).timestamp() + 0.1
    clock += 0.1
    assert '"timestamp":"10-02-2024 23:45:42.200000"' in to_executor_json(make_stats(timestamp=clock))


def test_trtllm_serve_array_round_trips():
    records = [make_stats(iter=1), make_stats(iter=2, timestamp=TS + 0.007)]
    text = "[" + ",".join(to_executor_json(r) for r in records) + "]"
    assert parse_executor_json(text) == records


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (7.0, "7.0"),  # integral doubles keep ".0"
        (7.00688362121582, "7.00688362121582"),
        (0.0001, "0.0001"),
        (1e-05, "1e-05"),  # two-digit exponent, like printf %g
        (1e15, "1e+15"),  # plain only up to 15 integer digits; Python prints 1000000000000000.0
        (123456789012345.6, "123456789012345.6"),
        (1.5e300, "1.5e+300"),
    ],
)
def test_doubles_print_as_nlohmann_does(value, printed):
    text = to_executor_json(make_stats(iter_latency_ms=value))
    assert f'"iterLatencyMS":{printed},' in text


def test_float_members_print_as_widened_cpp_floats():
    # avgNumDecodedTokensPerIter and cacheHitRate are C++ `float`; nlohmann widens them to double.
    stats = with_ifb(make_stats(), avg_num_decoded_tokens_per_iter=1.1)
    assert '"avgNumDecodedTokensPerIter":1.100000023841858,' in to_executor_json(stats)
    no_reuse = with_kv(make_stats(), reused_blocks=0)
    assert '"cacheHitRate":0.0,' in to_executor_json(no_reuse)


def test_derived_forward_pass_fields_follow_the_scheduler_state():
    stats = with_ifb(make_stats(), num_context_requests=3, num_ctx_tokens=2048, num_gen_requests=4)
    stats = with_ifb(stats, num_paused_requests=2)
    data = json.loads(to_executor_json(stats))
    assert data["scheduledNumPrefillRequests"] == 3
    assert data["scheduledSumPrefillTokens"] == 2048
    assert data["scheduledNumDecodeRequests"] == 4
    assert data["queuedNumDecodeRequests"] == 2
    assert data["queuedNumPrefillRequests"] == stats.num_queued_requests


# ---------------------------------------------------------------------------------------------
# Parsing

# docs/source/commands/trtllm-serve/trtllm-serve.rst, with the `...` line dropped (§1.6).
TRTLLM_SERVE_DOC_EXAMPLE = """
[
    {
        "gpuMemUsage": 76665782272,
        "iter": 154,
        "iterLatencyMS": 7.00688362121582,
        "kvCacheStats": {
            "allocNewBlocks": 3126,
            "allocTotalBlocks": 3126,
            "cacheHitRate": 0.00128,
            "freeNumBlocks": 101253,
            "maxNumBlocks": 101256,
            "missedBlocks": 3121,
            "reusedBlocks": 4,
            "tokensPerBlock": 32,
            "usedNumBlocks": 3
        },
        "numActiveRequests": 1
    }
]
"""


def test_parses_the_trtllm_serve_doc_example():
    [stats] = parse_executor_json(TRTLLM_SERVE_DOC_EXAMPLE)
    assert stats.iter == 154
    assert stats.gpu_mem_usage == 76665782272
    assert stats.iter_latency_ms == 7.00688362121582
    assert stats.num_active_requests == 1
    assert stats.kv_cache_stats == KvCacheStats(
        max_num_blocks=101256,
        free_num_blocks=101253,
        used_num_blocks=3,
        tokens_per_block=32,
        alloc_total_blocks=3126,
        alloc_new_blocks=3126,
        reused_blocks=4,
        missed_blocks=3121,
    )
    assert stats.kv_cache_stats.cache_hit_rate == pytest.approx(0.00128, rel=1e-6)
    assert stats.timestamp is None
    assert stats.cpu_mem_usage is None and stats.num_queued_requests is None
    assert stats.inflight_batching_stats is None


def test_parse_ignores_unknown_keys_and_accepts_older_releases():
    record = json.loads(to_executor_json(make_stats()))
    record["hostStepTimeMS"] = 1.5
    record["attentionDpRank"] = 0
    record["crossKvCacheStats"] = None
    record["timestamp"] = "12-18-2023 03:35:37"  # the pre-microsecond form
    del record["kvCacheStats"]["missedBlocks"]
    del record["kvCacheStats"]["cacheHitRate"]
    [stats] = parse_executor_json(json.dumps(record))
    assert stats.timestamp == datetime(2023, 12, 18, 3, 35, 37, tzinfo=UTC).timestamp()
    assert stats.kv_cache_stats.missed_blocks is None
    assert stats.kv_cache_stats.cache_hit_rate is None
    assert stats.inflight_batching_stats == make_stats().inflight_batching_stats


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"numActiveRequests": 1}', "'iter'"),
        ('[{"iter": 1}, {"iter": null}]', "record 1"),
        ('"iter"', "expected a JSON object"),
        ('[{"iter": 1}, 7]', "expected a JSON object"),
        ('{"iter": "154"}', "'iter' must be an integer"),
        ('{"iter": true}', "'iter' must be an integer"),
        ('{"iter": 1, "iterLatencyMS": "7"}', "must be a number"),
        ('{"iter": 1, "kvCacheStats": 3}', "must be an object"),
        ('{"iter": 1, "kvCacheStats": {"maxNumBlocks": 8}}', "missing required key 'freeNumBlocks'"),
        ('{"iter": 1, "timestamp": "2024-10-02T23:45:42Z"}', "MM-DD-YYYY"),
        ('{"iter": 1, "timestamp": "10-02-2024 23:45:42.27"}', "6 fractional digits"),
    ],
)
def test_parse_rejects_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_executor_json(text)


# ---------------------------------------------------------------------------------------------
# Triton tensorrtllm backend

TRITON_KEYS_IN_ORDER = [
    "Active Request Count",
    "Iteration Counter",
    "Max Request Count",
    "Runtime CPU Memory Usage",
    "Runtime GPU Memory Usage",
    "Runtime Pinned Memory Usage",
    "Timestamp",
    "Context Requests",
    "Generation Requests",
    "MicroBatch ID",
    "Paused Requests",
    "Scheduled Requests",
    "Total Context Tokens",
    "Waiting Requests",
    "Free KV cache blocks",
    "Max KV cache blocks",
    "Tokens per KV cache block",
    "Used KV cache blocks",
    "Reused KV cache blocks",
    "Fraction used KV cache blocks",
    "KV cache transfer time",
    "Request count",
]

EXPECTED_TRITON_JSON = (
    '{"Active Request Count":8,"Iteration Counter":6189,"Max Request Count":8,'
    '"Runtime CPU Memory Usage":3060,"Runtime GPU Memory Usage":1427313739,'
    '"Runtime Pinned Memory Usage":637534388,"Timestamp":"10-02-2024 23:45:42.275675",'
    '"Context Requests":1,"Generation Requests":5,"MicroBatch ID":0,"Paused Requests":0,'
    '"Scheduled Requests":6,"Total Context Tokens":512,"Waiting Requests":2,'
    '"Free KV cache blocks":41,"Max KV cache blocks":80,"Tokens per KV cache block":32,'
    '"Used KV cache blocks":39,"Reused KV cache blocks":4,"Fraction used KV cache blocks":0.487500,'
    '"KV cache transfer time":0.000000,"Request count":0}'
)


def test_triton_json_is_byte_exact():
    assert to_triton_stats_json(make_stats()) == EXPECTED_TRITON_JSON


def test_triton_json_has_exactly_the_backend_keys_in_order():
    [keys] = key_orders(to_triton_stats_json(make_stats()))
    assert keys == TRITON_KEYS_IN_ORDER


@pytest.mark.parametrize(
    ("used", "total", "printed"),
    [(39, 80, "0.487500"), (1, 6239, "0.000160"), (0, 0, "0.000000"), (80, 80, "1.000000")],
)
def test_triton_fraction_prints_with_six_decimals(used, total, printed):
    stats = with_kv(make_stats(), used_num_blocks=used, max_num_blocks=total)
    assert f'"Fraction used KV cache blocks":{printed},' in to_triton_stats_json(stats)


def test_triton_json_without_kv_stats_omits_the_kv_keys():
    [keys] = key_orders(to_triton_stats_json(make_stats(kv_cache_stats=None)))
    assert keys == [k for k in TRITON_KEYS_IN_ORDER if "KV cache block" not in k]


def test_triton_skips_records_without_inflight_batching_stats():
    with pytest.raises(ValueError, match="inflightBatchingStats"):
        to_triton_stats_json(make_stats(inflight_batching_stats=None))


# §1.2: I1002 23:45:42.282246 136 model_instance_state.cc:1115] "{\"Active Request Count\":8,...
VERBATIM_LOG_PREFIX = (
    r'I1002 23:45:42.282246 136 model_instance_state.cc:1115] "{\"Active Request Count\":8,'
    r"\"Iteration Counter\":6189,\"Max Request Count\":8,\"Runtime CPU Memory Usage\":3060,"
    r"\"Runtime GPU Memory Usage\":1427313739,\"Runtime Pinned Memory Usage\":637534388,"
    r"\"Timestamp\":\"10-02-2024 23:45:42.275675\",\"Context Requests\":0,\"Generati"
)
LOG_LINE = re.compile(r'I\d{4} \d{2}:\d{2}:\d{2}\.\d{6} \d+ model_instance_state\.cc:\d+\] "(\{.*\})"')


def test_log_line_reproduces_the_verbatim_triton_log():
    stats = with_ifb(make_stats(), num_context_requests=0)
    line = to_triton_log_line(stats, pid=136, logged_at_s=TS + 0.006571)
    assert line.startswith(VERBATIM_LOG_PREFIX)


def test_log_line_shape_and_escaped_payload():
    stats = make_stats()
    line = to_triton_log_line(stats, pid=4242)
    match = LOG_LINE.fullmatch(line)
    assert match is not None
    assert line.startswith("I1002 23:45:42.275675 4242 ")
    assert json.loads('"' + match.group(1) + '"') == to_triton_stats_json(stats)


def test_gauge_values():
    stats = make_stats()
    assert triton_gauge_values(stats) == {
        "nv_trt_llm_request_metrics": {"active": 8, "max": 8, "scheduled": 6, "context": 1, "waiting": 2},
        "nv_trt_llm_runtime_memory_metrics": {"cpu": 3060, "gpu": 1427313739, "pinned": 637534388},
        "nv_trt_llm_kv_cache_block_metrics": {
            "max": 80,
            "free": 41,
            "used": 39,
            "tokens_per": 32,
            "reused": 4,
            "fraction": 0.4875,
        },
        "nv_trt_llm_inflight_batcher_metrics": {
            "total_context_tokens": 512,
            "generation_requests": 5,
            "micro_batch_id": 0,
            "paused_requests": 0,
        },
        "nv_trt_llm_general_metrics": {"timestamp": TS_MICROS, "iteration_counter": 6189},
    }
    assert isinstance(triton_gauge_values(stats)["nv_trt_llm_general_metrics"]["timestamp"], int)


def test_gauge_waiting_is_active_minus_scheduled_not_the_queue():
    stats = with_ifb(make_stats(num_active_requests=20, num_queued_requests=50), num_scheduled_requests=12)
    assert triton_gauge_values(stats)["nv_trt_llm_request_metrics"]["waiting"] == 8


def test_gauge_fraction_is_rounded_to_six_decimals():
    stats = with_kv(make_stats(), used_num_blocks=1, max_num_blocks=6239)
    assert triton_gauge_values(stats)["nv_trt_llm_kv_cache_block_metrics"]["fraction"] == 0.00016


def test_gauges_without_kv_stats_leave_that_family_out():
    assert "nv_trt_llm_kv_cache_block_metrics" not in triton_gauge_values(make_stats(kv_cache_stats=None))


# ---------------------------------------------------------------------------------------------
# EngineStats


def test_engine_stats_conversion():
    engine = to_engine_stats(make_stats())
    assert engine.timestamp_s == TS
    assert engine.iteration == 6189
    assert engine.active_requests == 8
    assert engine.queued_requests == 2
    assert (engine.scheduled_requests, engine.context_requests, engine.generation_requests) == (6, 1, 5)
    assert engine.paused_requests == 0
    assert engine.context_tokens == 512
    assert (engine.kv_blocks_used, engine.kv_blocks_max, engine.tokens_per_block) == (39, 80, 32)
    assert engine.iteration_latency_s == pytest.approx(0.00700688362121582)


def test_engine_stats_keeps_unknowns_unknown_and_refuses_incomplete_records():
    engine = to_engine_stats(make_stats(num_queued_requests=None, iter_latency_ms=None))
    assert engine.queued_requests is None and engine.iteration_latency_s is None
    [doc_record] = parse_executor_json(TRTLLM_SERVE_DOC_EXAMPLE)
    with pytest.raises(ValueError, match="inflightBatchingStats"):
        to_engine_stats(doc_record)
