"""The replay report: clock policies run on the same arrivals, side by side.

Runs are grouped by (trace, load, length error); within a group every figure is compared with the
`max` policy (stock clocks, the baseline). A run without a length error (a policy that never
predicts lengths, like `max` or `static`) belongs to every length-error group of its trace and
load, so one `max` run serves as the baseline for all of them.

Output directory: `results.json` (meta and every run's summary, no per-iteration arrays),
`report.md` (one table per group) and three PNGs per group. Plots use matplotlib's object API on
the Agg canvas, so no display or global pyplot state is involved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

BASELINE = "max"
PEAK = "peak"  # loads as fractions of the highest rate at which `max` meets the SLO
CAPACITY = "capacity"  # loads as fractions of a saturated `max` engine's completion rate
LOAD_BASES = {PEAK: "of peak", CAPACITY: "of capacity"}
MAX_PLOT_POINTS = 5000
_DASH = "—"
_COLUMNS = (
    "policy",
    "energy kJ",
    "saved vs max",
    "tok/J",
    "tok/J vs max",
    "SLO attainment",
    "share of saving",
    "vs hindsight",
    "TTFT p50 / p99 s",
    "TBT p50 / p99 ms",
    "E2E p50 / p99 s",
    "mean clock MHz",
    "clock switches",
)


@dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise equality ambiguous
class RunRecord:
    """One policy's run at one (trace, load, length error) setting, as the report needs it."""

    policy: str
    trace: str
    load: float | None  # arrival rate as a fraction of `load_basis`; None: the trace's own rate
    length_error: float | None  # p95 length-prediction error in %; None: the policy predicts no lengths
    summary: dict[str, Any]  # SimulationResult.summary() plus "slo_attainment" (0..1)
    time_s: np.ndarray  # per iteration: end time
    clock_mhz: np.ndarray  # per iteration: SM clock
    power_w: np.ndarray  # per iteration: power of all the engine's GPUs
    tbt_s: np.ndarray  # token gaps
    tbt_weight: np.ndarray  # how many tokens had each gap
    tbt_target_s: float  # the TPOT/TBT target drawn on the CDF
    label: str = ""  # the name in legends and bars; empty: the policy
    load_basis: str = PEAK  # what `load` is a fraction of: PEAK or CAPACITY

    @property
    def name(self) -> str:
        """How plots call this run."""
        return self.label or self.policy

    def __post_init__(self) -> None:
        for name in ("time_s", "clock_mhz", "power_w", "tbt_s", "tbt_weight"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float).ravel())
        if not self.time_s.size == self.clock_mhz.size == self.power_w.size:
            raise ValueError(
                f"run {self.policy!r}: time_s, clock_mhz and power_w differ in length "
                f"({self.time_s.size}, {self.clock_mhz.size}, {self.power_w.size})"
            )
        if self.tbt_s.size != self.tbt_weight.size:
            raise ValueError(
                f"run {self.policy!r}: tbt_s and tbt_weight differ in length "
                f"({self.tbt_s.size}, {self.tbt_weight.size})"
            )


@dataclass(frozen=True)
class _Group:
    trace: str
    load: float | None
    load_basis: str
    length_error: float | None
    label: str  # file-name safe and unique within a report
    runs: tuple[RunRecord, ...]  # the baseline first
    title: str | None = None  # what the plots say the runs are; None: trace, load and length error


def write_report(out_dir: Path, runs: Sequence[RunRecord], meta: dict[str, Any]) -> dict[str, Any]:
    """Write results.json, report.md and the plots into `out_dir`; return what results.json holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _groups(runs)
    results: dict[str, Any] = {
        "meta": meta,
        "runs": [
            {
                "policy": run.policy,
                "trace": run.trace,
                "load": run.load,
                "load_basis": run.load_basis,
                "length_error": run.length_error,
                "tbt_target_s": run.tbt_target_s,
                "summary": run.summary,
            }
            for run in runs
        ],
        "groups": [],
    }
    for group in groups:
        plots = _save_plots(group, out_dir)
        results["groups"].append(
            {
                "label": group.label,
                "trace": group.trace,
                "load": group.load,
                "load_basis": group.load_basis,
                "length_error": group.length_error,
                "policies": [run.policy for run in group.runs],
                "versus_max": {
                    run.policy: {"energy_saved_pct": saved, "tokens_per_joule_ratio": ratio}
                    for run, (saved, ratio) in zip(group.runs, _versus_max(group), strict=True)
                },
                "plots": plots,
            }
        )
    results = jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(_markdown(groups, results["meta"]))
    return results


def write_plots(out_dir: Path, runs: Sequence[RunRecord], label: str, title: str) -> dict[str, str]:
    """The replay's three plots for one comparison made elsewhere (the `max` run first, if any).

    `label` goes into the file names, `title` into the plot titles; returns the file names.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = tuple(sorted(runs, key=lambda run: run.policy != BASELINE))
    return _save_plots(_Group(ordered[0].trace, None, PEAK, None, label, ordered, title), out_dir)


def _save_plots(group: _Group, out_dir: Path) -> dict[str, str]:
    return {
        "clock_power": _save(_clock_power_figure(group), out_dir / f"clock_power_{group.label}.png"),
        "tbt_cdf": _save(_tbt_cdf_figure(group), out_dir / f"tbt_cdf_{group.label}.png"),
        "energy": _save(_energy_figure(group), out_dir / f"energy_{group.label}.png"),
    }


def _groups(runs: Sequence[RunRecord]) -> list[_Group]:
    """Group by (trace, load, load basis, length error), in order of first appearance, baseline first."""
    settings: dict[tuple[str, float | None, str], list[float | None]] = {}
    for run in runs:
        errors = settings.setdefault((run.trace, run.load, run.load_basis), [])
        if run.length_error is not None and run.length_error not in errors:
            errors.append(run.length_error)
    groups: list[_Group] = []
    labels: set[str] = set()
    for (trace, load, basis), errors in settings.items():
        for error in errors or [None]:
            members = [
                run
                for run in runs
                if (run.trace, run.load, run.load_basis) == (trace, load, basis)
                and run.length_error in (None, error)
            ]
            policies = [run.policy for run in members]
            repeated = sorted({p for p in policies if policies.count(p) > 1})
            if repeated:
                raise ValueError(
                    f"policies {repeated} appear more than once for trace {trace!r}, load {load}, "
                    f"length error {error}"
                )
            members.sort(key=lambda run: run.policy != BASELINE)
            label = _unique(_label(trace, load, basis, error), labels)
            groups.append(_Group(trace, load, basis, error, label, tuple(members)))
    return groups


def _label(trace: str, load: float | None, basis: str, error: float | None) -> str:
    parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", Path(trace).name or trace).strip("-") or "trace"]
    if load is not None:
        parts.append(f"load{load:g}" if basis == PEAK else f"util{load:g}")
    if error is not None:
        parts.append(f"err{error:g}")
    return "_".join(parts)


def _unique(label: str, taken: set[str]) -> str:
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _value(summary: dict[str, Any], key: str) -> float | None:
    """A summary figure as a float; None when missing, None or NaN."""
    value = summary.get(key)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _versus_max(group: _Group) -> list[tuple[float | None, float | None]]:
    """Per run: energy saved vs the baseline (%) and tokens/J as a multiple of the baseline's."""
    base = group.runs[0].summary if group.runs[0].policy == BASELINE else {}
    base_energy, base_tpj = _value(base, "energy_j"), _value(base, "tokens_per_joule")
    rows = []
    for run in group.runs:
        energy, tpj = _value(run.summary, "energy_j"), _value(run.summary, "tokens_per_joule")
        saved = 100.0 * (1.0 - energy / base_energy) if energy is not None and base_energy else None
        ratio = tpj / base_tpj if tpj is not None and base_tpj else None
        rows.append((saved, ratio))
    return rows


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return _DASH if value is None else format(value * scale, spec)


def _pair(summary: dict[str, Any], low: str, high: str, spec: str) -> str:
    return f"{_fmt(_value(summary, low), spec)} / {_fmt(_value(summary, high), spec)}"


def _table_row(run: RunRecord, saved: float | None, ratio: float | None) -> tuple[str, ...]:
    s = run.summary
    switches = _value(s, "clock_changes")
    return (
        run.policy,
        _fmt(_value(s, "energy_j"), ",.1f", 1e-3),
        _fmt(saved, ".1f") + ("%" if saved is not None else ""),
        _fmt(_value(s, "tokens_per_joule"), ".2f"),
        _fmt(ratio, ".2f") + ("×" if ratio is not None else ""),
        _fmt(_value(s, "slo_attainment"), ".2%"),
        _fmt(_value(s, "saving_share"), ".0%"),
        _fmt(_value(s, "gap_to_hindsight_pct"), "+.1f")
        + ("%" if _value(s, "gap_to_hindsight_pct") is not None else ""),
        _pair(s, "ttft_p50_s", "ttft_p99_s", ".2f"),
        _pair(s, "tbt_p50_ms", "tbt_p99_ms", ".1f"),
        _pair(s, "e2e_p50_s", "e2e_p99_s", ".1f"),
        _fmt(_value(s, "mean_clock_mhz"), ".0f"),
        _fmt(switches, ".0f"),
    )


def _limits_line(group: _Group) -> str:
    """The group's energy bound and hindsight reference, when the replay computed them."""
    s = group.runs[0].summary
    bound, hindsight = _value(s, "energy_bound_j"), _value(s, "hindsight_energy_j")
    if bound is None or hindsight is None:
        return ""
    feasible = "" if s.get("hindsight_feasible") else " (its replay missed a deadline)"
    return (
        f"Lower bound {bound / 1000:,.1f} kJ · hindsight reference {hindsight / 1000:,.1f} kJ{feasible} "
        f"(its LP optimum {_fmt(_value(s, 'hindsight_lp_energy_j'), ',.1f', 1e-3)} kJ)"
    )


def _heading(group: _Group) -> str:
    if group.title is not None:
        return group.title
    load = "native rate" if group.load is None else f"load {group.load:.0%} {LOAD_BASES[group.load_basis]}"
    error = "" if group.length_error is None else f" · length error {group.length_error:g}%"
    return f"{group.trace} · {load}{error}"


def _markdown(groups: list[_Group], meta: dict[str, Any]) -> str:
    lines = ["# Replay report", ""]
    lines += [
        f"- {key}: {value if isinstance(value, str) else json.dumps(value)}" for key, value in meta.items()
    ]
    lines += [
        "",
        f"Saved and tok/J are relative to `{BASELINE}` (stock clocks) in the same table. SLO attainment is "
        "the share of requests that met every target of the SLO preset. Share of saving is "
        f"(E_{BASELINE} - E) / (E_{BASELINE} - E_bound), E_bound the least energy any schedule meeting every "
        "deadline needs (`agent.sim.energy_bound`); vs hindsight compares E with the best clocks for "
        f"`{BASELINE}`'s own batching, chosen knowing every request (`agent.sim.hindsight`).",
    ]
    for group in groups:
        lines += ["", f"## {_heading(group)}", ""]
        limits = _limits_line(group)
        if limits:
            lines += [limits, ""]
        lines.append("| " + " | ".join(_COLUMNS) + " |")
        lines.append("|" + "---|" * len(_COLUMNS))
        for run, (saved, ratio) in zip(group.runs, _versus_max(group), strict=True):
            lines.append("| " + " | ".join(_table_row(run, saved, ratio)) + " |")
        if group.runs[0].policy != BASELINE:
            lines += ["", f"No `{BASELINE}` run in this group: nothing to compare with."]
        lines += [
            "",
            f"![clock and power](clock_power_{group.label}.png)",
            f"![token gaps](tbt_cdf_{group.label}.png)",
            f"![energy](energy_{group.label}.png)",
        ]
    return "\n".join(lines) + "\n"


def thin_indices(n: int, limit: int = MAX_PLOT_POINTS) -> np.ndarray:
    """At most `limit` evenly spread indices into `n` points, first and last included."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def weighted_cdf(
    values: np.ndarray, weights: np.ndarray, limit: int = MAX_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the share of weight at or below each (NaN and weightless values dropped)."""
    keep = np.isfinite(values) & np.isfinite(weights) & (weights > 0)
    v, w = values[keep], weights[keep]
    if v.size == 0:
        return v, v
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    idx = thin_indices(v.size, limit)
    return v[order][idx], cum[idx] / cum[-1]


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _clock_power_figure(group: _Group) -> Figure:
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax_clock, ax_power = fig.subplots(2, 1, sharex=True)
    drawn = False
    for run in group.runs:
        idx = thin_indices(run.time_s.size)
        if idx.size == 0:
            continue
        ax_clock.step(run.time_s[idx], run.clock_mhz[idx], where="post", label=run.name, linewidth=0.8)
        ax_power.plot(run.time_s[idx], run.power_w[idx], label=run.name, linewidth=0.6)
        drawn = True
    ax_clock.set_ylabel("SM clock (MHz)")
    ax_power.set_ylabel("engine power, all GPUs (W)")
    ax_power.set_xlabel("time (s)")
    ax_clock.set_title(f"Clock and power — {_heading(group)}")
    if drawn:
        ax_clock.legend(loc="best", fontsize="small")
    else:
        _no_data(ax_clock)
        _no_data(ax_power)
    return fig


def _tbt_cdf_figure(group: _Group) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    lows = []
    for run in group.runs:
        x, y = weighted_cdf(run.tbt_s, run.tbt_weight)
        if x.size:
            ax.step(x * 1e3, y, where="post", label=run.name, linewidth=1.0)
            lows.append(float(x[0]))
    targets = sorted(
        {r.tbt_target_s for r in group.runs if math.isfinite(r.tbt_target_s) and r.tbt_target_s > 0}
    )
    for target in targets:
        ax.axvline(
            target * 1e3, color="black", linestyle="--", linewidth=1.0, label=f"target {target * 1e3:g} ms"
        )
    if lows and min(lows) > 0:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("time between tokens (ms)")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"Token gaps — {_heading(group)}")
    if lows or targets:
        ax.legend(loc="lower right", fontsize="small")
    if not lows:
        _no_data(ax)
    return fig


def _energy_figure(group: _Group) -> Figure:
    fig = Figure(figsize=(max(5.0, 1.2 * len(group.runs) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    names = [run.name for run in group.runs]
    energy_kj = [(_value(run.summary, "energy_j") or math.nan) / 1e3 for run in group.runs]
    colors = ["tab:gray" if run.policy == BASELINE else "tab:blue" for run in group.runs]
    ax.bar(range(len(names)), energy_kj, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    for i, (height, (saved, _)) in enumerate(zip(energy_kj, _versus_max(group), strict=True)):
        if math.isfinite(height):
            change = "" if saved is None or group.runs[i].policy == BASELINE else f"\n{-saved:+.1f}%"
            ax.annotate(f"{height:,.1f}{change}", (i, height), ha="center", va="bottom", fontsize="small")
    ax.set_ylabel("energy (kJ)")
    ax.set_title(f"Energy — {_heading(group)}")
    if not any(math.isfinite(h) for h in energy_kj):
        _no_data(ax)
    return fig


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, format="png", dpi=100)
    return path.name


def jsonable(value: Any) -> Any:
    """Plain JSON types: NaN and infinities become null, numpy scalars and arrays become Python."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)
