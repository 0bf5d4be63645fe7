"""`simulate`: replay a workload through the twin under a clock policy, in virtual time."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from agent.cli.common import (
    MODELS_DIR_HELP,
    add_clock_range_arg,
    add_setup_args,
    add_workload_args,
    min_clock_mhz,
    print_figures,
    print_json,
    progress_bar,
    setup_from_args,
    workload_from_args,
)
from agent.config import Settings
from agent.domain import Request
from agent.policy_registry import build_policy, policy_syntax
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.slo_presets import control_targets, load_slo_preset
from agent.twin.iteration_stats import IterationStats, to_executor_json, to_triton_stats_json

ITERATION_STATS_FORMATS = {"executor": to_executor_json, "triton": to_triton_stats_json}
PREDICTIVE_MAX_TOKENS = 2048  # client max_tokens when a predictive policy runs and none is given


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replay a trace through the twin under one policy."""
    setup = setup_from_args(args)
    preset = load_slo_preset(args.slo, setup.model.name)
    targets = control_targets(preset)
    context = policy_context(
        setup, targets, args.models_dir, seed=args.seed, min_clock_mhz=min_clock_mhz(args, setup.gpu)
    )
    built = build_policy(args.policy, context)
    policy = built.policy
    # A predictive policy must not learn true lengths from max_tokens: give clients a real cap.
    cap = args.max_tokens if args.max_tokens is not None or built.lengths is None else PREDICTIVE_MAX_TOKENS
    requests: Sequence[Request] = workload_from_args(args, setup).requests(max_tokens=cap)
    with ExitStack() as stack:
        observer: Callable[[IterationStats], None] | None = None
        if args.iteration_stats is not None:
            sink = stack.enter_context(open(args.iteration_stats, "w", encoding="utf-8"))
            render = ITERATION_STATS_FORMATS[args.iteration_stats_format]

            def observer(stats: IterationStats) -> None:
                sink.write(render(stats) + "\n")

        progress = stack.enter_context(progress_bar(f"simulate {policy.name}", not args.json))
        result = simulate(setup, policy, requests, progress, observer, length_predictor=built.lengths)
    summary = result.summary()
    summary.update(
        gpu=setup.gpu.name,
        model=setup.model.name,
        tp=setup.tp,
        trace=args.trace,
        slo=preset.name,
        clock_range=args.clock_range,
        min_clock_mhz=context.min_clock_mhz,
    )
    summary["slo_attainment"] = result.slo_attainment(preset) if preset.slo is not None else None
    if args.json:
        print_json(summary)
    else:
        print_figures(f"{args.trace} on {setup.gpu.name} / {setup.model.name} / TP{setup.tp}", summary)
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `simulate`."""
    sim = sub.add_parser("simulate", help="replay a trace through the twin in virtual time")
    add_setup_args(sim)
    add_workload_args(sim)
    sim.add_argument("--policy", default=settings.policy, help=f"{policy_syntax()} (default %(default)s)")
    sim.add_argument(
        "--slo",
        default="mlperf-server",
        help="SLO preset: a shipped name (mlperf-server, mlperf-interactive, paper) or a .toml path",
    )
    sim.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    add_clock_range_arg(sim)
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
