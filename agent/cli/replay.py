"""`replay`: clock policies side by side on the same arrivals, written up as a report."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from agent.cli.common import (
    MODELS_DIR_HELP,
    CliError,
    add_clock_range_arg,
    add_setup_args,
    min_clock_mhz,
    print_json,
    print_table,
    progress_bar,
    setup_from_args,
    stdout,
    workload_from_args,
)
from agent.cli.pool import add_pool_args, cmd_pool_replay
from agent.cli.simulate import PREDICTIVE_MAX_TOKENS
from agent.config import Settings
from agent.policy_registry import policy_syntax
from agent.slo_presets import load_slo_preset
from agent.twin.setup import TwinSetup
from agent.workloads import Workload

DEFAULT_POLICIES = ("max", "static:1050", "reactive", "throttllem", "throttllem-exact")
DEFAULT_POOL_POLICIES = (
    "fixed:max",
    "autoscale:max",
    "fixed:throttllem",
    "autoscale:throttllem",
    "autoscale:throttllem-exact",
)
DEFAULT_LOADS = (0.5, 0.9)  # the report points, as fractions of max's peak
_NOT_ARGUMENTS = ("func", "json", "command")


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names (argparse type)."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}")
    return names


def _numbers(text: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers (argparse type)."""
    try:
        numbers = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise argparse.ArgumentTypeError(f"numbers must be finite, got {text!r}")
    return numbers


def _window(args: argparse.Namespace, setup: TwinSetup) -> Workload:
    """The trace window at its own rate: the replay scales it once per load itself."""
    return workload_from_args(argparse.Namespace(**{**vars(args), "load": None, "rate_scale": 1.0}), setup)


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments as the report records them."""
    return {key: value for key, value in vars(args).items() if key not in _NOT_ARGUMENTS}


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A figure for a table cell; '-' when the run has none."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _print_groups(results: dict[str, Any], out: Path) -> None:
    """One table per report group: the headline figures; the rest is in report.md."""
    summaries = {(run["policy"], run["load"], run["load_basis"]): run["summary"] for run in results["runs"]}
    for group in results["groups"]:
        rows = []
        for policy in group["policies"]:
            s = summaries[(policy, group["load"], group["load_basis"])]
            versus = group["versus_max"][policy]
            rows.append(
                (
                    policy,
                    _cell(s["energy_j"] / 1000, ",.1f"),
                    _cell(versus["energy_saved_pct"], ".1f", "%"),
                    _cell(s["tokens_per_joule"], ".2f"),
                    _cell(versus["tokens_per_joule_ratio"], ".2f", "x"),
                    _cell(s["slo_attainment"], ".2%"),
                    _cell(s.get("saving_share"), ".0%"),
                    _cell(s["tbt_p99_ms"], ".0f"),
                    _cell(s["mean_clock_mhz"], ".0f"),
                )
            )
        load = "trace rate" if group["load"] is None else f"load {group['load']:g} of {group['load_basis']}"
        error = "" if group["length_error"] is None else f", length error {group['length_error']:g}%"
        print_table(
            f"{group['trace']}, {load}{error}",
            (
                "policy",
                "energy kJ",
                "saved",
                "tok/J",
                "vs max",
                "SLO attainment",
                "share",
                "TBT p99 ms",
                "MHz",
            ),
            rows,
        )
    stdout().print(f"report: {out / 'report.md'} and {out / 'report.html'} (one page, plots embedded)")


def cmd_replay(args: argparse.Namespace) -> int:
    """Run every policy on the same arrivals at each load and write the report."""
    from agent.bench.html_report import write_html_report
    from agent.bench.replay import ReplayConfig, plan_runs, replay, versions  # matplotlib: slow
    from agent.bench.report import write_report

    if args.sizes is not None:
        args.policies = args.policies or DEFAULT_POOL_POLICIES
        return cmd_pool_replay(args, _arguments(args), _window(args, setup_from_args(args)))
    started = time.perf_counter()
    args.policies = args.policies or DEFAULT_POLICIES
    if args.rate_scale is not None and (args.loads is not None or args.utilisations is not None):
        raise CliError("--rate-scale and --loads/--utilisations all set the arrival rate: pass one kind")
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    utilisations = args.utilisations or ()
    by_default = args.rate_scale is None and not utilisations
    loads = args.loads or (DEFAULT_LOADS if by_default else ())
    if any(x <= 0 for x in (*loads, *utilisations)) or (args.rate_scale is not None and args.rate_scale <= 0):
        raise CliError("loads, utilisations and the rate scale must be > 0")
    setup = setup_from_args(args)
    preset = load_slo_preset(args.slo, setup.model.name)
    plan = plan_runs(args.policies, args.length_error or ())
    config = ReplayConfig(
        setup=setup,
        workload=_window(args, setup),
        trace=args.trace,
        preset=preset,
        plan=plan,
        loads=loads,
        utilisations=utilisations,
        rate_scale=args.rate_scale,
        max_tokens=args.max_tokens,
        models_dir=args.models_dir,
        seed=args.seed,
        ips_optimism_pct=args.ips_optimism,
        min_clock_mhz=min_clock_mhz(args, setup.gpu),
        limits=not args.no_limits,
    )
    outcome = replay(config, lambda label: progress_bar(label, not args.json))
    meta = {
        "arguments": _arguments(args),
        "requests": len(config.workload),
        "energy_counts_gpus": config.setup.tp,
        "min_clock_mhz": config.min_clock_mhz,
        **outcome.meta(),
        "versions": versions(),
        "wall_seconds": time.perf_counter() - started,
    }
    report = write_report(args.out, outcome.runs, meta)
    write_html_report(args.out, report)
    results = report.results
    if args.json:
        print_json(results)
    else:
        _print_groups(results, args.out)
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `replay`."""
    rep = sub.add_parser(
        "replay", help="run clock policies side by side on the same arrivals and write a report"
    )
    add_setup_args(rep)
    rep.add_argument("--trace", default="azure-conv", help="as for simulate")
    rep.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    rep.add_argument("--duration", type=float, default=None, help="window length in seconds")
    rep.add_argument(
        "--slo",
        default="mlperf-server",
        help="SLO preset: a shipped name (mlperf-server, mlperf-interactive, paper) or a .toml path",
    )
    rep.add_argument(
        "--policies",
        type=_names,
        default=None,
        help=f"comma-separated, each {policy_syntax()} (default {','.join(DEFAULT_POLICIES)}; with "
        f"--sizes {','.join(DEFAULT_POOL_POLICIES)})",
    )
    rep.add_argument(
        "--length-error",
        type=_numbers,
        default=None,
        help="comma-separated p95 length errors in %% for throttllem (noisy:E; 0: true lengths); "
        "default: its learned predictor",
    )
    rep.add_argument(
        "--ips-optimism",
        type=float,
        default=0.0,
        help="make throttllem's IPS model this many %% too optimistic (the guard experiment; default 0)",
    )
    rate = rep.add_argument_group("arrival rate (one of)")
    rate.add_argument(
        "--loads",
        type=_numbers,
        default=None,
        help="single engine: comma-separated fractions of the peak rate, the highest at which max "
        "meets the SLO "
        f"(searched on the window; default {','.join(map(str, DEFAULT_LOADS))})",
    )
    rate.add_argument(
        "--utilisations",
        type=_numbers,
        default=None,
        help="single engine, with or without --loads: comma-separated fractions of the engine's "
        "capacity (the completion rate of a saturated max engine on the window), e.g. 0.3,0.6",
    )
    rate.add_argument(
        "--rate-scale", type=float, default=None, help="run at this multiple of the trace's rate"
    )
    rep.add_argument(
        "--max-tokens",
        type=int,
        default=PREDICTIVE_MAX_TOKENS,
        help="client max_tokens of every request, whatever the policy (default %(default)s)",
    )
    rep.add_argument("--models-dir", type=Path, default=settings.models_dir, help=MODELS_DIR_HELP)
    rep.add_argument(
        "--no-limits",
        action="store_true",
        help="skip the energy lower bound and the hindsight reference (an LP per load; noiseless twin only)",
    )
    add_clock_range_arg(rep)
    add_pool_args(rep)
    rep.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory for results.json, report.md, report.html (one self-contained page) and PNGs; "
        "with --sizes, the pool report (results.json, report.md, timeline.png)",
    )
    rep.add_argument("--json", action="store_true", help="print results.json")
    rep.set_defaults(func=cmd_replay)
