"""The pool replay's report: every run against `fixed:max`, in both energy accountings, and a timeline.

Output directory: `results.json` (meta, every run's summary and scale events), `report.md` (one
table) and `timeline.png` (per run: engine size serving, mean SM clock and engine-GPU power per
sizing period, arrival rate). Plots use matplotlib's object API on the Agg canvas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from agent.bench.pool_replay import BASELINE, PoolRecord
from agent.bench.report import jsonable

COLUMNS = (
    "run",
    "energy kJ (engine GPUs)",
    "saved",
    "tok/J",
    "tok/J ×",
    "energy kJ (node)",
    "saved (node)",
    "SLO attainment",
    "TBT p99 ms",
    "E2E p99 s",
    "GPU-s held",
    "scale events",
    "mean clock MHz",
)


def versus_baseline(record: PoolRecord, baseline: PoolRecord) -> dict[str, float | None]:
    """Energy saved (%, both accountings) and the tokens/J ratios of `record` against `baseline`."""

    def saved(key: str) -> float | None:
        base, value = baseline.summary[key], record.summary[key]
        return 100.0 * (1.0 - value / base) if base else None

    def ratio(key: str) -> float | None:
        base, value = baseline.summary[key], record.summary[key]
        return value / base if base and value is not None else None

    return {
        "energy_saved_pct": saved("energy_engine_gpus_j"),
        "node_energy_saved_pct": saved("energy_node_j"),
        "tokens_per_joule_ratio": ratio("tokens_per_joule"),
        "node_tokens_per_joule_ratio": ratio("tokens_per_joule_node"),
        "slo_attainment_points": None
        if record.summary["slo_attainment"] is None or baseline.summary["slo_attainment"] is None
        else 100.0 * (record.summary["slo_attainment"] - baseline.summary["slo_attainment"]),
    }


def write_pool_report(out_dir: Path, records: Sequence[PoolRecord], meta: dict[str, Any]) -> dict[str, Any]:
    """Write results.json, report.md and timeline.png into `out_dir`; return what results.json holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = next(r for r in records if r.run.label == BASELINE)
    results = jsonable(
        {
            "meta": meta,
            "runs": [
                {
                    "run": r.run.label,
                    "mode": r.run.mode,
                    "policy": r.run.spec,
                    "length_error": r.run.length_error,
                    "start_size": r.size,
                    "summary": r.summary,
                    "versus_fixed_max": versus_baseline(r, baseline),
                    "scale_events": [
                        {"time_s": e.time_s, "action": e.action, "size": e.size, "reason": e.reason}
                        for e in r.pool.events
                    ],
                    "engines": r.pool.engines,
                }
                for r in records
            ],
            "plots": {"timeline": _save(_timeline_figure(records), out_dir / "timeline.png")},
        }
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(_markdown(results))
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of headline figures per run."""
    rows = []
    for run in results["runs"]:
        s, v = run["summary"], run["versus_fixed_max"]
        rows.append(
            (
                run["run"],
                _fmt(s["energy_engine_gpus_j"], ",.1f", 1e-3),
                _fmt(v["energy_saved_pct"], ".1f", suffix="%"),
                _fmt(s["tokens_per_joule"], ".3f"),
                _fmt(v["tokens_per_joule_ratio"], ".2f", suffix="x"),
                _fmt(s["energy_node_j"], ",.1f", 1e-3),
                _fmt(v["node_energy_saved_pct"], ".1f", suffix="%"),
                _fmt(s["slo_attainment"], ".2f", 100.0, "%"),
                _fmt(s["tbt_p99_ms"], ".0f"),
                _fmt(s["e2e_p99_s"], ".1f"),
                _fmt(s["gpu_seconds_held"], ",.0f"),
                str(s["scale_events"]),
                _fmt(s["mean_clock_mhz"], ".0f"),
            )
        )
    return rows


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "—" if value is None else f"{value * scale:{spec}}{suffix}"


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    caps = ", ".join(f"{size} {c['slo_rps']:.2f} req/s" for size, c in meta["capacities_rps"].items())
    lines = [
        f"# Pool replay: {meta['trace']}, {meta['engine']}",
        "",
        f"- sizes {meta['sizes']} on a node of {meta['knobs']['node_gpus']} GPUs; capacities (SLO): {caps}",
        f"- rate scale {meta['rate_scale']:.3f} ({_peak(meta)}): busiest minute "
        f"{meta['busiest_minute_rps']:.2f} req/s, "
        f"{meta['requests']} requests; provisioned size (fixed): tp{meta['provisioned_size']}",
        f"- SLO {meta['slo']['preset']} (p{meta['slo']['percentile']:g}); "
        f"energy saved and tok/J against {BASELINE}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in table_rows(results)),
        "",
        "![timeline](timeline.png)",
        "",
    ]
    return "\n".join(lines)


def _peak(meta: dict[str, Any]) -> str:
    if meta["peak_rate_scale"] is None:
        return "given"
    share = meta["rate_scale"] / meta["peak_rate_scale"]
    return f"{share:g} × the peak {meta['peak_rate_scale']:.3f} of fixed:max on the largest size"


def _timeline_figure(records: Sequence[PoolRecord]) -> Figure:
    fig = Figure(figsize=(11, 9), layout="constrained")
    ax_size, ax_clock, ax_power = fig.subplots(3, 1, sharex=True)
    for record in records:
        samples = record.pool.samples
        if not samples:
            continue
        t = np.array([s.time_s for s in samples])
        label = record.run.label
        ax_size.step(t, [s.serving_size for s in samples], where="post", label=label, linewidth=1.0)
        energy = np.array([s.engine_energy_j for s in samples])
        ax_power.step(t[1:], np.diff(energy) / np.diff(t), where="pre", label=label, linewidth=0.8)
        ax_clock.step(t, _period_clock(record, t), where="pre", label=label, linewidth=0.8)
    if records and records[0].pool.samples:
        samples = records[0].pool.samples
        twin = ax_size.twinx()
        twin.plot([s.time_s for s in samples], [s.arrival_rps for s in samples], color="gray", alpha=0.4)
        twin.set_ylabel("arrivals (req/s)", color="gray")
    sizes = sorted({e["size"] for r in records for e in r.pool.engines})
    if sizes:
        ax_size.set_yticks(sizes)
        ax_size.set_ylim(0, max(sizes) + 0.5)
    ax_size.set_ylabel("engine size serving (TP)")
    ax_clock.set_ylabel("mean SM clock (MHz)")
    ax_power.set_ylabel("power, engine GPUs (W)")
    ax_power.set_xlabel("time (s)")
    ax_size.set_title("Engine size, clock and power over time")
    ax_size.legend(loc="upper left", fontsize="small")
    return fig


def _period_clock(record: PoolRecord, ticks: np.ndarray) -> np.ndarray:
    """Busy-time-weighted mean SM clock of every iteration ending in each period (NaN: none)."""
    result = record.pool.result
    end = np.asarray(result.iteration_end_s)
    duration = np.asarray(result.iteration_s)
    clock = np.asarray(result.clock_mhz, dtype=float)
    bins = np.searchsorted(ticks, end)
    weight = np.bincount(bins, weights=duration, minlength=ticks.size + 1)[: ticks.size]
    total = np.bincount(bins, weights=duration * clock, minlength=ticks.size + 1)[: ticks.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, format="png", dpi=100)
    return path.name
