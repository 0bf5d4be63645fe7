"""`load`: replay a trace slice against a Triton-compatible URL (an engine, the twin, or the gateway)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any

import aiohttp

from agent.catalog import GPUS, MODELS, gpu_spec, model_spec
from agent.cli.common import (
    CliError,
    add_workload_args,
    print_figures,
    print_json,
    progress_bar,
    workload_from_args,
)
from agent.config import Settings
from agent.slo_presets import load_slo_preset
from agent.twin.setup import TwinSetup
from agent.workloads.loadgen import LoadReport, RequestResult, TokenRecording, generate_load

DEFAULT_DURATION_S = 60.0  # a minute of trace unless told: a whole trace is an hour of real time
PREFLIGHT_TIMEOUT_S = 10.0
GAP_DECIMALS = 5  # token gaps on event lines, in seconds: 10 µs resolution keeps the lines short


def _finite(value: float) -> float | None:
    """A figure for JSON: NaN (never happened) becomes null."""
    return value if math.isfinite(value) else None


def result_event(result: RequestResult, done: int, total: int) -> dict[str, Any]:
    """One `--events` line: what one request saw, and how far the replay is."""
    return {
        "event": "request",
        "id": result.request_id,
        "status": result.status,
        "answered": result.answered,
        "ttft_s": _finite(result.ttft_s),
        "tpot_s": _finite(result.tpot_s),
        "e2e_s": _finite(result.e2e_s),
        "output_tokens": result.output_tokens,
        "retries": result.retries,
        "error": result.error,
        "gaps_s": [round(float(g), GAP_DECIMALS) for g in result.token_gaps_s],
        "done": done,
        "total": total,
    }


def emit(event: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed: a reader sees each request as it finishes."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def preflight(url: str) -> None:
    """Fail in one line, before the replay, when nothing answers at `url`."""
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url.rstrip('/')}/v2/health/live") as response,
        ):
            await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


def cmd_load(args: argparse.Namespace) -> int:
    """Replay the slice in real time and report what the clients saw."""
    if not args.time_scale > 0:
        raise CliError(f"--time-scale must be > 0, got {args.time_scale}")
    setup = TwinSetup(gpu=gpu_spec(args.gpu), model=model_spec(args.llm), tp=args.tp)
    preset = load_slo_preset(args.slo, args.llm)
    requests = workload_from_args(args, setup).requests(max_tokens=args.max_tokens)
    asyncio.run(preflight(args.url))
    total = len(requests)
    if args.events:
        emit({"event": "start", "requests": total, "url": args.url, "time_scale": args.time_scale})
    with progress_bar(f"load {total} requests", not (args.json or args.events)) as progress:
        done = 0

        def on_result(result: RequestResult) -> None:
            nonlocal done
            done += 1
            progress(done / total)
            if args.events:
                emit(result_event(result, done, total))

        report: LoadReport = asyncio.run(
            generate_load(
                args.url,
                args.model,
                requests,
                time_scale=args.time_scale,
                max_retries=args.max_retries,
                on_result=on_result,
                record=TokenRecording(times=args.events),
            )
        )
    summary = report.summary(preset)
    if args.events:
        emit({"event": "summary", **summary})
    elif args.json:
        print_json(summary)
    else:
        print_figures(f"{total} requests of {args.trace} against {args.url}", summary)
    if total and not summary["answered"]:
        first = next(r.error or f"HTTP {r.status}" for r in report.results)
        raise CliError(f"no request was answered; the first failed with: {first}")
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `load`."""
    load = sub.add_parser(
        "load",
        help="replay a trace slice against a Triton-compatible URL and report latency and SLO attainment",
        description="Sends each request at its (scaled) trace arrival time over generate_stream, with "
        "prompts of the traced length; the twin also honours the traced output length.",
    )
    load.add_argument(
        "--url", required=True, help="base URL of the server or gateway, e.g. http://127.0.0.1:8000"
    )
    load.add_argument(
        "--model", default="ensemble", help="model name the server serves (default %(default)s)"
    )
    add_workload_args(load, default_duration=DEFAULT_DURATION_S)
    load.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="replay this many times faster than the trace (as the twin's --time-scale; default %(default)s)",
    )
    load.add_argument("--max-retries", type=int, default=3, help="retries of a 429/503 (default %(default)s)")
    load.add_argument(
        "--slo",
        default="mlperf-server",
        help="SLO preset for attainment: a name in policies/ or a TOML path (default %(default)s)",
    )
    load.add_argument(
        "--llm",
        default=settings.model,
        choices=sorted(MODELS),
        help="catalog model the server runs: its SLO targets, and its peak for --load (default %(default)s)",
    )
    load.add_argument(
        "--gpu", default=settings.gpu, choices=sorted(GPUS), help="GPU, for --load (default %(default)s)"
    )
    load.add_argument(
        "--tp", type=int, default=settings.tp, help="TP degree, for --load (default %(default)s)"
    )
    load.add_argument("--seed", type=int, default=settings.seed, help="seed of synthetic traces")
    output = load.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    output.add_argument(
        "--events",
        action="store_true",
        help="print JSON lines: a start event, one per finished request (with its token gaps), the summary",
    )
    load.set_defaults(func=cmd_load)
