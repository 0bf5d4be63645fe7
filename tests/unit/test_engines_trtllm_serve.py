"""trtllm-serve adapter: the drained JSON array of executor iteration stats as EngineStats."""

import asyncio
import json
import logging

import pytest

from agent.engines.base import MalformedMetricsError
from agent.engines.trtllm_serve import TrtllmServeAdapter, parse_serve_metrics
from agent.engines.trtllm_stats import parse_executor_json
from agent.twin.iteration_stats import InflightBatchingStats, IterationStats, KvCacheStats, to_executor_json
from tests.unit.engine_server import MetricsServer

# Verbatim from interfaces.md §1.6 (trtllm-serve.rst@0434755), with the doc's "..." elision removed.
DOCS_EXAMPLE = """\
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

T0 = 1727912742.275675  # 10-02-2024 23:45:42.275675 UTC


def record(
    iteration: int, *, used: int = 3, latency_ms: float = 7.00688362121582, at_s: float | None = None
) -> str:
    """One record exactly as the executor serialises it (via the twin's nlohmann-faithful writer)."""
    stats = IterationStats(
        timestamp=T0 + iteration * 0.01 if at_s is None else at_s,
        iter=iteration,
        iter_latency_ms=latency_ms,
        new_active_requests_queue_latency_ms=0.0,
        num_new_active_requests=0,
        num_active_requests=3,
        num_queued_requests=4,
        num_completed_requests=0,
        max_num_active_requests=256,
        gpu_mem_usage=76665782272,
        cpu_mem_usage=0,
        pinned_mem_usage=0,
        kv_cache_stats=KvCacheStats(101256, 101256 - used, used, 32, 3126, 3126, 4, 3121),
        inflight_batching_stats=InflightBatchingStats(3, 1, 2, 0, 700, 0, 1.0),
    )
    return to_executor_json(stats)


def array(*records: str) -> str:
    return "[" + ",".join(records) + "]"


def test_docs_example_parses_but_lacks_what_the_core_needs():
    (parsed,) = parse_executor_json(DOCS_EXAMPLE)
    assert (parsed.iter, parsed.iter_latency_ms, parsed.num_active_requests) == (154, 7.00688362121582, 1)
    assert (parsed.kv_cache_stats.used_num_blocks, parsed.kv_cache_stats.tokens_per_block) == (3, 32)
    with pytest.raises(MalformedMetricsError, match="record 0: iteration stats lack inflightBatchingStats"):
        parse_serve_metrics(DOCS_EXAMPLE)


def test_several_records_in_engine_order_with_latency():
    batch = parse_serve_metrics(array(record(154), record(155, used=5, latency_ms=12.5), record(156)))
    assert batch.rejected == ()
    assert [s.iteration for s in batch.stats] == [154, 155, 156]
    second = batch.stats[1]
    assert second.iteration_latency_s == 0.0125
    assert (second.kv_blocks_used, second.kv_blocks_max, second.tokens_per_block) == (5, 101256, 32)
    assert (second.active_requests, second.queued_requests, second.context_tokens) == (3, 4, 700)
    assert second.timestamp_s == pytest.approx(T0 + 1.55, abs=1e-6)


def test_empty_array_is_nothing_new():
    assert parse_serve_metrics("[]").stats == ()


def test_one_malformed_record_is_skipped_with_its_reason():
    bad = json.dumps({"iter": "155"})
    batch = parse_serve_metrics(array(record(154), bad, record(156)))
    assert [s.iteration for s in batch.stats] == [154, 156]
    assert batch.rejected == ("record 1: 'iter' must be an integer, got '155'",)


@pytest.mark.parametrize(
    ("body", "message"),
    [("<html>", "not JSON"), ('{"iter": 1}', "must be a JSON array"), ('[{"iter": true}]', "no usable")],
)
def test_unusable_answers_are_malformed(body, message):
    with pytest.raises(MalformedMetricsError, match=message):
        parse_serve_metrics(body)


def test_adapter_drains_records_skips_bad_ones_and_sees_restarts(caplog):
    async def scenario():
        body = array(record(154), record(155), record(156))
        server = MetricsServer(body, content_type="application/json")
        async with server, TrtllmServeAdapter(server.url) as adapter:
            assert [s.iteration for s in await adapter.poll_all()] == [154, 155, 156]
            server.body = "[]"
            assert await adapter.poll() is None
            assert adapter.health.healthy
            server.body = array(record(157), '{"iter": 158, "kvCacheStats": 3}', record(159, used=9))
            newest = await adapter.poll()
            assert (newest.iteration, newest.kv_blocks_used) == (159, 9)
            assert adapter.skipped_records == 1 and adapter.health.healthy
            server.body = array(record(159, used=9))  # the same record again: dropped
            assert await adapter.poll_all() == []
            server.body = array(record(2, at_s=T0 + 60), record(3, at_s=T0 + 60.01))
            assert [s.iteration for s in await adapter.poll_all()] == [2, 3]
            assert adapter.health.restarts == 1
            server.body = '{"error": "not an array"}'
            with pytest.raises(MalformedMetricsError):
                await adapter.poll()
            assert not adapter.health.healthy

    with caplog.at_level(logging.WARNING, logger="agent.engines.trtllm_serve"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 1 malformed" in m and "'kvCacheStats' must be an object" in m for m in messages)
    assert any("engine restarted" in m for m in messages)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ('"maxNumBlocks":101256', f'"maxNumBlocks":{2**63}'),
        ('"maxNumBlocks":101256', '"maxNumBlocks":' + "1" + "0" * 300),
        ('"numActiveRequests":3', f'"numActiveRequests":{2**31 + 1}'),
        ('"iter":5', f'"iter":{2**63}'),
        ('"iterLatencyMS":7.00688362121582', '"iterLatencyMS":NaN'),
        ('"iterLatencyMS":7.00688362121582', '"iterLatencyMS":1e300'),
    ],
)
def test_implausible_counts_are_refused_record_by_record(field, raw):
    bad = record(5)
    assert field in bad
    batch = parse_serve_metrics(array(record(4), bad.replace(field, raw)))
    assert [s.iteration for s in batch.stats] == [4]
    assert len(batch.rejected) == 1 and "record 1" in batch.rejected[0]
    with pytest.raises(MalformedMetricsError, match="no usable iteration stats record"):
        parse_serve_metrics(array(bad.replace(field, raw)))
