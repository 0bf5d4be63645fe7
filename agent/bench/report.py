"""The replay report: clock policies run on the same arrivals, side by side.

Runs are grouped by (trace, load, length error); within a group every figure is compared with the
`max` policy (stock clocks, the baseline). A run without a length error (a policy that never
predicts lengths, like `max` or `static`) belongs to every length-error group of its trace and
load, so one `max` run serves as the baseline for all of them.

Output directory: `results.json` (meta and every run's summary, no per-iteration arrays),
`report.md` (one table per group) and four PNGs per group; `agent.bench.html_report` renders the
same `Report` as one self-contained HTML page. Plots use matplotlib's object API on the Agg
canvas, so no display or global pyplot state is involved.

The SLO's TPOT target is on each request's mean time per output token, not on single token
gaps: one plot shows per-request TPOT against that target, another every token gap, with no
target drawn over the gaps.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

BASELINE = "max"
PEAK = "peak"  # loads as fractions of the highest rate at which `max` meets the SLO
CAPACITY = "capacity"  # loads as fractions of a saturated `max` engine's completion rate
LOAD_BASES = {PEAK: "of peak", CAPACITY: "of capacity"}
MAX_PLOT_POINTS = 5000
TITLE = "Replay report"
PLOTS = (  # (kind, alt text): every group's figures, in the order the reports show them
    ("clock_power", "clock and power"),
    ("tpot_cdf", "TPOT per request"),
    ("tbt_cdf", "token gaps"),
    ("energy", "energy"),
)
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
    "TPOT p50 / p99 ms",
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
    tpot_s: np.ndarray  # per finished request: mean time per output token after the first (NaN: 1 token)
    tpot_target_s: float  # the SLO's TPOT target, on each request's mean (not on single gaps)
    label: str = ""  # the name in legends and bars; empty: the policy
    load_basis: str = PEAK  # what `load` is a fraction of: PEAK or CAPACITY
    # (start, end) seconds the engine sat idle with stock clocks: the clock shown there is the
    # GPU's own idle clock, not a lock. Empty where not observed (the simulator records busy time only).
    stock_idle_spans_s: tuple[tuple[float, float], ...] = ()

    @property
    def name(self) -> str:
        """How plots call this run."""
        return self.label or self.policy

    def __post_init__(self) -> None:
        for name in ("time_s", "clock_mhz", "power_w", "tbt_s", "tbt_weight", "tpot_s"):
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
        bad = [
            span
            for span in self.stock_idle_spans_s
            if not (math.isfinite(span[1] - span[0]) and span[0] <= span[1])
        ]
        if bad:
            raise ValueError(
                f"run {self.policy!r}: idle spans must be finite (start, end >= start), got {bad}"
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


@dataclass(frozen=True, slots=True)
class Plot:
    """One figure, rendered once: the PNG that report.md links and report.html embeds."""

    kind: str  # one of PLOTS
    alt: str  # what the picture shows, in a few words
    file_name: str
    png: bytes


@dataclass(frozen=True, slots=True)
class Section:
    """One group of the report: its heading, notes, table and plots.

    Text is plain, with `code` spans: the one markup both the markdown and the HTML rendering know.
    """

    label: str  # file-name and anchor safe, unique within the report
    heading: str
    notes: tuple[str, ...]  # paragraphs before the table
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]  # formatted cells, one tuple per run
    remarks: tuple[str, ...]  # paragraphs after the table
    plots: tuple[Plot, ...]


@dataclass(frozen=True, slots=True)
class Report:
    """A replay report's content, formatted once for every way of writing it out."""

    title: str
    meta: tuple[tuple[str, str], ...]  # (key, value as text)
    intro: str
    sections: tuple[Section, ...]
    results: dict[str, Any]  # what results.json holds


def build_report(runs: Sequence[RunRecord], meta: dict[str, Any]) -> Report:
    """Group the runs, format the tables and render the plots; nothing is written."""
    groups = _groups(runs)
    sections = tuple(_section(group) for group in groups)
    results: dict[str, Any] = {
        "meta": meta,
        "runs": [
            {
                "policy": run.policy,
                "trace": run.trace,
                "load": run.load,
                "load_basis": run.load_basis,
                "length_error": run.length_error,
                "tpot_target_s": run.tpot_target_s,
                "summary": run.summary,
            }
            for run in runs
        ],
        "groups": [
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
                "plots": {plot.kind: plot.file_name for plot in section.plots},
            }
            for group, section in zip(groups, sections, strict=True)
        ],
    }
    results = jsonable(results)
    meta_lines = tuple(
        (key, value if isinstance(value, str) else json.dumps(value))
        for key, value in results["meta"].items()
    )
    return Report(TITLE, meta_lines, _INTRO, sections, results)


def write_report(out_dir: Path, runs: Sequence[RunRecord], meta: dict[str, Any]) -> Report:
    """Write results.json, report.md and the plots into `out_dir`; return the report."""
    report = build_report(runs, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    for section in report.sections:
        _write_plots(section.plots, out_dir)
    (out_dir / "results.json").write_text(json.dumps(report.results, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    return report


def comparison_figures(runs: Sequence[RunRecord], title: str) -> dict[str, Figure]:
    """The replay's figures, by kind, for one comparison made elsewhere (the `max` run first, if any)."""
    return _figures(_comparison(runs, "", title))


def write_plots(out_dir: Path, runs: Sequence[RunRecord], label: str, title: str) -> dict[str, str]:
    """The replay's plots for one comparison made elsewhere (the `max` run first, if any).

    `label` goes into the file names, `title` into the plot titles; returns the file names by kind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(_comparison(runs, label, title))
    _write_plots(plots, out_dir)
    return {plot.kind: plot.file_name for plot in plots}


def _comparison(runs: Sequence[RunRecord], label: str, title: str) -> _Group:
    ordered = tuple(sorted(runs, key=lambda run: run.policy != BASELINE))
    return _Group(ordered[0].trace, None, PEAK, None, label, ordered, title)


def _figures(group: _Group) -> dict[str, Figure]:
    return {
        "clock_power": _clock_power_figure(group),
        "tpot_cdf": _tpot_cdf_figure(group),
        "tbt_cdf": _tbt_cdf_figure(group),
        "energy": _energy_figure(group),
    }


def _plots(group: _Group) -> tuple[Plot, ...]:
    figures = _figures(group)
    return tuple(Plot(kind, alt, f"{kind}_{group.label}.png", _png(figures[kind])) for kind, alt in PLOTS)


def _write_plots(plots: Sequence[Plot], out_dir: Path) -> None:
    for plot in plots:
        (out_dir / plot.file_name).write_bytes(plot.png)


def _section(group: _Group) -> Section:
    limits = _limits_line(group)
    no_baseline = (
        (f"No `{BASELINE}` run in this group: nothing to compare with.",)
        if group.runs[0].policy != BASELINE
        else ()
    )
    return Section(
        label=group.label,
        heading=_heading(group),
        notes=(limits,) if limits else (),
        columns=_COLUMNS,
        rows=tuple(
            _table_row(run, saved, ratio)
            for run, (saved, ratio) in zip(group.runs, _versus_max(group), strict=True)
        ),
        remarks=no_baseline,
        plots=_plots(group),
    )


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
        _pair(s, "tpot_p50_ms", "tpot_p99_ms", ".1f"),
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


_INTRO = (
    f"Saved and tok/J are relative to `{BASELINE}` (stock clocks) in the same table. SLO attainment is "
    "the share of requests that met every target of the SLO preset. TPOT is a request's mean time per "
    "output token after the first, the figure the TPOT target bounds; TBT is every single token gap, "
    "which the SLO does not bound one by one. Share of saving is "
    f"(E_{BASELINE} - E) / (E_{BASELINE} - E_bound), E_bound the least energy any schedule meeting every "
    "deadline needs (`agent.sim.energy_bound`); vs hindsight compares E with the best clocks for "
    f"`{BASELINE}`'s own batching, chosen knowing every request (`agent.sim.hindsight`)."
)


def markdown(report: Report) -> str:
    """report.md: the report's text, one table per section, the plots linked by file name."""
    lines = [f"# {report.title}", ""]
    lines += [f"- {key}: {value}" for key, value in report.meta]
    lines += ["", report.intro]
    for section in report.sections:
        lines += ["", f"## {section.heading}", ""]
        for note in section.notes:
            lines += [note, ""]
        lines.append("| " + " | ".join(section.columns) + " |")
        lines.append("|" + "---|" * len(section.columns))
        lines += ["| " + " | ".join(row) + " |" for row in section.rows]
        for remark in section.remarks:
            lines += ["", remark]
        lines.append("")
        lines += [f"![{plot.alt}]({plot.file_name})" for plot in section.plots]
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
        (line,) = ax_clock.step(
            run.time_s[idx], run.clock_mhz[idx], where="post", label=run.name, linewidth=0.8
        )
        ax_power.plot(run.time_s[idx], run.power_w[idx], label=run.name, linewidth=0.6)
        _shade_stock_idle(ax_clock, run, line.get_color())
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


def _shade_stock_idle(ax: Any, run: RunRecord, color: str) -> None:
    """Shade where the engine sat idle unlocked: the low clock there is the GPU idling, not a lock."""
    for i, (start, end) in enumerate(run.stock_idle_spans_s):
        label = f"{run.name}: idle, stock clocks (the GPU's idle clock, no lock)" if i == 0 else None
        ax.axvspan(start, end, color=color, alpha=0.15, linewidth=0, label=label)
    if run.stock_idle_spans_s and run.time_s.size and run.stock_idle_spans_s[0][0] <= run.time_s[0]:
        start, end = run.stock_idle_spans_s[0]
        ax.annotate(
            "idle: no request yet",
            xy=((start + end) / 2, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(12, 30),
            textcoords="offset points",
            fontsize="small",
            arrowprops={"arrowstyle": "->", "linewidth": 0.6},
        )


def _log_x(ax: Any) -> None:
    """A log x axis labelled in plain numbers (20, 30, ... within a decade; 10, 100, ... across many)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def tpot_attainment(run: RunRecord) -> float | None:
    """Share of the run's requests with a TPOT (finished, at least 2 tokens) within its TPOT target."""
    tpot = run.tpot_s[np.isfinite(run.tpot_s)]
    if tpot.size == 0 or not (math.isfinite(run.tpot_target_s) and run.tpot_target_s > 0):
        return None
    return float(np.mean(tpot <= run.tpot_target_s))


def _tpot_cdf_figure(group: _Group) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    lows = []
    for run in group.runs:
        x, y = weighted_cdf(run.tpot_s, np.ones_like(run.tpot_s))
        if x.size:
            share = tpot_attainment(run)
            within = "" if share is None else f": {share:.1%} within target"
            ax.step(x * 1e3, y, where="post", label=f"{run.name}{within}", linewidth=1.0)
            lows.append(float(x[0]))
    targets = sorted(
        {r.tpot_target_s for r in group.runs if math.isfinite(r.tpot_target_s) and r.tpot_target_s > 0}
    )
    for target in targets:
        ax.axvline(
            target * 1e3,
            color="black",
            linestyle="--",
            linewidth=1.0,
            label=f"TPOT target {target * 1e3:g} ms",
        )
    if lows and min(lows) > 0:
        _log_x(ax)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("TPOT: a request's mean time per output token after the first (ms)")
    ax.set_ylabel("share of requests (finished, ≥ 2 tokens)")
    ax.set_title(f"TPOT per request — {_heading(group)}")
    if lows or targets:
        ax.legend(loc="lower right", fontsize="small")
    if not lows:
        _no_data(ax)
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
    if lows and min(lows) > 0:
        _log_x(ax)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("time between consecutive tokens of a request (ms)")
    ax.set_ylabel("share of token gaps")
    ax.set_title(f"Token gaps — {_heading(group)}")
    if lows:
        ax.legend(loc="lower right", fontsize="small")
        ax.text(  # mid-right: the curves are near 0 or 1 there, the legend below
            0.97,
            0.55,
            "No per-gap target: the TPOT target bounds each\nrequest's mean gap (see the TPOT plot)",
            transform=ax.transAxes,
            ha="right",
            va="center",
            fontsize="small",
        )
    else:
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


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


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
