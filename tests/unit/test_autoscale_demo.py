"""The sizing demo's pieces that need no processes: the plan, the pool's readings, the figures, the report."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from agent.bench.autoscale_demo import (
    AutoscaleConfig,
    AutoscaleDemoError,
    AutoscaleState,
    EngineReading,
    PoolSample,
    paced,
    plan_autoscale,
    simulated_baseline,
    switch_times_s,
)
from agent.bench.autoscale_report import write_autoscale_report
from agent.catalog import gpu_spec, model_spec
from agent.cli.demo import render_pool
from agent.shipped import SHIPPED_MODELS_DIR
from agent.slo_presets import load_slo_preset
from agent.twin.setup import TwinSetup, fit_to_engine
from agent.workloads import load_trace

SETUP = TwinSetup(gpu_spec("a100-sxm4-40gb"), model_spec("llama2-13b"))
PRESET = load_slo_preset("mlperf-server", "llama2-13b")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(tmp_path: Path, **kwargs) -> AutoscaleConfig:
    return AutoscaleConfig(
        setup=SETUP, preset=PRESET, models_dir=SHIPPED_MODELS_DIR, out_dir=tmp_path, **kwargs
    )


def per_period(arrivals: list[float], start_s: float, end_s: float, period_s: float) -> list[int]:
    return [
        sum(t0 <= a < t0 + period_s for a in arrivals)
        for t0 in [start_s + i * period_s for i in range(int((end_s - start_s) // period_s))]
    ]


def test_paced_arrivals_are_even_and_inside_their_phase():
    times = paced(0.5, 10.0, 8.0)
    assert times == pytest.approx([11.0, 13.0, 15.0, 17.0])


def test_the_plan_reads_quiet_below_tp1_and_the_burst_between_tp1_and_tp2(tmp_path):
    demo = config(tmp_path)
    plan = plan_autoscale(demo)
    caps = plan.capacities_rps
    assert set(caps) == {1, 2} and caps[2] > caps[1] > 0
    planned = {size: demo.headroom * rps for size, rps in caps.items()}
    assert plan.quiet_rps < planned[1] < plan.burst_rps < planned[2]
    assert plan.baseline_size == 2, "the fixed pool must serve the burst"
    arrivals = [r.arrival_s for r in plan.requests]
    quiet_end, burst_end = demo.quiet_s, demo.quiet_s + demo.burst_s
    rate = lambda count: count / demo.period_s  # noqa: E731
    # Whatever the phase of the coordinator's periods, quiet periods read quiet and burst ones busy.
    for offset in (0.0, 3.3, 7.1):
        quiet = per_period(
            arrivals, burst_end + offset, burst_end + demo.tail_s - demo.period_s, demo.period_s
        )
        burst = per_period(arrivals, quiet_end + offset, burst_end - demo.period_s, demo.period_s)
        assert max(map(rate, quiet)) < planned[1] < min(map(rate, burst))
    # The lengths are the trace's, in its order from the start second, cut to the model's window.
    trace = load_trace(demo.trace)
    shapes = trace.window(demo.start_s, trace.duration_s - demo.start_s).requests(max_tokens=demo.max_tokens)
    fitted, cut = fit_to_engine(shapes[: len(plan.requests)], SETUP)
    assert [(r.prompt_tokens, r.output_tokens) for r in plan.requests] == [
        (s.prompt_tokens, s.output_tokens) for s in fitted
    ]
    assert cut >= 1, "this slice has prompts too long for Llama-2's 4k window: the premise of the check"
    assert all(r.prompt_tokens + r.max_tokens <= SETUP.max_seq_len for r in plan.requests)
    assert [r.request_id for r in plan.requests] == list(range(len(plan.requests)))


def test_a_plan_needs_two_sizes_and_a_period_that_tells_quiet_apart(tmp_path):
    with pytest.raises(AutoscaleDemoError, match="two engine sizes"):
        plan_autoscale(config(tmp_path, sizes=(1,)))
    with pytest.raises(AutoscaleDemoError, match="too short"):
        plan_autoscale(config(tmp_path, period_s=2.0))


def test_the_baseline_is_max_on_the_fixed_burst_size_in_virtual_time(tmp_path):
    demo = config(tmp_path, quiet_s=5.0, burst_s=10.0, tail_s=5.0)
    plan = plan_autoscale(demo)
    base = simulated_baseline(demo, plan)
    assert base["completed"] == len(plan.requests) and base["sizes_served"] == [2]
    assert base["energy_engine_gpus_j"] > 0 and base["policy"] == "max"


def test_switch_times_pair_each_resize_start_with_its_route_and_skip_the_first_engine():
    actions = [
        (-6.0, "start", 1, "nothing routed yet"),
        (-1.5, "route", 1, "first"),
        (30.0, "start", 2, "busy"),
        (35.5, "route", 2, "ready"),
        (55.0, "stop", 1, "drained"),
        (131.0, "start", 1, "quiet"),
        (134.0, "route", 1, "ready"),
    ]
    assert switch_times_s(actions) == pytest.approx([5.5, 3.0])


def test_energy_counts_every_engine_from_the_load_start_including_stopped_ones():
    state = AutoscaleState("throttllem", total=3)
    state.engines = {1: EngineReading(1, energy_j=500.0, energy_at_start_j=100.0, power_w=80.0)}
    state.retired = [EngineReading(2, energy_j=900.0, energy_at_start_j=0.0, reset_on_exit=True)]
    assert state.energy_j() == pytest.approx(400.0 + 900.0)
    assert state.power_w() == pytest.approx(80.0), "a stopped engine draws nothing"


def test_report_and_live_view(tmp_path):
    state = AutoscaleState("throttllem", total=10, serving=2, draining=(1,), last_reason="tp2 is ready")
    state.engines = {7: EngineReading(2, clock_mhz=1110.0, locked=True, power_w=310.0, energy_j=50.0)}
    console = Console(record=True, width=120)
    console.print(render_pool(state))
    text = console.export_text()
    assert "tp2 engine" in text and "1110 MHz (locked)" in text and "draining" in text
    summary = {
        "gpu": "a100-sxm4-40gb",
        "model": "llama2-13b",
        "sizes": [1, 2],
        "policy": "throttllem",
        "slo": "mlperf-server",
        "trace": "azure-conv",
        "capacities_rps": {1: 0.22, 2: 1.8},
        "quiet_rps": 0.07,
        "burst_rps": 0.72,
        "phases_s": [30.0, 60.0, 80.0],
        "requests": 50,
        "answered": 50,
        "lost": 0,
        "slo_attainment": 0.96,
        "energy_j": 30000.0,
        "tokens_per_joule": 0.41,
        "actions": [{"t_s": 30.0, "action": "start", "tp": 2, "reason": "busy"}],
        "decision_to_switch_s": [5.2],
        "clocks_reset_on_exit": True,
        "baseline": {
            "policy": "fixed:max",
            "tp": 2,
            "energy_j": 46000.0,
            "tokens_per_joule": 0.27,
            "slo_attainment": 1.0,
        },
        "saved_pct": 34.8,
    }
    samples = [
        PoolSample(float(t), 1 if t < 40 else 2, 1 if t < 30 else 3, 100.0 + t, {1: 900.0, 2: 1000.0})
        for t in range(0, 90, 5)
    ]
    plots = write_autoscale_report(tmp_path, summary, samples)
    assert Path(plots["timeline"]).read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "report.md").read_text()
    assert "| energy (J) | 30000 | 46000 |" in report and "34.8%" in report and "5.2 s" in report
    assert json.loads((tmp_path / "summary.json").read_text())["saved_pct"] == 34.8
