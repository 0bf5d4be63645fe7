"""The live demo: a trace slice through the gateway of a real sidecar steering a real-time twin.

The slice is planned in `agent.bench.demo_plan`; the load generator process rebuilds the very
same request list from the same flags, and says how many requests it sends: a mismatch stops
the demo.

The baseline is stock clocks on the identical request list and engine setup: by default the
`max` policy in the virtual-time simulator (simulated, not measured live — the report says so);
with `live_baseline` a second live run under `max`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.demo_plan import DemoConfig, DemoWorkload, plan_workload, plot_title, title_of
from agent.bench.live_run import LiveRun, LiveRunError, LiveRunSpec, LiveState, mean_busy_clock_mhz, run_live
from agent.bench.replay import replay_slo, run_policy
from agent.bench.report import CAPACITY, RunRecord, jsonable, write_plots
from agent.policy_registry import build_policy
from agent.sim.policies import policy_context

BASELINE_POLICY = "max"
PLOT_LABEL = "demo"
PhaseReporter = Callable[[str], None]


def live_spec(config: DemoConfig, workload: DemoWorkload, policy: str) -> LiveRunSpec:
    """One live run of the demo's slice under `policy`."""
    return LiveRunSpec(
        setup=config.setup,
        policy=policy,
        slo=config.preset.name,
        models_dir=config.models_dir,
        load=workload.load_spec(config),
        requests=len(workload.requests),
        tpot_target_s=config.preset.tpot_s,
        ttft_target_s=config.preset.ttft_s,
        log_dir=config.out_dir / "logs" / policy.replace(":", "-"),
        refresh_s=config.refresh_s,
        arrivals_s=config.duration_s,
        engine=config.engine,
    )


async def live_checked(
    config: DemoConfig, workload: DemoWorkload, policy: str, on_update: Callable[[LiveState], None]
) -> LiveRun:
    """Run the slice live under `policy`; refuse a run whose request list differs from the plan."""
    run = await run_live(live_spec(config, workload, policy), on_update)
    announced = run.state.announced_requests
    if announced != len(workload.requests):
        raise LiveRunError(
            f"the load generator sent {announced} requests where the demo planned {len(workload.requests)}: "
            "the live run and the baseline would not compare"
        )
    return run


def live_figures(run: LiveRun) -> dict[str, Any]:
    """The comparison figures of a live run, as the clients and the twin GPU measured them."""
    state = run.state
    summary = state.summary or {}
    energy = state.energy_so_far_j()
    tokens = summary.get("output_tokens")
    changes = (
        None
        if state.clock_changes_end is None or state.clock_changes_start is None
        else state.clock_changes_end - state.clock_changes_start
    )
    return {
        "source": "live",
        "policy": state.policy,
        "requests": summary.get("requests", state.total),
        "answered": summary.get("answered", state.answered),
        "energy_j": energy,
        "output_tokens": tokens,
        "tokens_per_joule": tokens / energy if tokens is not None and energy else None,
        "slo_attainment": summary.get("slo_attainment"),
        "ttft_p99_s": summary.get("ttft_p99_s"),
        "tpot_p99_ms": _ms(summary.get("tpot_p99_s")),
        "tbt_p99_ms": _ms(summary.get("tbt_p99_s")),
        "e2e_p99_s": summary.get("e2e_p99_s"),
        "clock_changes": changes,
        "mean_clock_mhz": mean_busy_clock_mhz(state.samples),
        "decision_p99_ms": _ms(run.decision_p99_s),
        "decisions": run.decisions,
        "clock_reset_on_exit": run.clock_reset_on_exit,
    }


def simulated_baseline(config: DemoConfig, workload: DemoWorkload) -> RunRecord:
    """`max` on the identical requests and engine, in the virtual-time simulator."""
    slo = replay_slo(config.preset)
    built = build_policy(BASELINE_POLICY, policy_context(config.setup, slo.targets, config.models_dir))
    return run_policy(
        built,
        config.setup,
        workload.requests,
        slo,
        trace=config.trace,
        load=config.load,
        load_basis=CAPACITY,  # the demo offers `load` x the engine's capacity
        length_error=None,
        rate_scale=workload.rate_scale,
        capacity_rate_scale=workload.rate_scale / config.load,
    )


def simulated_figures(record: RunRecord) -> dict[str, Any]:
    """The comparison figures of a simulated run."""
    s = record.summary
    return {
        "source": "simulated",
        "policy": record.policy,
        "requests": s["requests"],
        "answered": s["completed"],
        "energy_j": s["energy_j"],
        "output_tokens": s["tokens_out"],
        "tokens_per_joule": s["tokens_per_joule"],
        "slo_attainment": s["slo_attainment"],
        "ttft_p99_s": s["ttft_p99_s"],
        "tpot_p99_ms": s["tpot_p99_ms"],
        "tbt_p99_ms": s["tbt_p99_ms"],
        "e2e_p99_s": s["e2e_p99_s"],
        "clock_changes": s["clock_changes"],
        "mean_clock_mhz": s["mean_clock_mhz"],
    }


def live_record(run: LiveRun, figures: dict[str, Any], config: DemoConfig) -> RunRecord:
    """A live run as the replay report's plots take it: polled clock and power, the clients' TPOT and gaps."""
    samples = run.state.samples
    gaps = run.state.all_gaps_s()
    time_s = np.array([s.t_s for s in samples])
    # Unlocked, the twin's GPU reads its highest clock while busy and its lowest while idle: an
    # unlocked poll below the highest clock is the engine idle under stock clocks, not a lock.
    idle = [
        s.locked is False and s.clock_mhz is not None and s.clock_mhz < config.setup.gpu.max_clock_mhz
        for s in samples
    ]
    return RunRecord(
        policy=run.state.policy,
        trace=config.trace,
        load=config.load,
        load_basis=CAPACITY,
        length_error=None,
        summary=figures,
        time_s=time_s,
        clock_mhz=np.array([math.nan if s.clock_mhz is None else s.clock_mhz for s in samples]),
        power_w=np.array([math.nan if s.power_w is None else s.power_w for s in samples]),
        tbt_s=gaps,
        tbt_weight=np.ones_like(gaps),
        tpot_s=np.asarray(run.state.tpot_s, dtype=float),
        tpot_target_s=config.preset.tpot_s,
        label=f"{run.state.policy} (live)",
        stock_idle_spans_s=held_spans(time_s, np.asarray(idle, dtype=bool)),
    )


def held_spans(time_s: np.ndarray, flags: np.ndarray) -> tuple[tuple[float, float], ...]:
    """(start, end) of each run of flagged polls; a poll holds until the next, the last for a median gap."""
    if time_s.size == 0:
        return ()
    step = float(np.median(np.diff(time_s))) if time_s.size > 1 else 0.0
    ends = np.append(time_s[1:], time_s[-1] + step)
    spans: list[tuple[float, float]] = []
    for start, end, flagged in zip(time_s, ends, flags, strict=True):
        if not flagged:
            continue
        if spans and spans[-1][1] == float(start):
            spans[-1] = (spans[-1][0], float(end))
        else:
            spans.append((float(start), float(end)))
    return tuple(spans)


def compare(
    config: DemoConfig, workload: DemoWorkload, ours: dict[str, Any], base: dict[str, Any]
) -> dict[str, Any]:
    """The demo's summary: the headline figures flat (the `--json` contract), both runs in full."""
    energy, base_energy = ours["energy_j"], base["energy_j"]
    saved = 100.0 * (1.0 - energy / base_energy) if energy is not None and base_energy else None
    return {
        "policy": config.policy,
        "engine": config.engine,
        "baseline_policy": BASELINE_POLICY,
        "baseline_source": base["source"],
        "gpu": config.setup.gpu.name,
        "model": config.setup.model.name,
        "tp": config.setup.tp,
        "slo": config.preset.name,
        "trace": config.trace,
        "window_start_s": config.start_s,
        "window_s": workload.window_s,
        "rate_scale": workload.rate_scale,
        "load": workload.load,
        "capacity_rps": workload.capacity_rps,
        "requests": ours["requests"],
        "answered": ours["answered"],
        "energy_j": energy,
        "baseline_energy_j": base_energy,
        "saved_pct": saved,
        "tokens_per_joule": ours["tokens_per_joule"],
        "baseline_tokens_per_joule": base["tokens_per_joule"],
        "slo_attainment": ours["slo_attainment"],
        "baseline_slo_attainment": base["slo_attainment"],
        "clock_reset_on_exit": ours["clock_reset_on_exit"],
        "live": ours,
        "baseline": base,
    }


def write_demo_report(
    out_dir: Path, summary: dict[str, Any], records: list[RunRecord], title: str, short_title: str
) -> dict[str, str]:
    """summary.json, report.md and the replay report's plots; returns the plot file names by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out_dir, records, PLOT_LABEL, short_title)
    document = jsonable({**summary, "plots": plots})
    (out_dir / "summary.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(_markdown(summary, plots, title))
    return plots


ROWS = (
    ("requests", "requests", "{:,.0f}"),
    ("answered", "answered", "{:,.0f}"),
    ("energy (J)", "energy_j", "{:,.0f}"),
    ("tokens/J", "tokens_per_joule", "{:.2f}"),
    ("SLO attainment", "slo_attainment", "{:.2%}"),
    ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"),
    ("TPOT p99 (ms)", "tpot_p99_ms", "{:.1f}"),
    ("TBT p99 (ms)", "tbt_p99_ms", "{:.1f}"),
    ("E2E p99 (s)", "e2e_p99_s", "{:.1f}"),
    ("clock changes", "clock_changes", "{:,.0f}"),
    ("mean clock busy (MHz)", "mean_clock_mhz", "{:.0f}"),
)


def figure(value: Any, spec: str) -> str:
    """One table cell; a dash for unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return spec.format(value)


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, live run, baseline) rows of the summary table."""
    ours, base = summary["live"], summary["baseline"]
    return [(label, figure(ours.get(key), spec), figure(base.get(key), spec)) for label, key, spec in ROWS]


def baseline_note(summary: dict[str, Any]) -> str:
    """What the baseline is, in a sentence or two."""
    if summary["baseline_source"] == "simulated":
        return (
            "The baseline is simulated, not measured live: the `max` policy (stock clocks) in the "
            "virtual-time simulator, on the identical request list and engine setup."
        )
    note = "The baseline was measured live: a second run of the same slice with the sidecar's policy `max`."
    simulated = summary.get("simulated_baseline")
    if simulated is not None:
        note += (
            f" The simulator puts the same slice under `max` at {figure(simulated['energy_j'], '{:,.0f}')} J "
            f"(live: {figure(summary['baseline_energy_j'], '{:,.0f}')} J)."
        )
    return note


def _markdown(summary: dict[str, Any], plots: dict[str, str], title: str) -> str:
    ours, base = summary["live"], summary["baseline"]
    lines = [
        "# throttllem live demo",
        "",
        f"{title}. {summary['requests']} requests through the sidecar's gateway; "
        f"{summary['answered']} answered.",
        "",
        baseline_note(summary),
        "",
        f"| figure | {ours['policy']} ({ours['source']}) | {base['policy']} ({base['source']}) |",
        "|---|---|---|",
        *[f"| {label} | {a} | {b} |" for label, a, b in table_rows(summary)],
        "",
        f"Energy saved: {figure(summary['saved_pct'], '{:.1f}')}%. Clocks reset when the sidecar stopped: "
        f"{'yes' if summary['clock_reset_on_exit'] else 'NO'}. Decision p99 (estimated from the sidecar's "
        f"histogram buckets): {figure(ours.get('decision_p99_ms'), '{:.2f}')} ms.",
        "",
        "Live latencies are what the load generator's clients saw (HTTP and the gateway included); "
        "simulated ones are the engine's. Live energy is the twin GPU's counter from the load's start to "
        "its last answer; mean clock is over polls that found the engine busy.",
        "",
        f"![clock and power]({plots['clock_power']})",
        f"![TPOT per request]({plots['tpot_cdf']})",
        f"![token gaps]({plots['tbt_cdf']})",
        f"![energy]({plots['energy']})",
    ]
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


async def run_demo(
    config: DemoConfig, on_update: Callable[[LiveState], None], phase: PhaseReporter
) -> dict[str, Any]:
    """Plan, run live, compare with the baseline, write the report; the summary."""
    phase("planning the slice (engine capacity on the twin)")
    workload = plan_workload(config)
    phase(f"live run: {config.policy}, {len(workload.requests)} requests")
    ours_run = await live_checked(config, workload, config.policy, on_update)
    ours = live_figures(ours_run)
    records = [live_record(ours_run, ours, config)]
    phase(f"baseline: {BASELINE_POLICY}, simulated")
    simulated = simulated_baseline(config, workload)
    if config.live_baseline:
        phase(f"live baseline: {BASELINE_POLICY}")
        base_run = await live_checked(config, workload, BASELINE_POLICY, on_update)
        base = live_figures(base_run)
        records.append(live_record(base_run, base, config))
    else:
        base = simulated_figures(simulated)
        records.append(replace(simulated, label=f"{BASELINE_POLICY} (simulated)"))
    summary = compare(config, workload, ours, base)
    if config.live_baseline:  # the twin's cross-check: live stock clocks against simulated ones
        summary["simulated_baseline"] = simulated_figures(simulated)
    summary["report_dir"] = str(config.out_dir)
    summary["plots"] = write_demo_report(
        config.out_dir, summary, records, title_of(config, workload), plot_title(config, workload)
    )
    return jsonable(summary)
