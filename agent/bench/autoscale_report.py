"""The sizing demo's report: summary.json, report.md and the timeline of one resize cycle.

The timeline shows, against seconds since the load began: the size serving traffic and the GPUs
the pool holds (a shadow starting and an engine draining hold theirs too), the pool's power,
and each engine's SM clock. Plots use matplotlib's object API on the Agg canvas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from agent.bench.autoscale_demo import PoolSample
from agent.bench.demo import figure
from agent.bench.report import jsonable

TIMELINE = "timeline.png"
TOKENS_PER_J = "{:.3f}"  # table-cell formats (agent.bench.demo.figure)
SHARE = "{:.2%}"


def plot_timeline(path: Path, samples: Sequence[PoolSample], summary: dict[str, Any]) -> None:
    """Size and GPUs held, power, and clocks over the run, the burst shaded."""
    figure = Figure(figsize=(9, 7), layout="constrained")
    size_ax, power_ax, clock_ax = figure.subplots(3, 1, sharex=True)
    t = [s.t_s for s in samples]
    size_ax.step(t, [s.serving or 0 for s in samples], where="post", label="TP size serving")
    size_ax.step(t, [s.gpus_held for s in samples], where="post", linestyle="--", label="GPUs held")
    size_ax.set_ylabel("TP / GPUs")
    size_ax.legend(loc="upper right")
    power_ax.plot(t, [s.power_w for s in samples], color="tab:red")
    power_ax.set_ylabel("pool power (W)")
    for size in summary["sizes"]:
        points = [(s.t_s, s.clocks_mhz[size]) for s in samples if size in s.clocks_mhz]
        if points:
            xs, ys = zip(*points, strict=True)
            clock_ax.plot(xs, ys, ".", markersize=3, label=f"tp{size}")
    clock_ax.set_ylabel("SM clock (MHz)")
    clock_ax.set_xlabel("seconds since the load began")
    clock_ax.legend(loc="lower right")
    quiet_s, burst_s, _ = summary["phases_s"]
    for ax in (size_ax, power_ax, clock_ax):
        ax.axvspan(quiet_s, quiet_s + burst_s, color="tab:orange", alpha=0.12)
    figure.suptitle(
        f"{summary['model']} on {summary['gpu']}: {summary['quiet_rps']:.2f} → {summary['burst_rps']:.2f} → "
        f"{summary['quiet_rps']:.2f} req/s (burst shaded), policy {summary['policy']}"
    )
    figure.savefig(path, dpi=110)


def write_autoscale_report(
    out_dir: Path, summary: dict[str, Any], samples: Sequence[PoolSample]
) -> dict[str, str]:
    """Write summary.json, report.md and the timeline; the plots' paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"timeline": str(out_dir / TIMELINE)}
    plot_timeline(out_dir / TIMELINE, samples, summary)
    (out_dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(summary), encoding="utf-8")
    return plots


def _markdown(summary: dict[str, Any]) -> str:
    base = summary["baseline"]
    saved = summary["saved_pct"]

    def both(name: str, key: str, spec: str) -> str:
        return f"| {name} | {figure(summary[key], spec)} | {figure(base[key], spec)} |"

    lines = [
        f"# Sizing demo: {summary['model']} on {summary['gpu']}, TP {summary['sizes']}",
        "",
        f"{summary['requests']} requests of {summary['trace']} (their lengths), paced at "
        f"{summary['quiet_rps']:.3f} → {summary['burst_rps']:.3f} → {summary['quiet_rps']:.3f} req/s for "
        f"{' / '.join(f'{s:g}' for s in summary['phases_s'])} s; capacities (req/s within "
        f"{summary['slo']}): {summary['capacities_rps']}.",
        "",
        "| figure | live pool (autoscaled) | baseline (simulated) |",
        "| --- | --- | --- |",
        f"| policy | autoscale:{summary['policy']} | {base['policy']} on tp{base['tp']} |",
        f"| energy (J) | {summary['energy_j']:.0f} | {base['energy_j']:.0f} |",
        both("tokens per joule", "tokens_per_joule", TOKENS_PER_J),
        both("SLO attainment", "slo_attainment", SHARE),
        f"| answered | {summary['answered']} of {summary['requests']} (lost {summary['lost']}) | |",
        "",
        f"Energy saved against the fixed pool: {figure(saved, '{:.1f}')}%. Clocks reset as each engine "
        f"stopped: {'yes' if summary['clocks_reset_on_exit'] else 'NO'}. From a shadow's start to "
        f"traffic moving to it: {', '.join(f'{t:.1f} s' for t in summary['decision_to_switch_s']) or '—'} "
        "(the local twins start in seconds; a real TensorRT-LLM engine takes 20 s or more).",
        "",
        "## Actions",
        "",
        "| s after the load began | action | size | reason |",
        "| --- | --- | --- | --- |",
        *(f"| {a['t_s']:.1f} | {a['action']} | tp{a['tp']} | {a['reason']} |" for a in summary["actions"]),
        "",
        f"![timeline]({TIMELINE})",
        "",
        "Energy: every engine's GPUs (shadows starting and engines draining included) from the first "
        "request to the last answer, as the twins counted it. The baseline is simulated on the same "
        "requests in the virtual-time pool, not measured live.",
        "",
    ]
    return "\n".join(lines)
