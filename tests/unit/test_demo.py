"""The live demo's pieces that need no processes: the slice, the figures, the report, the view."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from agent.bench.demo import baseline_note, compare, live_figures, live_record, write_demo_report
from agent.bench.demo_plan import CAPACITY_SAMPLE_S, DemoConfig, plan_workload, plot_title
from agent.bench.live_run import (
    LiveRun,
    LiveState,
    Sample,
    engine_figures,
    mean_busy_clock_mhz,
    warm_up_request,
)
from agent.bench.processes import load_args
from agent.bench.scrape import MetricsPage
from agent.catalog import gpu_spec, model_spec
from agent.cli import build_parser, main
from agent.cli.common import workload_from_args
from agent.cli.demo import render
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.capacity import peak_rate_rps
from agent.slo_presets import load_slo_preset
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
PRESET = load_slo_preset("mlperf-server", "llama3-8b")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(tmp_path: Path, **kwargs) -> DemoConfig:
    return DemoConfig(setup=SETUP, preset=PRESET, out_dir=tmp_path, models_dir=SHIPPED_MODELS_DIR, **kwargs)


def test_the_load_command_rebuilds_exactly_the_planned_requests(tmp_path):
    demo = config(tmp_path, duration_s=20.0)
    planned = plan_workload(demo)
    args = build_parser().parse_args(load_args(planned.load_spec(demo)))
    rebuilt = workload_from_args(args, SETUP).requests(max_tokens=args.max_tokens)
    assert rebuilt == planned.requests and len(rebuilt) > 20
    assert planned.requests[-1].arrival_s == pytest.approx(20.0)  # arrivals last `duration_s` of wall time
    assert planned.load == pytest.approx(0.5, abs=0.03)  # half the engine's capacity
    sample = load_trace("azure-conv").window(600.0, CAPACITY_SAMPLE_S).requests(max_tokens=2048)
    assert planned.capacity_rps == peak_rate_rps(SETUP, sample)
    assert all(r.max_tokens == 2048 for r in planned.requests)


def test_a_slice_without_requests_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose an earlier start"):
        plan_workload(config(tmp_path, start_s=3400.0, duration_s=600.0))
    with pytest.raises(ValueError, match="wall time"):
        plan_workload(config(tmp_path, duration_s=0.0))


def sample(t: float, clock: float | None, batch: float | None, energy: float | None = None) -> Sample:
    locked = clock is not None and clock < 1410
    return Sample(t, clock, locked, 150.0, energy, batch, 100.0, 7240.0, 0.0, "controlling", 0.0008)


def finished_run() -> LiveRun:
    state = LiveState("throttllem", total=3, tpot_target_s=0.1, ttft_target_s=2.0)
    state.apply({"event": "start", "requests": 3})
    for i, gaps in enumerate(([0.02, 0.03], [0.05], [])):
        state.apply(
            {"event": "request", "id": i, "answered": i < 2, "ttft_s": 0.2, "tpot_s": 0.03, "gaps_s": gaps}
        )
    summary = {"requests": 3, "answered": 2, "output_tokens": 500, "slo_attainment": 2 / 3}
    latency = {"ttft_p99_s": 0.2, "tpot_p99_s": 0.03, "tbt_p99_s": 0.05, "e2e_p99_s": 3.0}
    state.apply({"event": "summary", **summary, **latency})
    state.samples = [sample(0.0, 1410, 0), sample(0.5, 600, 5), sample(1.0, 900, 3), sample(1.5, None, None)]
    state.energy_start_j, state.energy_end_j = 1000.0, 1250.0
    state.clock_changes_start, state.clock_changes_end = 4, 9
    return LiveRun(state, True, 0, 0.0012, 40, Path("logs"))


def test_live_figures_come_from_the_events_the_gpu_counters_and_busy_polls():
    figures = live_figures(finished_run())
    assert figures["energy_j"] == 250.0 and figures["tokens_per_joule"] == 2.0
    assert figures["clock_changes"] == 5 and figures["answered"] == 2
    assert figures["mean_clock_mhz"] == 750.0  # the idle poll at 1410 and the unread one do not count
    assert figures["tpot_p99_ms"] == pytest.approx(30.0) and figures["decision_p99_ms"] == pytest.approx(1.2)
    assert mean_busy_clock_mhz([]) is None
    state = finished_run().state
    assert state.answered == 2 and state.done == 3 and state.all_gaps_s().tolist() == [0.02, 0.03, 0.05]


def test_the_live_record_keeps_each_request_tpot_and_marks_idle_stock_clocks(tmp_path):
    run = finished_run()
    idle = replace(sample(0.0, 210, 0), locked=False)  # unlocked and idle: the twin reads its lowest clock
    busy_stock, locked = sample(1.0, 1410, 1), sample(1.5, 600, 3)
    run.state.samples = [idle, replace(idle, t_s=0.5), busy_stock, locked, replace(idle, t_s=2.0)]
    record = live_record(run, live_figures(run), config(tmp_path))
    assert record.tpot_s.tolist() == [0.03, 0.03]  # the answered requests' own TPOT, not their gaps
    assert record.stock_idle_spans_s == ((0.0, 1.0), (2.0, 2.5))  # the last poll holds one interval


def test_summary_report_and_plots(tmp_path):
    demo = config(tmp_path / "out")
    run = finished_run()
    ours = live_figures(run)
    base = {**ours, "source": "simulated", "policy": "max", "energy_j": 500.0, "tokens_per_joule": 1.0}
    base["slo_attainment"] = 1.0
    planned = plan_workload(config(tmp_path, duration_s=10.0))
    summary = compare(demo, planned, ours, base)
    assert summary["saved_pct"] == pytest.approx(50.0)
    assert (summary["requests"], summary["answered"], summary["clock_reset_on_exit"]) == (3, 2, True)
    assert summary["baseline_slo_attainment"] == 1.0 and summary["slo_attainment"] == pytest.approx(2 / 3)
    records = [live_record(run, ours, demo), replace(live_record(run, base, demo), policy="max", label="")]
    plots = write_demo_report(demo.out_dir, summary, records, "title", plot_title(demo, planned))
    for name in plots.values():
        assert (demo.out_dir / name).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((demo.out_dir / "summary.json").read_text())
    assert saved["saved_pct"] == pytest.approx(50.0) and saved["plots"] == plots
    report = (demo.out_dir / "report.md").read_text()
    assert all(f"({name})" in report for name in plots.values()) and "tpot_cdf" in plots
    assert "simulated, not measured live" in report and "| energy (J) | 250 | 500 |" in report


def test_the_live_view_renders_before_and_during_the_run():
    console = Console(record=True, width=100)
    state = LiveState("throttllem", total=10, tpot_target_s=0.1, ttft_target_s=2.0)
    console.print(render(state))
    run = finished_run()
    run.state.latest = sample(1.0, 600, 5, energy=1100.0)
    run.state.energy_end_j = None
    console.print(render(run.state))
    text = console.export_text()
    assert "requests done" in text and "0 / 10" in text
    assert "600 MHz (locked)" in text and "100 / 7,240 blocks" in text and "100 J" in text
    assert "30 ms  (target 100 ms)" in text and np.isfinite(run.state.percentile([1.0, 2.0], 99))


def test_a_live_baseline_is_said_to_be_live_and_cross_checked_with_the_simulator():
    summary = {
        "baseline_source": "live",
        "baseline_energy_j": 4542.9,
        "simulated_baseline": {"energy_j": 4410.0},
    }
    note = baseline_note(summary)
    assert "measured live" in note and "4,410 J" in note and "4,543 J" in note
    assert "simulated, not measured live" in baseline_note({"baseline_source": "simulated"})


@pytest.mark.parametrize(
    ("engine", "api"), [("triton", "triton"), ("vllm", "openai-chat"), ("trtllm-serve", "openai-completions")]
)
def test_each_engine_gets_the_load_generator_of_its_api(tmp_path, engine, api):
    demo = config(tmp_path, duration_s=5.0, engine=engine)
    args = build_parser().parse_args(load_args(plan_workload(demo).load_spec(demo)))
    assert (args.api, args.model, args.model_name) == (api, "llama3-8b", None)
    path, body = warm_up_request(engine, "served")
    if engine == "triton":
        assert path == "/v2/models/served/generate" and body["text_input"] == "tok " * 8
    else:
        assert path == "/v1/completions" and body["model"] == "served" and body["stream"] is False
    assert (body["prompt_tokens"], body["output_tokens"], body["max_tokens"]) == (8, 2, 2)
    with pytest.raises(ValueError, match="engine must be one of"):
        plan_workload(config(tmp_path, engine="sglang"))


VLLM_PAGE = """\
vllm:num_requests_running{engine="0",model_name="llama3-8b"} 12.0
vllm:num_requests_waiting{engine="0",model_name="llama3-8b"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama3-8b"} 0.25
vllm:iteration_tokens_total_count{engine="0",model_name="llama3-8b"} 40.0
vllm:prompt_tokens_total{engine="0",model_name="llama3-8b"} 900.0
vllm:generation_tokens_total{engine="0",model_name="llama3-8b"} 300.0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="8000"} 1.0
"""
TRITON_PAGE = """\
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 7
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 120
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 7240
"""
SIDECAR_PAGE = "throttllem_batch_size 5.0\nthrottllem_kv_blocks_used 64.0\n"


def test_batch_and_kv_come_from_what_each_engine_exports():
    side = MetricsPage.parse(SIDECAR_PAGE)
    assert engine_figures("triton", MetricsPage.parse(TRITON_PAGE), side, 999) == (7.0, 120.0, 7240.0)
    assert engine_figures("vllm", MetricsPage.parse(VLLM_PAGE), side, 999) == (12.0, 2000.0, 8000.0)
    # trtllm-serve's /metrics drains the stats the sidecar needs: the sidecar's view, the twin's pool
    assert engine_figures("trtllm-serve", None, side, 999) == (5.0, 64.0, 999.0)
    assert engine_figures("vllm", MetricsPage.parse(TRITON_PAGE), side, 999) == (None, None, None)
    assert engine_figures("triton", None, None, 999) == (None, None, None)
    assert engine_figures("trtllm-serve", None, None, 999) == (None, None, 999.0)


def test_every_demo_and_load_option_says_what_it_does():
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("demo", "load"):
        missing = [a.option_strings for a in subcommands[name]._actions if not a.help]
        assert not missing, f"{name}: {missing}"


def test_the_sizing_demo_refuses_another_engine(capsys):
    assert main(["demo", "--autoscale", "--engine", "vllm"]) == 1
    assert "the sizing demo runs its twins as triton only" in capsys.readouterr().err
