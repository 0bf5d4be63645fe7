"""`replay --sizes`: the engine-sizing ablation on a node's pool; `capacity`: what each size serves."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from agent.cli.common import (
    CliError,
    add_setup_args,
    min_clock_mhz,
    print_figures,
    print_json,
    print_table,
    progress_bar,
    setup_from_args,
    stdout,
)
from agent.config import Settings
from agent.coordinator.settings import parse_sizes
from agent.sim.capacity import PROFILE_DURATION_S, PROFILE_START_S
from agent.sim.pool import SizingKnobs
from agent.slo_presets import load_slo_preset
from agent.twin.memory import ModelDoesNotFitError
from agent.workloads import load_trace

TERMINAL_COLUMNS = ("run", "saved", "tok/J ×", "saved (node)", "SLO attainment", "GPU-s held", "scale events")
DEFAULT_PEAK_LOAD = 0.8  # 80% of the rate at which stock clocks on the largest size just meet the SLO


def _sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of TP degrees (argparse type)."""
    try:
        return parse_sizes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} {err}") from None


def add_pool_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the pool replay (`replay --sizes`)."""
    knobs = SizingKnobs()
    pool = parser.add_argument_group(
        "engine sizing (--sizes runs the pool ablation; --policies are then <fixed|autoscale>:<policy>)"
    )
    pool.add_argument(
        "--sizes", type=_sizes, default=None, help="comma-separated TP degrees of the pool, e.g. 1,2,4"
    )
    pool.add_argument(
        "--peak-load",
        type=float,
        default=DEFAULT_PEAK_LOAD,
        help="run at this fraction of the highest rate at which fixed:max on the largest size meets "
        "the SLO over the window (searched; default %(default)s)",
    )
    pool.add_argument(
        "--node-gpus", type=int, default=knobs.node_gpus, help="GPUs on the node (default %(default)s)"
    )
    pool.add_argument(
        "--period",
        type=float,
        default=knobs.period_s,
        help="seconds between sizing decisions (default %(default)s)",
    )
    pool.add_argument(
        "--cold-start",
        type=float,
        default=knobs.cold_start_s,
        help="seconds a new engine holds its GPUs idle before it is ready "
        "(default %(default)s; the paper: over 20 s)",
    )
    pool.add_argument(
        "--headroom",
        type=float,
        default=knobs.headroom,
        help="plan for this fraction of capacity (default %(default)s)",
    )
    pool.add_argument(
        "--grace",
        type=float,
        default=knobs.grace_s,
        help="scale-down grace period in s (default %(default)s)",
    )
    pool.add_argument(
        "--shadow-timeout",
        type=float,
        default=knobs.shadow_timeout_s,
        help="abandon a shadow not ready after this many s (default %(default)s)",
    )


def cmd_pool_replay(args: argparse.Namespace, arguments: dict[str, Any], window: Any) -> int:
    """Run the sizing ablation (called by `replay` when --sizes is given)."""
    from agent.bench.capacities import CapacityProfileError
    from agent.bench.pool_replay import (
        PoolReplayConfig,
        plan_pool_runs,
        pool_replay,
        pool_setups,
    )
    from agent.bench.pool_report import write_pool_report
    from agent.bench.replay import versions

    started = time.perf_counter()
    if args.loads is not None:
        raise CliError("--loads is for single-engine replays; with --sizes use --peak-load or --rate-scale")
    if not args.peak_load > 0:
        raise CliError(f"--peak-load must be > 0, got {args.peak_load}")
    setup = setup_from_args(args)
    try:
        setups = pool_setups(setup, args.sizes)
        knobs = SizingKnobs(
            args.node_gpus, args.period, args.cold_start, args.headroom, args.grace, args.shadow_timeout
        )
        plan = plan_pool_runs(args.policies, args.length_error or ())
    except (ValueError, ModelDoesNotFitError) as err:
        raise CliError(str(err)) from err
    config = PoolReplayConfig(
        setups=setups,
        workload=window,
        trace=args.trace,
        preset=load_slo_preset(args.slo, setup.model.name),
        plan=plan,
        peak_load=args.peak_load,
        rate_scale=args.rate_scale,
        max_tokens=args.max_tokens,
        models_dir=args.models_dir,
        seed=args.seed,
        knobs=knobs,
        ips_optimism_pct=args.ips_optimism,
        min_clock_mhz=min_clock_mhz(args, setup.gpu),
    )
    try:
        outcome = pool_replay(config, lambda label: progress_bar(label, not args.json))
    except CapacityProfileError as err:
        raise CliError(str(err)) from err
    meta = {
        "arguments": arguments,
        "trace": args.trace,
        "engine": f"{setup.gpu.name} / {setup.model.name}",
        "sizes": [f"tp{size}" for size in sorted(setups)],
        "knobs": {
            "node_gpus": knobs.node_gpus,
            "period_s": knobs.period_s,
            "cold_start_s": knobs.cold_start_s,
            "headroom": knobs.headroom,
            "grace_s": knobs.grace_s,
            "shadow_timeout_s": knobs.shadow_timeout_s,
        },
        "requests": len(window),
        "min_clock_mhz": config.min_clock_mhz,
        **outcome.meta(),
        "versions": versions(),
    }
    results = write_pool_report(args.out, outcome.records, meta)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    if args.json:
        print_json(results)
    else:
        from agent.bench.pool_report import COLUMNS, table_rows

        keep = [COLUMNS.index(c) for c in TERMINAL_COLUMNS]
        rows = [tuple(row[i] for i in keep) for row in table_rows(results)]
        print_table(f"{args.trace} on a pool of {', '.join(meta['sizes'])}", TERMINAL_COLUMNS, rows)
        stdout().print(f"report: {args.out / 'report.md'}")
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    """Profile one engine size's capacity on a trace's mix under an SLO; store it beside its IPS model."""
    from agent.bench.capacities import profile_capacity, save_capacity

    setup = setup_from_args(args)
    preset = load_slo_preset(args.slo, setup.model.name)
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    with progress_bar(f"capacity: tp{setup.tp} on {args.trace}", not args.json) as progress:
        profile = profile_capacity(
            setup, load_trace(args.trace), args.trace, preset, args.max_tokens, args.seed
        )
        progress(1.0)
    path = save_capacity(args.models_dir, setup, profile)
    figures = {**profile.record(), "path": str(path)}
    print_json(figures) if args.json else print_figures(f"capacity of tp{setup.tp}", figures)
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `capacity`."""
    from agent.cli.simulate import PREDICTIVE_MAX_TOKENS

    cap = sub.add_parser(
        "capacity",
        help="profile the request rate an engine size serves within an SLO; stored beside its IPS model",
    )
    add_setup_args(cap)
    cap.add_argument(
        "--trace", default="azure-conv", help="azure-conv | azure-code | an Azure CSV (default %(default)s)"
    )
    cap.add_argument(
        "--start",
        type=float,
        default=PROFILE_START_S,
        help="start of the trace window whose request mix is profiled, s (default %(default)s)",
    )
    cap.add_argument(
        "--duration", type=float, default=PROFILE_DURATION_S, help="its length, s (default %(default)s)"
    )
    cap.add_argument("--slo", default="mlperf-server", help="SLO preset or TOML path (default %(default)s)")
    cap.add_argument(
        "--max-tokens",
        type=int,
        default=PREDICTIVE_MAX_TOKENS,
        help="client max_tokens of every request, as the replays use (default %(default)s)",
    )
    cap.add_argument("--models-dir", type=Path, default=settings.models_dir, help="where capacity.json goes")
    cap.add_argument("--json", action="store_true", help="print the profile as JSON")
    cap.set_defaults(func=cmd_capacity)
