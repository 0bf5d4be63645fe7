"""vLLM's Prometheus metrics (V1 engine, ~0.11), counted from the twin's engine steps as vLLM counts them.

Names, HELP texts, label names and buckets are verbatim from `vllm/v1/metrics/loggers.py`
(`@005a810` plus the 0.11 `vllm:inter_token_latency_seconds`; reference/interfaces.md §3.1,
§9), in its own `CollectorRegistry` rendered by prometheus_client as vLLM's `/metrics` is
(`_created` series included, as a single API server has them). Every series has
`engine="0"` and `model_name=<served>`, except `vllm:cache_config_info`, which has the cache
config fields and `engine`, registered once the engine is up (vLLM's
`log_engine_initialized`).

What one engine step records (`PrometheusStatLogger.record`, `IterationStats.update_from_output`):

- every step, the scheduler's state after it: `num_requests_running` (requests admitted and
  not finished: decoding or mid-prefill), `num_requests_waiting` (not yet admitted, or
  preempted and waiting to resume), `kv_cache_usage_perc` (blocks held / blocks);
- a step that produced output (vLLM builds no `IterationStats` for one that did not, e.g. a
  chunk of a long prefill): prompt tokens of the requests that got their first token, tokens
  generated, their sum in `iteration_tokens_total`, preemptions since the last such step, a
  time to first token per first token (arrival to the step's end), an inter-token latency per
  later token (since the request's previous token: a preempted request's gap included);
- each request that finished in the step: `request_success_total{finished_reason}` ("length"
  when it used its max_tokens, else "stop") and its end-to-end latency (arrival to last token).

Times are twin time. Tokens are seen per step as they are delivered, so the requests tracked
(`track`) must be streamed by the engine (one response per token), as vLLM's engine always
streams to its API server.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted

from agent.twin.engine import Engine, FinishedRequest
from agent.twin.iteration_stats import IterationStats
from agent.twin.server.openai_protocol import finish_reason
from agent.twin.server.realtime import Generation, TwinObserver

ENGINE_INDEX = "0"
LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's FinishReason strings, each series made at start
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    *(0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_LATENCY_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0),
    *(30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)


@dataclass(slots=True)
class _Tracked:
    """One request as the metrics follow it."""

    generation: Generation
    tokens_seen: int = 0  # tokens counted so far
    last_token_s: float = 0.0  # epoch seconds of its latest token (the step's end)
    finished: FinishedRequest | None = field(default=None)  # set in the step it finished


class VllmMetrics(TwinObserver):
    """The families the vLLM adapter reads, and vLLM's latency histograms; `watch` the engine, then scrape."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        values = (model_name, ENGINE_INDEX)

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, LABELS, registry=self.registry).labels(*values)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, LABELS, registry=self.registry).labels(*values)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(name, documentation, LABELS, registry=self.registry, buckets=buckets)
            return family.labels(*values)

        self._running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self._waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self._kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self._prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=self.registry,
        )
        self._success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        self._iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self._ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self._itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._engine: Engine | None = None
        self._preemptions_counted = 0
        self._tracked: dict[int, _Tracked] = {}

    def watch(self, engine: Engine) -> None:
        """Follow `engine` and publish its cache config, as vLLM does once its engine is up."""
        self._engine = engine
        config = {
            "block_size": str(engine.config.tokens_per_block),
            "cache_dtype": "auto",
            "enable_prefix_caching": "False",  # the twin has no prefix cache
            "gpu_memory_utilization": str(engine.config.kv_cache_free_gpu_mem_fraction),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(engine.kv_blocks),
            "engine": ENGINE_INDEX,
        }
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(config),
            registry=self.registry,
        )
        info.labels(**config).set(1)

    def track(self, generation: Generation) -> None:
        """Count this request's tokens from now on (it must be streamed by the engine)."""
        self._tracked[generation.request.request_id] = _Tracked(generation)

    def on_finished(self, generation: Generation, done: FinishedRequest) -> None:
        """Note the finish; the step that produced its last token counts it."""
        tracked = self._tracked.get(done.request.request_id)
        if tracked is not None:
            tracked.finished = done

    def on_iteration(self, stats: IterationStats) -> None:
        """Record one engine step (see the module docstring)."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("VllmMetrics.watch(engine) must be called before the engine runs")
        self._running.set(engine.active_requests)
        self._waiting.set(len(engine.waiting))
        self._kv_usage.set(engine.used_blocks / engine.kv_blocks)
        step_end = stats.timestamp
        prompt = generated = 0
        first_token_latencies: list[float] = []
        inter_token_latencies: list[float] = []
        finished: list[tuple[int, FinishedRequest]] = []
        for request_id, tracked in self._tracked.items():
            generation = tracked.generation
            new = generation.tokens - tracked.tokens_seen
            if new > 0:
                if tracked.tokens_seen == 0:
                    assert generation.first_token_s is not None  # set before the step's tokens are delivered
                    prompt += generation.request.prompt_tokens
                    first_token_latencies.append(generation.first_token_s - generation.request.arrival_s)
                else:
                    inter_token_latencies.append(step_end - tracked.last_token_s)
                tracked.tokens_seen += new
                tracked.last_token_s = step_end
                generated += new
            if tracked.finished is not None:
                finished.append((request_id, tracked.finished))
        if generated:
            self._preemptions.inc(engine.preemptions - self._preemptions_counted)
            self._preemptions_counted = engine.preemptions
            self._prompt_tokens.inc(prompt)
            self._generation_tokens.inc(generated)
            self._iteration_tokens.observe(prompt + generated)
            for latency in first_token_latencies:
                self._ttft.observe(latency)
            for latency in inter_token_latencies:
                self._itl.observe(latency)
        for request_id, done in finished:
            self._success[finish_reason(done.output_tokens, done.request.max_tokens)].inc()
            self._e2e.observe(done.finish_s - done.request.arrival_s)
            del self._tracked[request_id]

    def scrape(self, accept: str | None, accept_encoding: str | None) -> tuple[bytes, dict[str, str]]:
        """(body, headers) as prometheus_client's ASGI app answers: format by Accept, gzip if accepted."""
        encoder, content_type = choose_encoder(accept or "")
        body = encoder(self.registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(accept_encoding or ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return body, headers
