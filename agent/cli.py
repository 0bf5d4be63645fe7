"""`throttllem` command line: parse, build objects, call; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.catalog import GPUS, MODELS, gpu_spec, model_spec
from agent.config import load_settings
from agent.control.policies import parse_policy
from agent.domain import Request
from agent.twin.capacity import rate_scale_for_load
from agent.twin.iteration_stats import IterationStats, to_executor_json, to_triton_stats_json
from agent.twin.memory import EngineConfig, SchedulerPolicy, kv_cache_blocks
from agent.twin.power import PowerModel
from agent.twin.simulator import TwinSetup, simulate
from agent.workloads import Workload, load_trace, synthetic_from_spec
from agent.workloads.synthetic import SYNTHETIC_SPEC_HELP

DEFAULT_ENGINE = EngineConfig()
SYNTHETIC_DEFAULT_S = 600.0  # length of a synthetic workload when --duration is not given
ITERATION_STATS_FORMATS = {"executor": to_executor_json, "triton": to_triton_stats_json}
DEMO_POLICIES = ("max", "static:1305", "static:1200", "static:1050", "static:900")
stderr = Console(stderr=True)
MIN_TABLE_WIDTH = 110  # rich assumes 80 columns when stdout is not a terminal; tables need more


def _stdout() -> Console:
    console = Console()
    return console if console.width >= MIN_TABLE_WIDTH else Console(width=MIN_TABLE_WIDTH)


class CliError(Exception):
    """An error to report in one line and exit non-zero."""


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar on stderr fed with a 0..1 fraction; a no-op when disabled."""
    if not enabled:
        yield lambda _fraction: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=1.0)
        yield lambda fraction: bar.update(task, completed=fraction)


def _add_setup_args(parser: argparse.ArgumentParser) -> None:
    settings = load_settings()
    parser.add_argument(
        "--gpu", default=settings.gpu, choices=sorted(GPUS), help="GPU type (default %(default)s)"
    )
    parser.add_argument(
        "--model", default=settings.model, choices=sorted(MODELS), help="model (default %(default)s)"
    )
    parser.add_argument(
        "--tp", type=int, default=settings.tp, help="tensor-parallel degree (default %(default)s)"
    )
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_ENGINE.max_batch_size)
    parser.add_argument("--max-num-tokens", type=int, default=DEFAULT_ENGINE.max_num_tokens)
    parser.add_argument("--tokens-per-block", type=int, default=DEFAULT_ENGINE.tokens_per_block)
    parser.add_argument(
        "--scheduler", default=DEFAULT_ENGINE.scheduler.value, choices=[p.value for p in SchedulerPolicy]
    )
    parser.add_argument("--chunked-context", action="store_true", help="split long prompts across iterations")
    parser.add_argument(
        "--clock-delay-ms",
        type=float,
        default=settings.clock_change_delay_ms,
        help="delay before a clock change takes effect (default %(default)s)",
    )
    parser.add_argument("--noise", type=float, default=0.0, help="sigma of log-normal iteration-time jitter")
    parser.add_argument("--seed", type=int, default=settings.seed, help="seed (default %(default)s)")


def _setup(args: argparse.Namespace) -> TwinSetup:
    engine = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        tokens_per_block=args.tokens_per_block,
        scheduler=SchedulerPolicy(args.scheduler),
        chunked_context=args.chunked_context,
    )
    setup = TwinSetup(
        gpu=gpu_spec(args.gpu),
        model=model_spec(args.model),
        tp=args.tp,
        engine=engine,
        clock_change_delay_s=args.clock_delay_ms / 1000.0,
        noise=args.noise,
        seed=args.seed,
    )
    setup.kv_blocks()  # refuse configurations that do not fit, before any work
    return setup


def _add_workload_args(parser: argparse.ArgumentParser, default_duration: float | None = None) -> None:
    parser.add_argument(
        "--trace",
        default="azure-conv",
        help=f"azure-conv | azure-code | path to an Azure or BurstGPT CSV | {SYNTHETIC_SPEC_HELP}",
    )
    parser.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    parser.add_argument("--duration", type=float, default=default_duration, help="window length in seconds")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    parser.add_argument(
        "--load",
        type=float,
        default=None,
        help="scale arrivals to this fraction of the engine's peak rate (measured on the twin), e.g. 0.9",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="client max_tokens (default: traced length)"
    )


def _workload(args: argparse.Namespace, setup: TwinSetup) -> Workload:
    if args.trace.startswith("synthetic:"):
        duration = args.duration if args.duration is not None else SYNTHETIC_DEFAULT_S
        workload = synthetic_from_spec(args.trace, seed=args.seed, duration_s=args.start + duration)
    else:
        workload = load_trace(args.trace)
    if args.start or args.duration is not None:
        duration = args.duration if args.duration is not None else workload.duration_s - args.start
        workload = workload.window(args.start, duration)
    if len(workload) == 0:
        raise CliError(f"no requests in {args.trace} between {args.start:g} s and the end of the window")
    if args.load is not None:
        if args.rate_scale != 1.0:
            raise CliError("--load and --rate-scale both set the arrival rate: pass one")
        workload = workload.scale_rate(rate_scale_for_load(setup, workload.requests(), args.load))
    elif args.rate_scale != 1.0:
        workload = workload.scale_rate(args.rate_scale)
    return workload


def _print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table whose first column is a label and the rest right-aligned figures."""
    table = Table(title=title)
    table.add_column(headers[0], no_wrap=True)
    for header in headers[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    _stdout().print(table)


def _print_figures(title: str, figures: dict[str, Any]) -> None:
    """Figures as a two-column metric/value table."""
    _print_table(title, ("metric", "value"), [(key, _fmt(value)) for key, value in figures.items()])


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=float))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replay a trace through the twin under one policy."""
    setup = _setup(args)
    policy = parse_policy(args.policy, setup.gpu)
    requests: Sequence[Request] = _workload(args, setup).requests(max_tokens=args.max_tokens)
    with ExitStack() as stack:
        observer: Callable[[IterationStats], None] | None = None
        if args.iteration_stats is not None:
            sink = stack.enter_context(open(args.iteration_stats, "w", encoding="utf-8"))
            render = ITERATION_STATS_FORMATS[args.iteration_stats_format]

            def observer(stats: IterationStats) -> None:
                sink.write(render(stats) + "\n")

        progress = stack.enter_context(progress_bar(f"simulate {policy.name}", not args.json))
        summary = simulate(setup, policy, requests, progress, observer).summary()
    summary.update(gpu=setup.gpu.name, model=setup.model.name, tp=setup.tp, trace=args.trace)
    if args.json:
        _print_json(summary)
    else:
        _print_figures(f"{args.trace} on {setup.gpu.name} / {setup.model.name} / TP{setup.tp}", summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Compare stock clocks with fixed clocks on a slice of the conv trace."""
    setup = _setup(args)
    requests = _workload(args, setup).requests(max_tokens=args.max_tokens)
    rows = []
    for spec in DEMO_POLICIES:
        policy = parse_policy(spec, setup.gpu)
        with progress_bar(f"simulate {policy.name}", not args.json) as progress:
            rows.append(simulate(setup, policy, requests, progress).summary())
    base = rows[0]["energy_j"]
    for row in rows:
        row["energy_saved_vs_max"] = 1.0 - row["energy_j"] / base
    if args.json:
        _print_json({"gpu": setup.gpu.name, "model": setup.model.name, "tp": setup.tp, "runs": rows})
        return 0
    _print_table(
        f"{len(requests)} requests of {args.trace} on {setup.gpu.name} / {setup.model.name}",
        ("policy", "energy kJ", "saved", "tok/J", "TBT p99 ms", "TPOT p99 ms", "E2E p99 s", "MHz"),
        [
            (
                row["policy"],
                f"{row['energy_j'] / 1000:,.1f}",
                f"{row['energy_saved_vs_max']:.1%}",
                f"{row['tokens_per_joule']:.2f}",
                f"{row['tbt_p99_ms']:.0f}",
                f"{row['tpot_p99_ms']:.0f}",
                f"{row['e2e_p99_s']:.1f}",
                f"{row['mean_clock_mhz']:.0f}",
            )
            for row in rows
        ],
    )
    _stdout().print(
        "Fixed low clocks save energy but stretch latency under load; the predictive throttllem "
        "policy, which picks the clock per iteration to keep SLOs, is the next milestone."
    )
    return 0


def cmd_bench_sim(args: argparse.Namespace) -> int:
    """Simulator speed on the whole conv trace at stock clocks."""
    setup = _setup(args)
    requests = load_trace(args.trace).requests()
    with progress_bar("bench sim", not args.json) as progress:
        summary = simulate(setup, parse_policy("max", setup.gpu), requests, progress).summary()
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
        _print_json(figures)
    else:
        _print_figures("simulator speed", figures)
    return 0


def cmd_twin_gpus(args: argparse.Namespace) -> int:
    """List the GPUs the twin knows."""
    if args.json:
        _print_json([asdict(g) for g in GPUS.values()])
        return 0
    _print_table(
        "GPUs",
        ("name", "SM clocks MHz", "memory GiB", "HBM TB/s", "bf16 TFLOPS", "TDP W", "idle W"),
        [
            (
                g.name,
                f"{g.min_clock_mhz}-{g.max_clock_mhz} /15",
                f"{g.memory_bytes / 2**30:.0f}",
                f"{g.hbm_bandwidth_bytes_s / 1e12:.2f}",
                f"{g.peak_bf16_flops / 1e12:.0f}",
                f"{g.tdp_w:.0f}",
                f"{g.idle_w:.0f}",
            )
            for g in GPUS.values()
        ],
    )
    return 0


def cmd_twin_models(args: argparse.Namespace) -> int:
    """List the models the twin knows, with per-GPU memory at each TP degree."""
    rows = []
    for m in MODELS.values():
        row = asdict(m) | {"params": m.params(), "kv_bytes_per_token_tp1": m.kv_bytes_per_token(1)}
        fits = {}
        for g in GPUS.values():
            for tp in (1, 2, 4, 8):
                try:
                    fits[f"{g.name}/tp{tp}"] = (
                        kv_cache_blocks(g, m, tp, DEFAULT_ENGINE) * DEFAULT_ENGINE.tokens_per_block
                    )
                except ValueError:
                    fits[f"{g.name}/tp{tp}"] = None
        row["kv_cache_tokens"] = fits
        rows.append(row)
    if args.json:
        _print_json(rows)
        return 0
    _print_table(
        "Models (bf16)",
        ("name", "params B", "layers", "hidden", "heads/kv", "KV KiB/token", "weights GiB @TP1"),
        [
            (
                m.name,
                f"{m.params() / 1e9:.2f}",
                str(m.layers),
                str(m.hidden),
                f"{m.heads}/{m.kv_heads}",
                f"{m.kv_bytes_per_token(1) / 1024:.0f}",
                f"{m.weight_bytes_per_gpu(1) / 2**30:.1f}",
            )
            for m in MODELS.values()
        ],
    )
    return 0


def cmd_twin_probe(args: argparse.Namespace) -> int:
    """Time and power of one iteration of the twin."""
    setup = _setup(args)
    clock = args.clock or setup.gpu.max_clock_mhz
    if clock not in setup.gpu.sm_clocks_mhz:
        raise CliError(f"--clock {clock}: not a supported clock of {setup.gpu.name}")
    latency = setup.latency_model()
    if args.phase == "decode":
        cost = latency.iteration(
            clock, args.batch, args.batch * (1024 if args.context is None else args.context)
        )
    else:
        cost = latency.iteration(clock, 0, 0, [(args.tokens, args.context or 0)])
    power = PowerModel(setup.gpu).busy_w(clock, cost)
    result = {
        "gpu": setup.gpu.name,
        "model": setup.model.name,
        "tp": setup.tp,
        "phase": args.phase,
        "clock_mhz": clock,
        "iteration_ms": cost.time_s * 1000.0,
        "power_w": power,
        "energy_j": power * cost.time_s,
        "compute_share": cost.compute_share,
    }
    if args.json:
        _print_json(result)
    else:
        _print_figures("one iteration of the twin", result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="throttllem", description="SLO-aware GPU clock control for LLM serving"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    settings = load_settings()

    sim = sub.add_parser("simulate", help="replay a trace through the twin in virtual time")
    _add_setup_args(sim)
    _add_workload_args(sim)
    sim.add_argument("--policy", default=settings.policy, help="max | static:<MHz> (default %(default)s)")
    sim.add_argument(
        "--iteration-stats", metavar="FILE", help="write one TRT-LLM iteration-stats record per line"
    )
    sim.add_argument(
        "--iteration-stats-format",
        choices=sorted(ITERATION_STATS_FORMATS),
        default="executor",
        help="executor: trtllm-serve /metrics JSON; triton: the Triton backend's flat JSON "
        "(default %(default)s)",
    )
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="compare stock and fixed clocks on a slice of the conv trace")
    _add_setup_args(demo)
    _add_workload_args(demo, default_duration=600.0)
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_sim = bench_sub.add_parser("sim", help="simulator speed on a whole trace at stock clocks")
    _add_setup_args(bench_sim)
    bench_sim.add_argument("--trace", default="azure-conv")
    bench_sim.add_argument("--json", action="store_true")
    bench_sim.set_defaults(func=cmd_bench_sim)

    twin = sub.add_parser("twin", help="inspect the emulated GPUs, models and latency model")
    twin_sub = twin.add_subparsers(dest="twin", required=True)
    gpus = twin_sub.add_parser("gpus", help="list known GPUs")
    gpus.add_argument("--json", action="store_true")
    gpus.set_defaults(func=cmd_twin_gpus)
    models = twin_sub.add_parser("models", help="list known models and the KV cache they leave")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_twin_models)
    probe = twin_sub.add_parser("probe", help="time and power of one iteration")
    _add_setup_args(probe)
    probe.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    probe.add_argument("--batch", type=int, default=1, help="decoding requests (decode)")
    probe.add_argument(
        "--context",
        type=int,
        default=None,
        help="cached tokens per request (default: 1024 decode, 0 prefill)",
    )
    probe.add_argument("--tokens", type=int, default=1024, help="prompt tokens (prefill)")
    probe.add_argument("--clock", type=int, default=None, help="SM clock MHz (default: max)")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_twin_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `throttllem` console script."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        stderr.print("throttllem: interrupted")
        return 130
    except (CliError, ValueError, OSError) as exc:
        print(f"throttllem: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
