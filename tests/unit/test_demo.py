"""The live demo's pieces that need no processes: the slice, the figures, the report, the view."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from agent.bench.demo import baseline_note, compare, live_figures, live_record, write_demo_report
from agent.bench.demo_plan import CAPACITY_SAMPLE_S, DemoConfig, plan_workload, plot_title
from agent.bench.live_run import LiveRun, LiveState, Sample, mean_busy_clock_mhz
from agent.bench.processes import load_args
from agent.catalog import gpu_spec, model_spec
from agent.cli import build_parser
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
    with pytest.raises(ValueError, match="duration"):
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
