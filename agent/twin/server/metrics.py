"""The metric families Triton + the TensorRT-LLM backend expose on port 8002, and that port's app.

Names, HELP texts, types and labels are verbatim from `triton-inference-server/core:src/metrics.cc`
and `NVIDIA/TensorRT-LLM:triton_backend/inflight_batcher_llm/src/custom_metrics_reporter/
custom_metrics_reporter.cc@0d5352f` (reference/interfaces.md §1.3, §1.4). Registration order is
theirs: core families at server start, the backend's at model load. Series inside a family come
out in prometheus-cpp's hash order, which nobody should rely on; we print them in the order the
backend README's example shows.

What the twin fills, and from where:

- `nv_trt_llm_*` gauges: the last iteration drained by the stats poller (`pollers.py`);
- per-GPU families (`gpu_uuid` label, one series per GPU of the TP group): the DCGM poller;
- per-model counters (`model`, `version`): each finished or failed request, for the served model
  and for the `tensorrt_llm` model that runs the engine (the ensemble's composing model);
- `nv_llm_{output,input}_token_len` histograms: one observation per finished request.

Left out: CPU, pinned-memory, response-cache, summary and model-load families (the twin has no
numbers for them that would mean anything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web

from agent.twin.server.exposition import Family, Histogram, MetricType, Series, render
from agent.twin.server.protocol import MODEL_VERSION

TRT_LLM_MODEL = "tensorrt_llm"  # the composing model that owns the engine in the stock ensemble
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
TOKEN_LEN_BUCKETS = (10.0, 50.0, 100.0, 500.0, 1000.0)
CONTENT_TYPE = "text/plain"

# Per-model counters: (name, help), in core's registration order.
_MODEL_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)"),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
    ),
)

# Per-GPU gauges: (name, help).
_GPU_GAUGES = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
    ("nv_gpu_power_usage", "GPU power usage in watts"),
    ("nv_gpu_power_limit", "GPU power management limit in watts"),
)
ENERGY = ("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started")

# TRT-LLM backend families: (name, help, type, category label, label values in print order).
_BACKEND_FAMILIES = (
    (
        "nv_trt_llm_request_metrics",
        "TRT LLM request metrics",
        MetricType.GAUGE,
        "request_type",
        ("waiting", "context", "scheduled", "max", "active"),
    ),
    (
        "nv_trt_llm_runtime_memory_metrics",
        "TRT LLM runtime memory metrics",
        MetricType.GAUGE,
        "memory_type",
        ("pinned", "gpu", "cpu"),
    ),
    (
        "nv_trt_llm_kv_cache_block_metrics",
        "TRT LLM KV cache block metrics",
        MetricType.GAUGE,
        "kv_cache_block_type",
        ("fraction", "reused", "tokens_per", "used", "free", "max"),
    ),
    (
        "nv_trt_llm_disaggregated_serving_metrics",
        "TRT LLM disaggregated serving metrics",
        MetricType.COUNTER,
        "disaggregated_serving_type",
        ("kv_cache_transfer_ms", "request_count"),
    ),
    (
        "nv_trt_llm_inflight_batcher_metrics",
        "TRT LLM inflight_batcher-specific metrics",
        MetricType.GAUGE,
        "inflight_batcher_specific_metric",
        ("paused_requests", "micro_batch_id", "generation_requests", "total_context_tokens"),
    ),
    (
        "nv_trt_llm_general_metrics",
        "General TRT LLM metrics",
        MetricType.GAUGE,
        "general_type",
        ("iteration_counter", "timestamp"),
    ),
)
_TOKEN_HISTOGRAMS = (
    ("nv_llm_output_token_len", "total_output_tokens"),
    ("nv_llm_input_token_len", "total_input_tokens"),
)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One DCGM poll of one GPU, already quantised as DCGM reports it."""

    utilization: float  # 0..1 in steps of 0.01
    memory_total_bytes: int
    memory_used_bytes: int
    power_w: float  # milliwatt resolution
    power_limit_w: float
    energy_delta_j: float  # energy since the previous poll


@dataclass(frozen=True, slots=True)
class FinishedRequestTimes:
    """What the per-model counters and token histograms record of one finished request."""

    request_us: int  # arrival to last token
    queue_us: int  # arrival to first scheduled iteration
    compute_us: int  # first scheduled iteration to last token
    input_tokens: int
    output_tokens: int


class TritonMetrics:
    """Every family the twin exposes, updated in place; `text()` renders one scrape."""

    def __init__(self, model_names: Sequence[str], gpu_uuids: Sequence[str]) -> None:
        models = list(dict.fromkeys([*model_names, TRT_LLM_MODEL]))
        self._families: list[Family] = []
        self._model_series: dict[str, list[Series]] = {}
        self._failures: dict[str, list[Series]] = {reason: [] for reason in FAILURE_REASONS}
        for name, help_text in _MODEL_COUNTERS:
            family = self._family(name, help_text, MetricType.COUNTER)
            for model in models:
                if name == "nv_inference_request_failure":
                    for reason in FAILURE_REASONS:
                        labels = (("model", model), ("reason", reason), ("version", MODEL_VERSION))
                        self._failures[reason].append(family.add(labels))
                else:
                    series = family.add((("model", model), ("version", MODEL_VERSION)))
                    self._model_series.setdefault(name, []).append(series)
        pending = self._family(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            MetricType.GAUGE,
        )
        for model in models:  # the backend takes every request at once: nothing waits in Triton
            pending.add((("model", model), ("version", MODEL_VERSION)))

        self._gpu_series: dict[str, list[Series]] = {}
        for name, help_text in (*_GPU_GAUGES, ENERGY):
            kind = MetricType.COUNTER if name == ENERGY[0] else MetricType.GAUGE
            family = self._family(name, help_text, kind)
            self._gpu_series[name] = [family.add((("gpu_uuid", uuid),)) for uuid in gpu_uuids]

        self._backend: dict[str, dict[str, Series]] = {}
        for name, help_text, kind, category, values in _BACKEND_FAMILIES:
            family = self._family(name, help_text, kind)
            self._backend[name] = {
                value: family.add(((category, value), ("model", TRT_LLM_MODEL), ("version", MODEL_VERSION)))
                for value in values
            }
        self._histograms: dict[str, Histogram] = {}
        for name, metric_type in _TOKEN_HISTOGRAMS:
            family = self._family(name, "TRT LLM response metrics", MetricType.HISTOGRAM)
            histogram = Histogram(TOKEN_LEN_BUCKETS)
            family.add(
                (("model", TRT_LLM_MODEL), ("response_metric_type", metric_type), ("version", MODEL_VERSION)),
                histogram,
            )
            self._histograms[name] = histogram

    def _family(self, name: str, help_text: str, kind: MetricType) -> Family:
        family = Family(name, help_text, kind)
        self._families.append(family)
        return family

    def _add_per_model(self, name: str, amount: float) -> None:
        for series in self._model_series[name]:
            assert not isinstance(series.value, Histogram)
            series.value += amount

    def request_succeeded(self, times: FinishedRequestTimes) -> None:
        """Count one finished request (batch size 1: one inference, one execution)."""
        self._add_per_model("nv_inference_request_success", 1)
        self._add_per_model("nv_inference_count", 1)
        self._add_per_model("nv_inference_exec_count", 1)
        self._add_per_model("nv_inference_request_duration_us", times.request_us)
        self._add_per_model("nv_inference_queue_duration_us", times.queue_us)
        self._add_per_model("nv_inference_compute_infer_duration_us", times.compute_us)
        self._histograms["nv_llm_output_token_len"].observe(times.output_tokens)
        self._histograms["nv_llm_input_token_len"].observe(times.input_tokens)

    def request_failed(self, reason: str) -> None:
        """Count one failed request; `reason` is one of `FAILURE_REASONS`."""
        for series in self._failures[reason]:
            assert not isinstance(series.value, Histogram)
            series.value += 1

    def set_engine_gauges(self, values: Mapping[str, Mapping[str, float]]) -> None:
        """Set the `nv_trt_llm_*` gauges from `triton_gauge_values` of one iteration."""
        for family, by_label in values.items():
            for label, value in by_label.items():
                self._backend[family][label].value = value

    def record_gpu(self, reading: GpuReading) -> None:
        """Apply one DCGM poll to every GPU of the engine (TP ranks work in lockstep)."""
        values = {
            "nv_gpu_utilization": reading.utilization,
            "nv_gpu_memory_total_bytes": reading.memory_total_bytes,
            "nv_gpu_memory_used_bytes": reading.memory_used_bytes,
            "nv_gpu_power_usage": reading.power_w,
            "nv_gpu_power_limit": reading.power_limit_w,
        }
        for name, value in values.items():
            for series in self._gpu_series[name]:
                series.value = value
        for series in self._gpu_series[ENERGY[0]]:
            assert not isinstance(series.value, Histogram)
            series.value += reading.energy_delta_j

    def text(self) -> str:
        """One scrape of every family."""
        return render(self._families)


def metrics_app(metrics: TritonMetrics) -> web.Application:
    """Triton's metrics port: `GET /metrics` and nothing else (other paths: 400, empty body)."""

    async def scrape(request: web.Request) -> web.StreamResponse:
        if request.path != "/metrics":
            return web.Response(status=400, content_type=CONTENT_TYPE, charset="utf-8")
        if request.method != "GET":
            return web.json_response({"error": "Method Not Allowed"}, status=405)
        return web.Response(text=metrics.text(), content_type=CONTENT_TYPE, charset="utf-8")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scrape)
    return app
