"""`demo`: the twin, the sidecar and a load generator as real processes, watched live, then compared."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.bench import demo_plan as defaults
from agent.bench.processes import ENGINE_LOAD_APIS
from agent.cli.common import (
    CliError,
    add_setup_args,
    print_json,
    print_table,
    setup_from_args,
    stderr,
    stdout,
)
from agent.config import Settings
from agent.coordinator.settings import parse_sizes
from agent.slo_presets import load_slo_preset

if TYPE_CHECKING:
    from agent.bench.autoscale_demo import AutoscaleState
    from agent.bench.live_run import LiveState, Sample

REFRESH_PER_S = 2.0
AUTOSCALE_ENGINE = ("a100-sxm4-40gb", "llama2-13b")  # IPS models and capacity profiles at TP 1, 2 and 4
DEFAULT_OUT = Path("demo-report")
DEFAULT_AUTOSCALE_OUT = Path("demo-autoscale-report")


def _value(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{spec.format(value)}{unit}"


def _against(value_s: float | None, target_s: float | None, scale: float, spec: str, unit: str) -> Text:
    """A latency so far next to its target, green while within it."""
    if value_s is None:
        return Text("—")
    shown = f"{spec.format(value_s * scale)} {unit}"
    if target_s is None:
        return Text(shown)
    ok = value_s <= target_s
    return Text(f"{shown}  (target {spec.format(target_s * scale)} {unit})", style="green" if ok else "red")


def render(state: LiveState) -> Table:
    """The live view: one row per figure, refreshed from the latest poll and the clients' events."""
    latest = state.latest
    table = Table(title=f"throttllem live demo · policy {state.policy}", show_header=False, min_width=64)
    table.add_column("figure", style="bold")
    table.add_column("value")
    for name, value in _rows(state, latest):
        table.add_row(name, value)
    return table


def _rows(state: LiveState, latest: Sample | None) -> list[tuple[str, str | Text]]:
    tbt = state.percentile(state.all_gaps_s(), 99)
    tpot = state.percentile(state.tpot_s, 99)
    ttft = state.percentile(state.ttft_s, 99)
    rows: list[tuple[str, str | Text]] = [
        ("time", f"{state.since_start_s():.1f} s"),
        ("requests done", f"{state.done:,} / {state.total:,} (answered {state.answered:,})"),
        ("TBT p99 so far", _against(tbt, None, 1e3, "{:.0f}", "ms (every token gap; the target is on TPOT)")),
        ("TPOT p99 so far", _against(tpot, state.tpot_target_s, 1e3, "{:.0f}", "ms")),
        ("TTFT p99 so far", _against(ttft, state.ttft_target_s, 1.0, "{:.2f}", "s")),
        ("energy so far", _value(state.energy_so_far_j(), "{:,.0f}", " J")),
    ]
    if latest is None:
        return rows
    lock = "" if latest.locked is None else (" (locked)" if latest.locked else " (stock)")
    kv = "—"
    if latest.kv_used_blocks is not None and latest.kv_max_blocks:
        share = latest.kv_used_blocks / latest.kv_max_blocks
        kv = f"{latest.kv_used_blocks:,.0f} / {latest.kv_max_blocks:,.0f} blocks ({share:.1%})"
    decision = None if latest.decision_p99_s is None else latest.decision_p99_s * 1e3
    return [
        *rows[:2],
        ("SM clock", _value(latest.clock_mhz, "{:.0f}", " MHz") + lock),
        ("power", _value(latest.power_w, "{:.0f}", " W")),
        ("batch", _value(latest.batch, "{:.0f}")),
        ("KV cache", kv),
        ("held by the gateway", _value(latest.held, "{:.0f}")),
        *rows[2:],
        ("control loop", latest.loop_mode or "—"),
        ("decision p99", _value(decision, "{:.2f}", " ms (from histogram buckets)")),
    ]


def render_pool(state: AutoscaleState) -> Table:
    """The sizing demo's live view: the pool's sizes, each engine's clock and power, the clients."""
    table = Table(title=f"throttllem sizing demo · policy {state.policy}", show_header=False, min_width=64)
    table.add_column("figure", style="bold")
    table.add_column("value")
    draining = ", ".join(f"tp{s}" for s in state.draining) or "—"
    rows: list[tuple[str, str]] = [
        ("time", f"{state.since_start_s():.1f} s"),
        ("requests done", f"{state.done:,} / {state.total:,} (answered {state.answered:,})"),
        ("arrival rate", _value(state.arrival_rps, "{:.2f}", " req/s (last period)")),
        ("serving", "—" if state.serving is None else f"tp{state.serving}"),
        ("shadow starting", "—" if state.shadow is None else f"tp{state.shadow}"),
        ("draining", draining),
        ("last decision", state.last_reason or "—"),
    ]
    for reading in state.live():
        lock = "" if reading.locked is None else (" (locked)" if reading.locked else " (stock)")
        rows.append(
            (
                f"tp{reading.size} engine",
                f"{_value(reading.clock_mhz, '{:.0f}', ' MHz')}{lock} · "
                f"{_value(reading.power_w, '{:.0f}', ' W')}",
            )
        )
    rows += [("pool power", f"{state.power_w():,.0f} W"), ("energy so far", f"{state.energy_j():,.0f} J")]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_pool_summary(summary: dict[str, Any]) -> None:
    """The sizing demo's comparison and what it did."""
    from agent.bench.autoscale_report import SHARE, TOKENS_PER_J
    from agent.bench.demo import figure

    base = summary["baseline"]
    print_table(
        f"{summary['model']} on {summary['gpu']}, TP {summary['sizes']}: {summary['requests']} requests of "
        f"{summary['trace']} at {summary['quiet_rps']:.2f} → {summary['burst_rps']:.2f} → "
        f"{summary['quiet_rps']:.2f} req/s",
        (
            "figure",
            f"autoscale:{summary['policy']} (live)",
            f"{base['policy']} on tp{base['tp']} (simulated)",
        ),
        [
            ("energy (J)", f"{summary['energy_j']:,.0f}", f"{base['energy_j']:,.0f}"),
            (
                "tokens per joule",
                figure(summary["tokens_per_joule"], TOKENS_PER_J),
                figure(base["tokens_per_joule"], TOKENS_PER_J),
            ),
            (
                "SLO attainment",
                figure(summary["slo_attainment"], SHARE),
                figure(base["slo_attainment"], SHARE),
            ),
            ("answered", f"{summary['answered']} of {summary['requests']}", "—"),
        ],
    )
    console = stdout()
    moves = " → ".join(f"tp{a['tp']}" for a in summary["actions"] if a["action"] == "route")
    console.print(
        f"Traffic moved {moves or 'nowhere'}; from a shadow's start to the switch: "
        f"{', '.join(f'{t:.1f} s' for t in summary['decision_to_switch_s']) or '—'}; requests lost: "
        f"{summary['lost']}; clocks reset as engines stopped: "
        f"{'yes' if summary['clocks_reset_on_exit'] else '[red]NO[/red]'}"
    )
    console.print(
        f"Energy saved vs the fixed pool: {figure(summary['saved_pct'], '{:.1f}')}% "
        "(the baseline is simulated on the same requests)"
    )
    console.print(f"Report: {summary['report_dir']}/report.md (summary.json, timeline.png, logs/)")


def print_summary(summary: dict[str, Any]) -> None:
    """The comparison table and what it means."""
    from agent.bench.demo import baseline_note, figure, table_rows

    ours, base = summary["live"], summary["baseline"]
    print_table(
        f"{summary['trace']} from {summary['window_start_s']:g} s, {summary['window_s']:.0f} s of trace "
        f"(×{summary['rate_scale']:.2f}, {summary['load']:.0%} of capacity) on {summary['gpu']} / "
        f"{summary['model']} / TP{summary['tp']} served as {summary['engine']}",
        ("figure", f"{ours['policy']} ({ours['source']})", f"{base['policy']} ({base['source']})"),
        table_rows(summary),
    )
    console = stdout()
    console.print(
        f"Energy saved vs stock clocks: {figure(summary['saved_pct'], '{:.1f}')}% · clocks reset when the "
        f"sidecar stopped: {'yes' if summary['clock_reset_on_exit'] else '[red]NO[/red]'}"
    )
    console.print(baseline_note(summary))
    console.print(f"Report: {summary['report_dir']}/report.md (summary.json, plots, process logs in logs/)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the live demo and print (or `--json`) the comparison."""
    from agent.bench.demo import run_demo  # matplotlib: slow to import

    engine = AUTOSCALE_ENGINE if args.autoscale else args.default_engine
    args.gpu, args.model = args.gpu or engine[0], args.model or engine[1]
    args.out = args.out or (DEFAULT_AUTOSCALE_OUT if args.autoscale else DEFAULT_OUT)
    if args.autoscale:
        return _autoscale(args)
    setup = setup_from_args(args)
    config = defaults.DemoConfig(
        setup=setup,
        preset=load_slo_preset(args.slo, setup.model.name),
        out_dir=args.out,
        models_dir=args.models_dir,
        policy=args.policy,
        engine=args.engine,
        start_s=args.start,
        duration_s=args.wall_s,
        load=args.load,
        max_tokens=args.max_tokens,
        live_baseline=args.live_baseline,
        refresh_s=1.0 / REFRESH_PER_S,
    )
    return _run_and_print(
        args,
        lambda update, phase: run_demo(config, update, phase),
        render,
        print_summary,
        "the twin, the sidecar and the load generator were stopped",
    )


def _run_and_print(
    args: argparse.Namespace,
    demo: Callable[[Callable[[Any], None], Callable[[str], None]], Awaitable[dict[str, Any]]],
    view: Callable[[Any], Table],
    print_result: Callable[[dict[str, Any]], None],
    stopped: str,
) -> int:
    """Run a demo under the live view (or quietly for --json), then print its summary."""
    from agent.bench.autoscale_demo import AutoscaleDemoError
    from agent.bench.live_run import LiveRunError
    from agent.bench.processes import ProcessStartError, cancel_on_sigterm

    try:
        if args.json:
            summary = asyncio.run(cancel_on_sigterm(demo(lambda _state: None, lambda _phase: None)))
        else:
            summary = _run_with_view(lambda update, phase: cancel_on_sigterm(demo(update, phase)), view)
    except (ProcessStartError, LiveRunError, AutoscaleDemoError) as exc:
        raise CliError(str(exc)) from None
    except asyncio.CancelledError:
        raise CliError(f"terminated: {stopped}") from None
    if args.json:
        print_json(summary)
    else:
        print_result(summary)
    return 0


def _autoscale(args: argparse.Namespace) -> int:
    """`demo --autoscale`: the pool live through a burst, then compared with a fixed pool."""
    from agent.bench.autoscale_demo import (
        AutoscaleConfig,
        AutoscaleDemoError,
        plan_autoscale,
        run_autoscale_demo,
    )
    from agent.bench.capacities import CapacityProfileError

    if args.live_baseline:
        raise CliError("--live-baseline: the sizing demo's baseline is simulated only")
    if args.engine != defaults.DEMO_ENGINE:
        raise CliError(
            f"--engine {args.engine}: the sizing demo runs its twins as {defaults.DEMO_ENGINE} only"
        )
    setup = setup_from_args(args)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as err:
        raise CliError(f"--sizes={args.sizes!r}: {err}") from None
    config = AutoscaleConfig(
        setup=setup,
        preset=load_slo_preset(args.slo, setup.model.name),
        models_dir=args.models_dir,
        out_dir=args.out,
        sizes=tuple(sorted(sizes)),
        policy=args.policy,
        start_s=args.start,
        burst_s=args.wall_s,
        max_tokens=args.max_tokens,
    )
    try:
        plan = plan_autoscale(config)
    except (AutoscaleDemoError, CapacityProfileError) as exc:
        raise CliError(str(exc)) from None
    return _run_and_print(
        args,
        lambda update, phase: run_autoscale_demo(config, plan, update, phase),
        render_pool,
        print_pool_summary,
        "every twin and sidecar was stopped",
    )


def _run_with_view(
    demo: Callable[[Callable[[Any], None], Callable[[str], None]], Awaitable[dict[str, Any]]],
    view: Callable[[Any], Table] = render,
) -> dict[str, Any]:
    """The demo under a rich Live view on stderr, with one line per phase."""
    began = time.monotonic()
    with Live(Text("starting…"), console=stderr, refresh_per_second=4, transient=False) as live:

        def phase(message: str) -> None:
            live.console.print(f"[dim]{time.monotonic() - began:5.1f} s[/dim] {message}")

        def update(state: Any) -> None:
            live.update(view(state))

        return asyncio.run(demo(update, phase))


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `demo`."""
    demo = sub.add_parser(
        "demo",
        help="live: twin + node agent + sidecar + load generator as processes, watched, then compared "
        "with stock clocks",
        description="Starts `twin serve` (real time, serving --engine's API), `node` (the twin's GPU as "
        "its backend), `run` (reading the engine with the adapter of the same name, steering through "
        "the node agent, twin meter, gateway on) and `load` through the gateway (Triton's API, or "
        "OpenAI chat for vllm and completions for trtllm-serve) as separate processes on loopback, "
        "shows the clock, power, batch, latency and energy as they happen, stops everything (checking "
        "the clock lock is released), and compares with stock clocks on the same requests (simulated "
        "unless --live-baseline). With --autoscale: a twin + sidecar pair per TP size behind a "
        "router, sized live by the coordinator through a burst of trace requests, compared with a "
        "fixed pool (simulated).",
    )
    add_setup_args(demo)
    # Resolved in cmd_demo: the sizing demo has its own engine.
    demo.set_defaults(gpu=None, model=None, default_engine=(settings.gpu, settings.model))
    for action in demo._actions:
        if action.dest in ("gpu", "model"):
            autoscale = AUTOSCALE_ENGINE[0 if action.dest == "gpu" else 1]
            action.help = (
                f"{action.dest} (default: THROTTLLEM_{action.dest.upper()}, "
                f"{getattr(settings, action.dest)}; with --autoscale {autoscale})"
            )
    demo.add_argument("--policy", default="throttllem", help="the sidecar's policy (default %(default)s)")
    demo.add_argument(
        "--engine",
        choices=sorted(ENGINE_LOAD_APIS),
        default=defaults.DEMO_ENGINE,
        help="the engine the twin is served as (its API and metrics), read by the sidecar's adapter "
        "of the same name; the clients speak Triton's generate_stream, OpenAI chat (vllm) or "
        "completions (trtllm-serve). Not with --autoscale (default %(default)s)",
    )
    demo.add_argument(
        "--autoscale",
        action="store_true",
        help="size the engine live instead: a burst moves a pool of twin + sidecar pairs from the "
        "smallest of --sizes to a larger one and back, under the coordinator",
    )
    demo.add_argument(
        "--sizes", default="1,2", help="with --autoscale: the TP sizes of the pool (default %(default)s)"
    )
    demo.add_argument(
        "--wall-s",
        type=float,
        default=defaults.DEMO_WALL_S,
        help="wall seconds over which the requests arrive (the trace seconds they span follow from "
        "--load; unlike `load --duration`, which counts trace seconds); with --autoscale, the "
        "burst's (default %(default)s)",
    )
    demo.add_argument(
        "--start",
        type=float,
        default=defaults.DEMO_START_S,
        help="slice start, seconds into the trace (as `load --start`; default %(default)s)",
    )
    demo.add_argument(
        "--load",
        type=float,
        default=defaults.DEMO_LOAD,
        help="arrival rate as a fraction of the engine's capacity (default %(default)s)",
    )
    demo.add_argument(
        "--max-tokens",
        type=int,
        default=defaults.DEMO_MAX_TOKENS,
        help="client max_tokens: the cap every request asks for (default %(default)s)",
    )
    demo.add_argument(
        "--slo",
        default="mlperf-server",
        help="SLO preset: the sidecar's targets and the attainment's (default %(default)s)",
    )
    demo.add_argument(
        "--models-dir",
        type=Path,
        default=settings.models_dir,
        help="the sidecar's trained IPS models and capacity profiles (default: THROTTLLEM_MODELS_DIR, "
        "the shipped ones)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        help=f"report directory (default {DEFAULT_OUT}; with --autoscale {DEFAULT_AUTOSCALE_OUT})",
    )
    demo.add_argument(
        "--live-baseline",
        action="store_true",
        help="also run the baseline (max) live instead of simulating it",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object (no live view)")
    demo.set_defaults(func=cmd_demo)
