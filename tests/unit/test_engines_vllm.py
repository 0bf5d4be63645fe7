"""vLLM adapter: V1 Prometheus metrics as EngineStats, with the derived fields checked by hand.

Expositions are produced by prometheus_client itself, declared the way vLLM's
`vllm/v1/metrics/loggers.py@005a810` declares them, so the text is what a real server prints.
"""

import asyncio
import itertools

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.engines.base import EngineConfigError, MalformedMetricsError, MissingMetricsError
from agent.engines.prometheus_text import parse_samples
from agent.engines.vllm import VllmAdapter, VllmReading, read_vllm, vllm_engine_stats
from tests.unit.engine_server import MetricsServer

# Verbatim from interfaces.md §9 (prometheus_client 0.26 output), without the "..." elision and
# with the "<epoch float>" placeholder given a value.
SECTION_9_EXAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 8.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1.027453e+06
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7279127422756753e+09
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="m"} 0.0
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="m"} 1.0
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 1.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 12.0
"""

LABELS = ["model_name", "engine"]


class FakeVllm:
    """One vLLM API server's metrics, in a registry of its own."""

    def __init__(self, engines=("0",), model="Qwen/Qwen3-0.6B", *, deprecated_kv_name=False, blocks="4096"):
        self.registry = CollectorRegistry()
        self.model = model
        self.running = self._gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.waiting = self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        kv_name = "vllm:gpu_cache_usage_perc" if deprecated_kv_name else "vllm:kv_cache_usage_perc"
        self.kv = self._gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.")
        self.prompt = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=self.registry
        )
        self.generation = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=self.registry
        )
        self.steps = Histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            LABELS,
            buckets=[1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
            registry=self.registry,
        )
        if blocks is not None:
            info = Gauge(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
                ["block_size", "enable_prefix_caching", "num_gpu_blocks", "engine"],
                registry=self.registry,
            )
            for engine in engines:
                info.labels(
                    block_size="16", enable_prefix_caching="True", num_gpu_blocks=blocks, engine=engine
                ).set(1)
        for engine in engines:
            self.set(engine, running=0, waiting=0, kv=0.0)
            self.prompt.labels(model, engine)
            self.generation.labels(model, engine)
            self.steps.labels(model, engine)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, LABELS, registry=self.registry)

    def set(self, engine="0", *, running, waiting, kv):
        self.running.labels(self.model, engine).set(running)
        self.waiting.labels(self.model, engine).set(waiting)
        self.kv.labels(self.model, engine).set(kv)

    def step(self, prompt_tokens: int, generated_tokens: int, engine="0"):
        """One engine step, recorded as vLLM's PrometheusStatLogger.record does."""
        self.prompt.labels(self.model, engine).inc(prompt_tokens)
        self.generation.labels(self.model, engine).inc(generated_tokens)
        self.steps.labels(self.model, engine).observe(prompt_tokens + generated_tokens)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def reading(**overrides) -> VllmReading:
    fields = dict(
        running=8, waiting=3, kv_usage=0.25, steps=100, prompt_tokens=1000, generation_tokens=5000,
        kv_blocks_max=1000, tokens_per_block=16,
    )  # fmt: skip
    return VllmReading(**(fields | overrides))


def test_section_9_example_names_what_is_missing():
    samples = parse_samples(SECTION_9_EXAMPLE)
    with pytest.raises(MissingMetricsError) as info:
        read_vllm(samples)
    assert info.value.missing == (
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:kv_cache_usage_perc (or vllm:gpu_cache_usage_perc)",
        "vllm:cache_config_info{num_gpu_blocks}",
    )
    assert "pass kv_blocks_max" in str(info.value)


def test_reads_a_full_exposition_with_cache_config():
    engine = FakeVllm()
    engine.set(running=8, waiting=3, kv=0.125)
    for _ in range(4):
        engine.step(prompt_tokens=0, generated_tokens=8)
    engine.step(prompt_tokens=300, generated_tokens=8)
    got = read_vllm(parse_samples(engine.text()))
    assert got == VllmReading(
        running=8, waiting=3, kv_usage=0.125, steps=5, prompt_tokens=300, generation_tokens=40,
        kv_blocks_max=4096, tokens_per_block=16,
    )  # fmt: skip


def test_configured_geometry_wins_and_deprecated_kv_name_is_read():
    engine = FakeVllm(deprecated_kv_name=True, blocks=None)
    engine.set(running=1, waiting=0, kv=0.5)
    got = read_vllm(parse_samples(engine.text()), kv_blocks_max=2000, tokens_per_block=32)
    assert (got.kv_usage, got.kv_blocks_max, got.tokens_per_block) == (0.5, 2000, 32)


def test_derived_fields_over_the_steps_between_polls():
    before = reading()
    after = reading(steps=110, prompt_tokens=1500, generation_tokens=5070, kv_usage=0.3)
    stats = vllm_engine_stats(before, after, timestamp_s=1234.5)
    # 70 tokens over 10 steps: 7 decoding per step; 8 running, so 1 in prefill; 500/10 prompt tokens.
    assert (stats.generation_requests, stats.context_requests, stats.context_tokens) == (7, 1, 50)
    assert (stats.iteration, stats.timestamp_s, stats.kv_blocks_used, stats.kv_blocks_max) == (
        110,
        1234.5,
        300,
        1000,
    )
    assert (stats.active_requests, stats.scheduled_requests, stats.queued_requests) == (8, 8, 3)
    assert (stats.paused_requests, stats.iteration_latency_s) == (0, None)


def test_no_prompt_tokens_means_every_running_request_decodes():
    stats = vllm_engine_stats(reading(), reading(steps=101, generation_tokens=5008), timestamp_s=0.0)
    assert (stats.context_requests, stats.generation_requests, stats.context_tokens) == (0, 8, 0)


def test_counter_reset_counts_from_zero():
    """A counter below its last value restarted at 0: its increase is its current value."""
    after = reading(steps=104, prompt_tokens=200, generation_tokens=5020)
    stats = vllm_engine_stats(reading(), after, timestamp_s=0.0)
    assert stats.context_tokens == 50  # 200 / 4, not (200 - 1000) / 4
    assert stats.generation_requests == 5  # 20 / 4


def test_ambiguous_engines_list_choices_and_select_by_label():
    engine = FakeVllm(engines=("0", "1"))
    engine.step(10, 1, engine="1")
    samples = parse_samples(engine.text())
    with pytest.raises(EngineConfigError, match=r"engine='0'.*engine='1'"):
        read_vllm(samples)
    assert read_vllm(samples, engine="1").steps == 1
    with pytest.raises(EngineConfigError, match="no series with model_name='other'"):
        read_vllm(samples, model_name="other", engine="0")


def test_adapter_steps_restart_and_missing_geometry():
    engine = FakeVllm()
    wall_clock = itertools.count(1000.0).__next__

    async def scenario():
        async with (
            MetricsServer(engine.text()) as server,
            VllmAdapter(server.url, wall_clock=wall_clock) as adapter,
        ):
            assert await adapter.poll() is None  # no engine step yet
            assert adapter.health.healthy
            for _ in range(10):
                engine.step(prompt_tokens=0, generated_tokens=4)
            engine.set(running=4, waiting=0, kv=0.5)
            server.body = engine.text()
            first = await adapter.poll()
            assert (first.iteration, first.generation_requests, first.kv_blocks_used) == (10, 4, 2048)
            assert await adapter.poll() is None  # same step count: nothing new
            engine.step(prompt_tokens=120, generated_tokens=5)
            engine.step(prompt_tokens=0, generated_tokens=5)
            engine.set(running=5, waiting=2, kv=0.75)
            server.body = engine.text()
            second = await adapter.poll()
            assert (second.iteration, second.context_tokens, second.context_requests) == (12, 60, 1)
            assert (second.generation_requests, second.queued_requests) == (4, 2)
            # The server restarts: every counter is back near 0.
            restarted = FakeVllm()
            restarted.step(prompt_tokens=30, generated_tokens=1)
            restarted.set(running=1, waiting=0, kv=0.01)
            server.body = restarted.text()
            third = await adapter.poll()
            assert (third.iteration, third.context_tokens, third.context_requests) == (1, 30, 1)
            assert adapter.health.restarts == 1 and adapter.health.healthy
            # Stamped with the wall clock when read: one clock read per iteration returned.
            assert [first.timestamp_s, second.timestamp_s, third.timestamp_s] == [1000.0, 1001.0, 1002.0]
            server.body = FakeVllm(blocks=None).text()
            assert await adapter.poll() is None
            assert not adapter.health.healthy
            assert "vllm:cache_config_info{num_gpu_blocks}" in str(adapter.health.last_error)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("vllm:num_requests_running", "1e300"),
        ("vllm:num_requests_waiting", "9.223372036854776e+18"),  # 2^63
        ("vllm:iteration_tokens_total_count", "1e300"),
        ("vllm:prompt_tokens_total", "+Inf"),
    ],
)
def test_implausible_counts_are_malformed_not_passed_on(name, raw):
    engine = FakeVllm()
    engine.step(100, 4)
    text = "\n".join(
        line.rsplit(" ", 1)[0] + f" {raw}" if line.startswith(name + "{") else line
        for line in engine.text().splitlines()
    )
    with pytest.raises(MalformedMetricsError, match=f"{name}.* is "):
        read_vllm(parse_samples(text + "\n"))


def test_absurd_kv_cache_size_label_is_malformed():
    engine = FakeVllm(blocks=str(2**63))
    engine.step(100, 4)
    with pytest.raises(MalformedMetricsError, match="num_gpu_blocks"):
        read_vllm(parse_samples(engine.text()))
