"""Triton + TensorRT-LLM adapter: the nv_trt_llm_* gauges as EngineStats, pure and over real HTTP.

Expected values are read off the exposition text by hand (interfaces.md §1.3), not computed by the
code under test.
"""

import asyncio
import dataclasses
import logging
import math
import re
from pathlib import Path

import pytest

from agent.domain import EngineStats
from agent.engines.base import (
    EngineConfigError,
    EngineUnavailableError,
    MalformedMetricsError,
    MissingMetricsError,
)
from agent.engines.prometheus_text import only_families, parse_samples
from agent.engines.triton_trtllm import TritonTrtllmAdapter, triton_record
from agent.engines.trtllm_stats import to_engine_stats
from agent.twin.iteration_stats import (
    InflightBatchingStats,
    IterationStats,
    KvCacheStats,
    triton_gauge_values,
)
from tests.unit.engine_server import FakeClock, MetricsServer

# Verbatim from interfaces.md §1.3 (tensorrtllm_backend README.md@0b9d7d5, "Triton Metrics").
README_EXAMPLE = (Path(__file__).parent / "fixtures" / "triton_trtllm_readme.prom").read_text()

# Core Triton metrics only: what Triton's LLM-API Python model serves (interfaces.md §1.1, §1.4).
LLMAPI_ONLY = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="tensorrt_llm",version="1"} 12
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-a07dfe08-b87f-1f96-7083-07a26d0fa83e"} 33.246
"""

_FAMILIES = {
    "nv_trt_llm_request_metrics": ("request_type", "TRT LLM request metrics"),
    "nv_trt_llm_runtime_memory_metrics": ("memory_type", "TRT LLM runtime memory metrics"),
    "nv_trt_llm_kv_cache_block_metrics": ("kv_cache_block_type", "TRT LLM KV cache block metrics"),
    "nv_trt_llm_inflight_batcher_metrics": (
        "inflight_batcher_specific_metric",
        "TRT LLM inflight_batcher-specific metrics",
    ),
    "nv_trt_llm_general_metrics": ("general_type", "General TRT LLM metrics"),
}


def render(*models: tuple[str, str, dict[str, dict[str, float]]]) -> str:
    """Exposition as prometheus-cpp 1.0.1 prints it (§9): labels sorted, `%.16g` numbers."""
    lines: list[str] = []
    for family, (category, help_text) in _FAMILIES.items():
        if not any(family in values for _, _, values in models):
            continue
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        for model, version, values in models:
            for key, number in values.get(family, {}).items():
                labels = sorted({category: key, "model": model, "version": version}.items())
                label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{family}{{{label_text}}} {number:.16g}")
    return "\n".join(lines) + "\n"


def gauges(
    iteration: int, *, timestamp_us: float = 1727912742275675, used: int = 39
) -> dict[str, dict[str, float]]:
    """Gauge values of one iteration: 8 active, 6 scheduled (1 context, 5 generation), 80 KV blocks."""
    return {
        "nv_trt_llm_request_metrics": {"active": 8, "max": 8, "scheduled": 6, "context": 1, "waiting": 2},
        "nv_trt_llm_kv_cache_block_metrics": {
            "max": 80,
            "free": 80 - used,
            "used": used,
            "tokens_per": 32,
            "reused": 4,
            "fraction": round(used / 80, 6),
        },
        "nv_trt_llm_inflight_batcher_metrics": {
            "total_context_tokens": 512,
            "generation_requests": 5,
            "micro_batch_id": 0,
            "paused_requests": 0,
        },
        "nv_trt_llm_general_metrics": {"timestamp": timestamp_us, "iteration_counter": iteration},
    }


def text_for(iteration: int, **kwargs) -> str:
    return render(("tensorrt_llm", "1", gauges(iteration, **kwargs)))


def read(text: str, **selection) -> EngineStats | None:
    reading = triton_record(parse_samples(text), **selection)
    return None if reading is None else to_engine_stats(reading.record)


# --------------------------------------------------------------------------------------------
# Pure parsing


def test_readme_example_reads_field_by_field():
    reading = triton_record(parse_samples(README_EXAMPLE))
    assert reading is not None
    assert to_engine_stats(reading.record) == EngineStats(
        timestamp_s=1700074049.0,  # an old release's seconds, read as seconds
        iteration=0,
        active_requests=0,
        queued_requests=None,  # Triton does not export the executor queue
        scheduled_requests=1,
        context_requests=1,
        generation_requests=0,
        paused_requests=0,  # absent from this release: read as 0 ...
        context_tokens=0,
        kv_blocks_used=1,
        kv_blocks_max=6239,
        tokens_per_block=64,
        iteration_latency_s=None,
    )
    # ... and reported, so the adapter can say so once.
    assert reading.defaulted == (
        'nv_trt_llm_inflight_batcher_metrics{inflight_batcher_specific_metric="paused_requests"}',
    )
    assert reading.record.max_num_active_requests == 512
    assert reading.record.kv_cache_stats.free_num_blocks == 6239


def test_microsecond_timestamp_of_current_backends():
    stats = read(text_for(6189))
    assert stats is not None
    assert stats.timestamp_s == pytest.approx(1727912742.275675, abs=1e-6)
    assert (stats.iteration, stats.active_requests, stats.scheduled_requests) == (6189, 8, 6)
    assert (stats.context_requests, stats.generation_requests, stats.context_tokens) == (1, 5, 512)
    assert (stats.kv_blocks_used, stats.kv_blocks_max, stats.tokens_per_block) == (39, 80, 32)


def test_reads_what_the_twin_sets():
    """The twin's gauge values for a record read back as that record's EngineStats."""
    record = IterationStats(
        timestamp=1727912742.275675,
        iter=6189,
        iter_latency_ms=7.0,
        new_active_requests_queue_latency_ms=0.0,
        num_new_active_requests=0,
        num_active_requests=8,
        num_queued_requests=2,
        num_completed_requests=1,
        max_num_active_requests=8,
        gpu_mem_usage=1427313739,
        cpu_mem_usage=3060,
        pinned_mem_usage=637534388,
        kv_cache_stats=KvCacheStats(80, 41, 39, 32, 3126, 3126, 4, 3121),
        inflight_batching_stats=InflightBatchingStats(6, 1, 5, 2, 512, 0, 1.0),
    )
    stats = read(render(("tensorrt_llm", "1", triton_gauge_values(record))))
    expected = dataclasses.replace(to_engine_stats(record), queued_requests=None, iteration_latency_s=None)
    assert stats == expected
    assert stats.paused_requests == 2


def test_gauges_never_set_mean_no_iteration_yet():
    zeros = {family: dict.fromkeys(values, 0) for family, values in gauges(0).items()}
    assert triton_record(parse_samples(render(("tensorrt_llm", "1", zeros)))) is None


def test_missing_kv_family_is_named():
    values = gauges(7)
    del values["nv_trt_llm_kv_cache_block_metrics"]
    with pytest.raises(MissingMetricsError, match="nv_trt_llm_kv_cache_block_metrics") as info:
        triton_record(parse_samples(render(("tensorrt_llm", "1", values))))
    assert info.value.missing == ("nv_trt_llm_kv_cache_block_metrics",)


def test_kv_gauges_left_at_zero_count_as_missing():
    values = gauges(7)
    values["nv_trt_llm_kv_cache_block_metrics"] = dict.fromkeys(
        values["nv_trt_llm_kv_cache_block_metrics"], 0
    )
    with pytest.raises(MissingMetricsError, match="no KV-cache stats"):
        triton_record(parse_samples(render(("tensorrt_llm", "1", values))))


def test_missing_series_is_named_with_its_label():
    values = gauges(7)
    del values["nv_trt_llm_request_metrics"]["scheduled"]
    with pytest.raises(MissingMetricsError) as info:
        triton_record(parse_samples(render(("tensorrt_llm", "1", values))))
    assert info.value.missing == ('nv_trt_llm_request_metrics{request_type="scheduled"}',)


def test_llmapi_model_without_trtllm_metrics_says_why():
    with pytest.raises(MissingMetricsError, match="LLM-API Python model") as info:
        triton_record(parse_samples(LLMAPI_ONLY))
    assert info.value.missing == ("nv_trt_llm_*",)


def test_static_batching_says_it_is_unsupported():
    values = gauges(7)
    del values["nv_trt_llm_inflight_batcher_metrics"]
    text = render(("tensorrt_llm", "1", values)) + (
        "# HELP nv_trt_llm_v1_metrics TRT LLM v1-specific metrics\n# TYPE nv_trt_llm_v1_metrics gauge\n"
        'nv_trt_llm_v1_metrics{model="tensorrt_llm",v1_specific_metric="total_context_tokens",'
        'version="1"} 3\n'
    )
    with pytest.raises(MissingMetricsError, match="static"):
        triton_record(parse_samples(text))


def test_models_are_selected_by_label_and_ambiguity_lists_choices():
    text = render(
        ("tensorrt_llm", "1", gauges(10)), ("tensorrt_llm", "2", gauges(20)), ("draft", "1", gauges(30))
    )
    with pytest.raises(EngineConfigError) as info:
        read(text)
    message = str(info.value)
    for choice in ("model='tensorrt_llm', version='1'", "model='tensorrt_llm', version='2'", "model='draft'"):
        assert choice in message
    assert read(text, model="draft").iteration == 30
    assert read(text, model="tensorrt_llm", version="2").iteration == 20
    with pytest.raises(EngineConfigError, match=r"present: .*model='draft'"):
        read(text, model="llama")


def test_value_that_is_not_a_count_is_malformed():
    values = gauges(7)
    values["nv_trt_llm_request_metrics"]["active"] = math.nan
    with pytest.raises(MalformedMetricsError, match=r'request_type="active"\} is nan'):
        read(render(("tensorrt_llm", "1", values)))


def test_text_that_is_not_exposition_is_malformed():
    with pytest.raises(MalformedMetricsError, match="not Prometheus text"):
        parse_samples("<html><body>Bad Gateway</body></html>")


# --------------------------------------------------------------------------------------------
# Adapter over a real HTTP server


def test_adapter_new_same_and_restarted_iterations():
    async def scenario():
        clock = FakeClock()
        async with (
            MetricsServer(text_for(10)) as server,
            TritonTrtllmAdapter(server.url, clock=clock) as adapter,
        ):
            assert adapter.url == f"{server.url}/metrics"
            first = await adapter.poll()
            assert first.iteration == 10 and first.kv_blocks_used == 39
            clock.advance(1)
            assert await adapter.poll() is None  # same iteration: nothing new
            assert adapter.health.last_success_s == 101 and adapter.health.last_new_stats_s == 100
            server.body = text_for(25, used=41)
            assert (await adapter.poll()).kv_blocks_used == 41
            server.body = text_for(3, timestamp_us=1727912750000000)
            restarted = await adapter.poll()
            assert restarted.iteration == 3
            assert adapter.health.restarts == 1 and adapter.health.healthy
            # Same counter, another timestamp: a second restart that reached the same iteration.
            server.body = text_for(3, timestamp_us=1727912760000000)
            assert (await adapter.poll()).iteration == 3
            assert adapter.health.restarts == 2

    asyncio.run(scenario())


def test_adapter_missing_kv_is_unhealthy_and_recovers(caplog):
    values = gauges(10)
    del values["nv_trt_llm_kv_cache_block_metrics"]
    no_kv = render(("tensorrt_llm", "1", values))

    async def scenario():
        async with MetricsServer(no_kv) as server, TritonTrtllmAdapter(server.url) as adapter:
            assert await adapter.poll() is None
            assert await adapter.poll() is None
            health = adapter.health
            assert not health.healthy and health.consecutive_failures == 2
            assert isinstance(health.last_error, MissingMetricsError)
            assert "nv_trt_llm_kv_cache_block_metrics" in str(health.last_error)
            server.body = text_for(11)
            assert (await adapter.poll()).iteration == 11
            assert adapter.health.healthy

    with caplog.at_level(logging.WARNING, logger="agent.engines.triton_trtllm"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if "nv_trt_llm_kv_cache_block_metrics" in r.getMessage()]
    assert len(warnings) == 1  # a lasting condition is logged once, not every poll


def test_adapter_malformed_text_raises_and_is_recorded():
    async def scenario():
        bad = "nv_trt_llm_request_metrics{model=tensorrt_llm} 1\n"
        async with MetricsServer(bad) as server, TritonTrtllmAdapter(server.url) as adapter:
            with pytest.raises(MalformedMetricsError):
                await adapter.poll()
            assert not adapter.health.healthy
            assert isinstance(adapter.health.last_error, MalformedMetricsError)
            server.body = text_for(5)
            assert (await adapter.poll()).iteration == 5

    asyncio.run(scenario())


def test_adapter_server_down_http_error_and_timeout_are_unavailable():
    async def scenario():
        server = MetricsServer(text_for(5))
        await server.start()
        adapter = TritonTrtllmAdapter(server.url, timeout_s=0.1)
        try:
            assert (await adapter.poll()).iteration == 5
            server.status = 404
            with pytest.raises(EngineUnavailableError, match="HTTP 404"):
                await adapter.poll()
            server.status, server.delay_s = 200, 0.3
            with pytest.raises(EngineUnavailableError, match=r"within 0.1 s"):
                await adapter.poll()
            await server.stop()
            with pytest.raises(EngineUnavailableError, match="cannot reach"):
                await adapter.poll()
            health = adapter.health
            assert not health.healthy and health.consecutive_failures == 3
            assert isinstance(health.last_error, EngineUnavailableError)
        finally:
            await adapter.close()
            await server.stop()

    asyncio.run(scenario())


def test_adapter_ambiguous_models_raise_listing_choices():
    text = render(("tensorrt_llm", "1", gauges(10)), ("ensemble_llm", "1", gauges(20)))

    async def scenario():
        async with MetricsServer(text) as server:
            async with TritonTrtllmAdapter(server.url) as adapter:
                with pytest.raises(EngineConfigError, match=r"model='ensemble_llm'.*model='tensorrt_llm'"):
                    await adapter.poll()
                assert isinstance(adapter.health.last_error, EngineConfigError)
            async with TritonTrtllmAdapter(server.url, model="ensemble_llm") as adapter:
                assert (await adapter.poll()).iteration == 20

    asyncio.run(scenario())


def test_keeping_only_the_trtllm_families_parses_to_the_same_samples():
    text = (
        "# HELP nv_inference_count Number of inferences\n# TYPE nv_inference_count counter\n"
        'nv_inference_count{model="ensemble",version="1"} 12\n'
        + (Path(__file__).parent / "fixtures" / "triton_trtllm_readme.prom").read_text()
        + "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)\n# TYPE nv_gpu_utilization gauge\n"
        'nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5\n'
    )
    everything = parse_samples(text)
    kept = parse_samples(only_families(text, "nv_trt_llm_"))
    assert kept == {name: s for name, s in everything.items() if name.startswith("nv_trt_llm_")}
    assert kept and "nv_inference_count" not in kept and "nv_gpu_utilization" not in kept


@pytest.mark.parametrize(
    ("family", "key", "raw"),
    [
        ("nv_trt_llm_kv_cache_block_metrics", "max", 1e300),  # broke the policy build before
        ("nv_trt_llm_kv_cache_block_metrics", "max", 2.0**63),
        ("nv_trt_llm_request_metrics", "active", 2.0**31 + 1),
        ("nv_trt_llm_kv_cache_block_metrics", "tokens_per", math.inf),
        ("nv_trt_llm_general_metrics", "iteration_counter", 2.0**63),
        ("nv_trt_llm_general_metrics", "timestamp", 1e300),
    ],
)
def test_implausible_counts_are_malformed_not_passed_on(family, key, raw):
    values = gauges(7)
    values[family][key] = raw
    with pytest.raises(MalformedMetricsError, match=re.escape(f'{key}"}} is {raw:g}, not a count')):
        read(render(("tensorrt_llm", "1", values)))


def test_counts_within_the_bounds_are_read():
    values = gauges(2**40)  # the iteration counter is cumulative: far above 2^31 is fine
    values["nv_trt_llm_kv_cache_block_metrics"]["max"] = 2**31
    stats = read(render(("tensorrt_llm", "1", values)))
    assert stats is not None and stats.kv_blocks_max == 2**31 and stats.iteration == 2**40
