"""The twin's metrics text against Triton's documented output, byte for byte where examples exist."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.twin.server.exposition import Family, Histogram, MetricType, format_value, render
from agent.twin.server.metrics import GpuReading, TritonMetrics

# reference/interfaces.md §1.3: tensorrtllm_backend README.md@0b9d7d5, "Triton Metrics".
README_EXAMPLE = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 0
# HELP nv_trt_llm_runtime_memory_metrics TRT LLM runtime memory metrics
# TYPE nv_trt_llm_runtime_memory_metrics gauge
nv_trt_llm_runtime_memory_metrics{memory_type="pinned",model="tensorrt_llm",version="1"} 0
nv_trt_llm_runtime_memory_metrics{memory_type="gpu",model="tensorrt_llm",version="1"} 1610236
nv_trt_llm_runtime_memory_metrics{memory_type="cpu",model="tensorrt_llm",version="1"} 0
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.4875
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6239
# HELP nv_trt_llm_inflight_batcher_metrics TRT LLM inflight_batcher-specific metrics
# TYPE nv_trt_llm_inflight_batcher_metrics gauge
nv_trt_llm_inflight_batcher_metrics{inflight_batcher_specific_metric="micro_batch_id",model="tensorrt_llm",version="1"} 0
nv_trt_llm_inflight_batcher_metrics{inflight_batcher_specific_metric="generation_requests",model="tensorrt_llm",version="1"} 0
nv_trt_llm_inflight_batcher_metrics{inflight_batcher_specific_metric="total_context_tokens",model="tensorrt_llm",version="1"} 0
# HELP nv_trt_llm_general_metrics General TRT LLM metrics
# TYPE nv_trt_llm_general_metrics gauge
nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"} 0
nv_trt_llm_general_metrics{general_type="timestamp",model="tensorrt_llm",version="1"} 1700074049
# HELP nv_trt_llm_disaggregated_serving_metrics TRT LLM disaggregated serving metrics
# TYPE nv_trt_llm_disaggregated_serving_metrics counter
nv_trt_llm_disaggregated_serving_metrics{disaggregated_serving_type="kv_cache_transfer_ms",model="tensorrt_llm",version="1"} 0
nv_trt_llm_disaggregated_serving_metrics{disaggregated_serving_type="request_count",model="tensorrt_llm",version="1"} 0
"""  # noqa: E501 (verbatim lines)
README_VALUES = {
    "nv_trt_llm_request_metrics": {"waiting": 1, "context": 1, "scheduled": 1, "max": 512, "active": 0},
    "nv_trt_llm_runtime_memory_metrics": {"pinned": 0, "gpu": 1610236, "cpu": 0},
    "nv_trt_llm_kv_cache_block_metrics": {
        "fraction": 0.4875,
        "tokens_per": 64,
        "used": 1,
        "free": 6239,
        "max": 6239,
    },
    "nv_trt_llm_inflight_batcher_metrics": {
        "micro_batch_id": 0,
        "generation_requests": 0,
        "total_context_tokens": 0,
    },
    "nv_trt_llm_general_metrics": {"iteration_counter": 0, "timestamp": 1700074049},
}
# Series the README predates (interfaces.md §1.3: "reused/paused_requests ... missing from the README").
NEWER_SERIES = ('kv_cache_block_type="reused"', 'inflight_batcher_specific_metric="paused_requests"')
UUID = "GPU-a07dfe08-b87f-1f96-7083-07a26d0fa83e"  # the uuid in interfaces.md §1.4's example


def blocks(text: str) -> dict[str, list[str]]:
    """Family name -> its lines (HELP, TYPE, series)."""
    out: dict[str, list[str]] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            out[name] = []
        out[name].append(line)
    return out


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (6239, "6239"),
        (0.4875, "0.4875"),
        (33.246, "33.246"),
        (1727911542275675.0, "1727911542275675"),
        (0.1 + 0.2, "0.3"),
        (1e17, "1e+17"),
        (1e-5, "1e-05"),
        (math.nan, "Nan"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_numbers_print_like_prometheus_cpp(value, text):
    assert format_value(value) == text


def test_trtllm_families_match_the_backend_readme_line_for_line():
    metrics = TritonMetrics(["ensemble"], [UUID])
    metrics.set_engine_gauges(README_VALUES)
    ours = blocks(metrics.text())
    expected = blocks(README_EXAMPLE)
    for family, lines in expected.items():
        got = [line for line in ours[family] if not any(s in line for s in NEWER_SERIES)]
        assert got == lines, family
    assert any('kv_cache_block_type="reused"' in line for line in ours["nv_trt_llm_kv_cache_block_metrics"])


def test_gpu_families_match_the_triton_example_in_current_number_format():
    metrics = TritonMetrics(["ensemble"], [UUID])
    metrics.record_gpu(GpuReading(0.5, 85899345920, 79142322176, 33.246, 400.0, 0.0))
    ours = blocks(metrics.text())
    assert ours["nv_gpu_power_usage"] == [
        "# HELP nv_gpu_power_usage GPU power usage in watts",
        "# TYPE nv_gpu_power_usage gauge",
        f'nv_gpu_power_usage{{gpu_uuid="{UUID}"}} 33.246',
    ]
    assert ours["nv_energy_consumption"] == [
        "# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started",
        "# TYPE nv_energy_consumption counter",
        f'nv_energy_consumption{{gpu_uuid="{UUID}"}} 0',
    ]
    metrics.record_gpu(GpuReading(0.5, 85899345920, 79142322176, 33.246, 400.0, 1.5))
    metrics.record_gpu(GpuReading(0.5, 85899345920, 79142322176, 33.246, 400.0, 0.25))
    assert blocks(metrics.text())["nv_energy_consumption"][-1].endswith(" 1.75")


def test_families_are_grouped_counters_gauges_histograms_as_prometheus_cpp_collects():
    metrics = TritonMetrics(["ensemble"], [UUID])
    types = [line.split()[3] for line in metrics.text().splitlines() if line.startswith("# TYPE")]
    assert types == sorted(types, key=["counter", "gauge", "histogram"].index)
    names = [line.split()[2] for line in metrics.text().splitlines() if line.startswith("# TYPE")]
    assert names[:2] == ["nv_inference_request_success", "nv_inference_request_failure"]
    assert names.index("nv_energy_consumption") < names.index("nv_trt_llm_disaggregated_serving_metrics")
    assert names[-2:] == ["nv_llm_output_token_len", "nv_llm_input_token_len"]


def test_histogram_prints_count_sum_then_cumulative_buckets_with_le_last():
    hist = Histogram((10.0, 50.0))
    for value in (5, 20, 20, 70):
        hist.observe(value)
    family = Family("h", "help", MetricType.HISTOGRAM)
    family.add((("z", "1"), ("a", "2")), hist)
    assert render([family]).splitlines() == [
        "# HELP h help",
        "# TYPE h histogram",
        'h_count{a="2",z="1"} 4',
        'h_sum{a="2",z="1"} 115',
        'h_bucket{a="2",z="1",le="10"} 1',
        'h_bucket{a="2",z="1",le="50"} 3',
        'h_bucket{a="2",z="1",le="+Inf"} 4',
    ]


def test_empty_families_are_skipped_and_label_values_escaped():
    empty = Family("e", "nothing", MetricType.GAUGE)
    gauge = Family("g", 'a "help"\nline', MetricType.GAUGE)
    gauge.add((("path", 'C:\\x"y"'),), 2.5)
    assert (
        render([empty, gauge]) == '# HELP g a "help"\\nline\n# TYPE g gauge\ng{path="C:\\\\x\\"y\\""} 2.5\n'
    )


def test_the_whole_scrape_parses_with_prometheus_client_and_has_the_documented_labels():
    metrics = TritonMetrics(["ensemble"], [UUID, "GPU-00000000-0000-0000-0000-000000000001"])
    metrics.set_engine_gauges(README_VALUES)
    metrics.request_failed("BACKEND")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text())}
    label_sets = {name: {tuple(sorted(s.labels)) for s in f.samples} for name, f in families.items()}
    assert label_sets["nv_trt_llm_request_metrics"] == {("model", "request_type", "version")}
    assert label_sets["nv_trt_llm_kv_cache_block_metrics"] == {("kv_cache_block_type", "model", "version")}
    assert label_sets["nv_gpu_utilization"] == {("gpu_uuid",)}
    assert label_sets["nv_inference_request_failure"] == {("model", "reason", "version")}
    assert families["nv_energy_consumption"].type == "counter"
    assert families["nv_llm_output_token_len"].type == "histogram"
    assert len(families["nv_gpu_power_usage"].samples) == 2
    failures = {
        (s.labels["model"], s.labels["reason"]): s.value
        for s in families["nv_inference_request_failure"].samples
    }
    assert failures[("ensemble", "BACKEND")] == failures[("tensorrt_llm", "BACKEND")] == 1
    assert failures[("ensemble", "REJECTED")] == 0
    assert {s.labels["request_type"]: s.value for s in families["nv_trt_llm_request_metrics"].samples} == (
        README_VALUES["nv_trt_llm_request_metrics"]
    )
