"""Pieces every command shares: twin setup and workload flags, output helpers, errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ, GPUS, MODELS, gpu_spec, model_spec
from agent.config import load_settings
from agent.domain import GpuSpec
from agent.sim.capacity import rate_scale_for_load
from agent.twin.memory import EngineConfig, SchedulerPolicy
from agent.twin.setup import TwinSetup
from agent.workloads import Workload
from agent.workloads.compose import WORKLOAD_SPEC_HELP, WorkloadSpecError, workload_from_spec

DEFAULT_ENGINE = EngineConfig()
SYNTHETIC_DEFAULT_S = 600.0  # length of a synthetic workload when --duration is not given
stderr = Console(stderr=True)
MIN_TABLE_WIDTH = 110  # rich assumes 80 columns when stdout is not a terminal; tables need more
MODELS_DIR_HELP = (
    "trained models, <gpu>/<model>-tp<N>/ and lengths/ (default: THROTTLLEM_MODELS_DIR, else those "
    "shipped in the package)"
)
JSON_HELP = "print the figures as one JSON object instead of a table"


def stdout() -> Console:
    """A console wide enough for our tables even when stdout is a pipe."""
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


CLOCK_RANGES = ("full", "sourced")


def add_clock_range_arg(parser: argparse.ArgumentParser) -> None:
    """`--clock-range`: every profiled clock, or only those public measurements cover."""
    parser.add_argument(
        "--clock-range",
        choices=CLOCK_RANGES,
        default="full",
        help="full: every clock the IPS models are profiled on (>= 600 MHz); sourced: only clocks "
        "at which the twin rests on A100/H100 measurements (>= 855 MHz on A100, >= 1200 on H100)",
    )


def min_clock_mhz(args: argparse.Namespace, gpu: GpuSpec) -> int:
    """The lowest clock a policy may lock under `--clock-range`."""
    return gpu.calibrated_clock_floor_mhz if args.clock_range == "sourced" else DEFAULT_MIN_CLOCK_MHZ


def add_setup_args(parser: argparse.ArgumentParser) -> None:
    """Flags that describe the twin: GPU, model, TP, engine, clock delay, noise, seed."""
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
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_ENGINE.max_batch_size,
        help="engine's most requests per iteration, as built (default %(default)s)",
    )
    parser.add_argument(
        "--max-num-tokens",
        type=int,
        default=DEFAULT_ENGINE.max_num_tokens,
        help="engine's most tokens per iteration, prompt and decode together (default %(default)s)",
    )
    parser.add_argument(
        "--tokens-per-block",
        type=int,
        default=DEFAULT_ENGINE.tokens_per_block,
        help="tokens per KV-cache block (default %(default)s)",
    )
    parser.add_argument(
        "--scheduler",
        default=DEFAULT_ENGINE.scheduler.value,
        choices=[p.value for p in SchedulerPolicy],
        help="TensorRT-LLM capacity scheduler: guaranteed_no_evict admits a request only when KV for all "
        "its max_tokens is free; max_utilization admits on current need and pauses requests when KV runs "
        "out (default %(default)s)",
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


def setup_from_args(args: argparse.Namespace) -> TwinSetup:
    """The twin the flags describe; refuses configurations that do not fit."""
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


def add_workload_args(parser: argparse.ArgumentParser, default_duration: float | None = None) -> None:
    """Flags that choose a trace, a window of it and its rate."""
    parser.add_argument(
        "--trace",
        default="azure-conv",
        help=WORKLOAD_SPEC_HELP,
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


def workload_from_args(args: argparse.Namespace, setup: TwinSetup) -> Workload:
    """The workload the flags describe."""
    duration = args.duration if args.duration is not None else SYNTHETIC_DEFAULT_S
    try:
        workload = workload_from_spec(args.trace, seed=args.seed, synthetic_duration_s=args.start + duration)
    except WorkloadSpecError as exc:
        raise CliError(str(exc)) from None
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


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table whose first column is a label and the rest right-aligned figures."""
    table = Table(title=title)
    table.add_column(headers[0], no_wrap=True)
    for header in headers[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    stdout().print(table)


def print_figures(title: str, figures: dict[str, Any]) -> None:
    """Figures as a two-column metric/value table."""
    print_table(title, ("metric", "value"), [(key, fmt(value)) for key, value in figures.items()])


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested figures as dotted keys, for a two-column table."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def print_json(payload: Any) -> None:
    """One JSON document on stdout (the `--json` output)."""
    print(json.dumps(payload, indent=2, default=float))


def fmt(value: Any) -> str:
    """A figure for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
