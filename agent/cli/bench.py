"""`bench ...`: benchmarks that print figures (speed and accuracy targets live here, not in tests)."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from agent.bench.decide import benchmark_decide
from agent.cli.common import (
    JSON_HELP,
    MODELS_DIR_HELP,
    CliError,
    add_setup_args,
    flatten,
    print_figures,
    print_json,
    print_table,
    progress_bar,
    setup_from_args,
)
from agent.cli.models import PROFILE_NOISE
from agent.config import Settings
from agent.control.frequency import SEARCHES
from agent.control.policies import MaxPolicy, ThrottllemPolicy
from agent.policy_registry import build_policy, ips_model_dir
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.slo_presets import control_targets, load_slo_preset
from agent.workloads import load_trace

if TYPE_CHECKING:
    from agent.bench.faults.suite import SuiteConfig


def cmd_bench_sim(args: argparse.Namespace) -> int:
    """Simulator speed on the whole conv trace at stock clocks."""
    setup = setup_from_args(args)
    requests = load_trace(args.trace).requests()
    with progress_bar("bench sim", not args.json) as progress:
        summary = simulate(setup, MaxPolicy(), requests, progress).summary()
    figures = {
        "trace": args.trace,
        "gpu": setup.gpu.name,
        "model": setup.model.name,
        "tp": setup.tp,
        "requests": summary["requests"],
        "iterations": summary["iterations"],
        "sim_seconds": summary["sim_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "speedup_vs_real_time": summary["speedup_vs_real_time"],
        "us_per_iteration": summary["wall_seconds"] / summary["iterations"] * 1e6,
    }
    if args.json:
        print_json(figures)
    else:
        print_figures("simulator speed", figures)
    return 0


def cmd_bench_predictor(args: argparse.Namespace) -> int:
    """Accuracy on fresh twin rows and latency of the shipped IPS model."""
    from agent.bench.predictor import FRESH_SEED_OFFSET, benchmark_predictor  # lightgbm: slow to import

    setup = replace(setup_from_args(args), noise=args.noise, seed=args.seed + FRESH_SEED_OFFSET)
    model_dir = args.model_dir or ips_model_dir(args.models_dir, setup.gpu.name, setup.model.name, setup.tp)
    with progress_bar("bench predictor", not args.json) as progress:
        figures = benchmark_predictor(model_dir, setup, args.rows, args.seed + FRESH_SEED_OFFSET)
        progress(1.0)
    if args.json:
        print_json(figures)
    else:
        print_figures("IPS predictor", flatten(figures))
    return 0


def cmd_bench_decide(args: argparse.Namespace) -> int:
    """Latency of one throttllem decision with a full scoreboard."""
    setup = setup_from_args(args)
    preset = load_slo_preset("mlperf-server", setup.model.name)
    targets = control_targets(preset)
    figures = {}
    for search in SEARCHES:
        built = build_policy("throttllem", policy_context(setup, targets, args.models_dir))
        assert isinstance(built.policy, ThrottllemPolicy)
        built.policy.search = search
        figures[search] = benchmark_decide(
            built.policy, setup, args.running, args.queued, args.repeats, args.seed
        )
    print_json(figures) if args.json else print_figures("decision latency", flatten(figures))
    return 0


def cmd_bench_sidecar(args: argparse.Namespace) -> int:
    """Gateway latency, sidecar CPU and memory, decision latency: real processes on loopback."""
    from agent.bench.processes import ProcessStartError, cancel_on_sigterm
    from agent.bench.sidecar import SidecarBenchConfig, run_sidecar_bench

    setup = setup_from_args(args)
    config = SidecarBenchConfig(
        setup=setup,
        preset=load_slo_preset(args.slo, setup.model.name),
        models_dir=args.models_dir,
        log_dir=args.logs,
        latency_requests=args.requests,
        footprint_duration_s=args.duration,
    )
    try:
        with progress_bar("bench sidecar", not args.json) as progress:
            figures = asyncio.run(cancel_on_sigterm(run_sidecar_bench(config, progress)))
    except ProcessStartError as exc:
        raise CliError(str(exc)) from None
    except asyncio.CancelledError:
        raise CliError("terminated: the twin and the sidecars were stopped") from None
    print_json(figures) if args.json else print_figures("sidecar cost", flatten(figures))
    return 0


def faults_config(args: argparse.Namespace) -> SuiteConfig:
    """The suite `bench faults` runs for these arguments."""
    from agent.bench.faults.scenarios import FAULTS
    from agent.bench.faults.stack import StackConfig
    from agent.bench.faults.suite import SuiteConfig

    return SuiteConfig(
        StackConfig(setup_from_args(args), args.logs, args.models_dir),
        faults=tuple(args.fault or FAULTS),
        node_agent=args.node_agent != "without",
        without_node_agent=args.node_agent != "with",
    )


def cmd_bench_faults(args: argparse.Namespace) -> int:
    """Break a twin + sidecar (+ node agent) stack on purpose and judge each fault."""
    from agent.bench.faults.suite import COLUMNS, planned_runs, run_suite, table_rows
    from agent.bench.processes import cancel_on_sigterm

    config = faults_config(args)
    try:
        planned_runs(config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        with progress_bar("bench faults", not args.json) as progress:
            results = asyncio.run(cancel_on_sigterm(run_suite(config, progress)))
    except asyncio.CancelledError:
        raise CliError("terminated: every process the suite started was stopped") from None
    if args.json:
        print_json({"faults": [result.as_json() for result in results]})
    else:
        print_table("faults", COLUMNS, table_rows(results))
    missed = [
        f"{r.fault} ({'with' if r.node_agent else 'without'} node agent)" for r in results if not r.held
    ]
    if missed:
        raise CliError(f"{len(missed)} of {len(results)} faults missed a target: {'; '.join(missed)}")
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `bench sim`, `bench predictor`, `bench decide`, `bench sidecar` and `bench faults`."""
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_sim = bench_sub.add_parser("sim", help="simulator speed on a whole trace at stock clocks")
    add_setup_args(bench_sim)
    bench_sim.add_argument(
        "--trace",
        default="azure-conv",
        help="azure-conv | azure-code | path to an Azure or BurstGPT CSV, replayed whole "
        "(default %(default)s)",
    )
    bench_sim.add_argument("--json", action="store_true", help=JSON_HELP)
    bench_sim.set_defaults(func=cmd_bench_sim)

    predictor = bench_sub.add_parser("predictor", help="IPS model accuracy on fresh twin data, and latency")
    add_setup_args(predictor)
    predictor.set_defaults(noise=PROFILE_NOISE)
    predictor.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    predictor.add_argument(
        "--model-dir", type=Path, default=None, help="default: <models-dir>/<gpu>/<model>-tp<N>"
    )
    predictor.add_argument("--rows", type=int, default=5000, help="fresh profile rows to score on")
    predictor.add_argument("--json", action="store_true", help=JSON_HELP)
    predictor.set_defaults(func=cmd_bench_predictor)

    decide = bench_sub.add_parser("decide", help="latency of one throttllem decision")
    add_setup_args(decide)
    decide.add_argument(
        "--running", type=int, default=256, help="requests decoding on the scoreboard (default %(default)s)"
    )
    decide.add_argument(
        "--queued", type=int, default=32, help="requests waiting for admission (default %(default)s)"
    )
    decide.add_argument(
        "--repeats", type=int, default=500, help="decisions timed per search (default %(default)s)"
    )
    decide.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    decide.add_argument("--json", action="store_true", help=JSON_HELP)
    decide.set_defaults(func=cmd_bench_decide)

    sidecar = bench_sub.add_parser(
        "sidecar",
        help="what the sidecar costs: gateway latency, CPU and RSS, decision latency (real processes)",
        description="Runs the twin and sidecars as processes on loopback: the same requests straight to "
        "the twin and through the gateway, then the demo's load through a throttllem sidecar sampled "
        "with psutil. Takes about five minutes.",
    )
    add_setup_args(sidecar)
    sidecar.add_argument(
        "--requests", type=int, default=300, help="requests per latency pass (default %(default)s)"
    )
    sidecar.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds of the demo's load for CPU and RSS (default %(default)s)",
    )
    sidecar.add_argument("--slo", default="mlperf-server", help="SLO preset (default %(default)s)")
    sidecar.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    sidecar.add_argument(
        "--logs", type=Path, default=Path("bench-sidecar-logs"), help="process logs (default %(default)s)"
    )
    sidecar.add_argument("--json", action="store_true", help=JSON_HELP)
    sidecar.set_defaults(func=cmd_bench_sidecar)

    from agent.bench.faults.scenarios import FAULTS  # the names only; the suite loads on use

    faults = bench_sub.add_parser(
        "faults",
        help="inject faults into a twin + sidecar (+ node agent) stack and judge each (real processes)",
        description="Kills, freezes and floods real processes on loopback: the sidecar (SIGTERM, SIGKILL, "
        "OOM-like kill, SIGSTOP; with and without the node agent), the engine, the GPU endpoint, the "
        "metrics page, and the gateway (slowloris, 8 x 60 MB bodies, 1,000 streams, client hang-ups, "
        "forbidden paths). Prints one row per fault; exits 1 when any misses a target. About four minutes.",
    )
    add_setup_args(faults)
    faults.add_argument(
        "--fault",
        action="append",
        choices=tuple(FAULTS),
        metavar="NAME",
        help=f"run only this fault (repeatable): {', '.join(FAULTS)}",
    )
    faults.add_argument(
        "--node-agent",
        choices=("both", "with", "without"),
        default="both",
        help="run the sidecar faults with the node agent, without it, or both (default %(default)s)",
    )
    faults.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    faults.add_argument(
        "--logs", type=Path, default=Path("bench-faults-logs"), help="process logs (default %(default)s)"
    )
    faults.add_argument("--json", action="store_true", help=JSON_HELP)
    faults.set_defaults(func=cmd_bench_faults)
