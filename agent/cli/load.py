"""`load`: replay a trace slice against an engine, the twin or the gateway, in Triton's or OpenAI's API."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
from agent.workloads.loadgen import (
    TRITON_MODEL_NAME,
    LoadApi,
    LoadReport,
    RequestResult,
    TokenRecording,
    generate_load,
)

DEFAULT_DURATION_S = 60.0  # a minute of trace unless told: a whole trace is an hour of real time
PREFLIGHT_TIMEOUT_S = 10.0
GAP_DECIMALS = 5  # token gaps on event lines, in seconds: 10 µs resolution keeps the lines short
API_KEY_ENV = "OPENAI_API_KEY"  # the bearer token of the OpenAI APIs, as the SDK itself reads it
DURATION_HELP = (
    "seconds of trace replayed from --start (default %(default)s); the replay lasts this long on "
    "the wall clock divided by the rate scale (--rate-scale or --load's) and by --time-scale"
)


def _finite(value: float) -> float | None:
    """A figure for JSON: NaN (never happened) becomes null."""
    return value if math.isfinite(value) else None


def result_event(result: RequestResult, done: int, total: int, *, energy: bool = False) -> dict[str, Any]:
    """One `--events` line: what one request saw (with its energy, when read), and how far the replay is."""
    event: dict[str, Any] = {
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
    if energy:
        event["energy_j"] = result.energy_j
    return event


def emit(event: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed: a reader sees each request as it finishes."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def preflight(url: str, api: LoadApi = LoadApi.TRITON, model_name: str | None = None) -> None:
    """Fail in one line, before the replay, when nothing answers at `url` or it serves another model."""
    if api.is_openai:
        await _openai_preflight(url, model_name)
        return
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url.rstrip('/')}/v2/health/live") as response,
        ):
            await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


async def energy_preflight(url: str) -> None:
    """Fail in one line when the sidecar named by --energy-url does not answer its /healthz."""
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url.rstrip('/')}/healthz") as response,
        ):
            if response.status != 200:
                raise CliError(
                    f"--energy-url {url}: /healthz answered HTTP {response.status}, not a sidecar's port"
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"--energy-url: cannot reach {url}: {exc or type(exc).__name__}") from None


async def _openai_preflight(url: str, model_name: str | None) -> None:
    """`GET /v1/models` through the SDK: the server answers and serves `model_name`."""
    from agent.workloads.openai_client import ModelListError, served_models  # the SDK: slow to import

    try:
        served = await served_models(url, os.environ.get(API_KEY_ENV), PREFLIGHT_TIMEOUT_S)
    except ModelListError as exc:
        raise CliError(str(exc)) from None
    if model_name not in served:
        listed = ", ".join(repr(name) for name in served) or "no model"
        raise CliError(f"{url} does not serve model {model_name!r}; it serves {listed} (pass --model-name)")


def served_name(args: argparse.Namespace) -> str:
    """`--model-name`, else what the twin serves by default: Triton's ensemble, or the catalog name."""
    if args.model_name is not None:
        return str(args.model_name)
    return args.model if LoadApi(args.api).is_openai else TRITON_MODEL_NAME


def cmd_load(args: argparse.Namespace) -> int:
    """Replay the slice in real time and report what the clients saw."""
    if not args.time_scale > 0:
        raise CliError(f"--time-scale must be > 0, got {args.time_scale}")
    api = LoadApi(args.api)
    model_name = served_name(args)
    setup = TwinSetup(gpu=gpu_spec(args.gpu), model=model_spec(args.model), tp=args.tp)
    preset = load_slo_preset(args.slo, args.model)
    requests = workload_from_args(args, setup).requests(max_tokens=args.max_tokens)
    asyncio.run(preflight(args.url, api, model_name))
    if args.energy_url is not None:
        asyncio.run(energy_preflight(args.energy_url))
    total = len(requests)
    energy = args.energy_url is not None
    if args.events:
        emit({"event": "start", "requests": total, "url": args.url, "time_scale": args.time_scale})
    with progress_bar(f"load {total} requests", not (args.json or args.events)) as progress:
        done = 0

        def on_result(result: RequestResult) -> None:
            nonlocal done
            done += 1
            progress(done / total)
            if args.events:
                emit(result_event(result, done, total, energy=energy))

        report: LoadReport = asyncio.run(
            generate_load(
                args.url,
                model_name,
                requests,
                api=api,
                time_scale=args.time_scale,
                max_retries=args.max_retries,
                on_result=on_result,
                record=TokenRecording(times=args.events),
                energy_url=args.energy_url,
                with_twin_keys=args.twin_keys,
                api_key=os.environ.get(API_KEY_ENV),
            )
        )
    summary = report.summary(preset)
    if args.events:
        emit({"event": "summary", **summary})
    elif args.json:
        print_json(summary)
    else:
        print_figures(f"{total} requests of {args.trace} against {args.url} ({api})", summary)
    if total and not summary["answered"]:
        first = next(r.error or f"HTTP {r.status}" for r in report.results)
        raise CliError(f"no request was answered; the first failed with: {first}")
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `load`."""
    load = sub.add_parser(
        "load",
        help="replay a trace slice against an engine, the twin or the gateway (Triton or OpenAI API) "
        "and report latency and SLO attainment",
        description="Sends each request at its (scaled) trace arrival time, streamed, with prompts of "
        "the traced length: over Triton's generate_stream, or over OpenAI's /v1/completions or "
        "/v1/chat/completions with the official openai SDK (usage chunk included). The twin also "
        "honours the traced output length.",
    )
    load.add_argument(
        "--url", required=True, help="base URL of the server or gateway, e.g. http://127.0.0.1:8000"
    )
    load.add_argument(
        "--api",
        choices=[api.value for api in LoadApi],
        default=LoadApi.TRITON.value,
        help="triton: Triton's generate_stream (the twin's default API); openai-completions: "
        "/v1/completions, openai-chat: /v1/chat/completions, both through the openai SDK (vLLM, "
        f"trtllm-serve, the twin with --api vllm|trtllm-serve; bearer token from ${API_KEY_ENV} if "
        "set). Default %(default)s",
    )
    load.add_argument(
        "--model",
        default=settings.model,
        choices=sorted(MODELS),
        help="catalog model the server runs: its SLO targets, and its peak for --load (default %(default)s)",
    )
    load.add_argument(
        "--model-name",
        default=None,
        help=f"model name the server serves (default: {TRITON_MODEL_NAME} for triton, the catalog "
        "name of --model for the OpenAI APIs, as `twin serve --model-name` defaults)",
    )
    add_workload_args(load, default_duration=DEFAULT_DURATION_S)
    for action in load._actions:
        if action.dest == "duration":
            action.help = DURATION_HELP
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
        "--gpu", default=settings.gpu, choices=sorted(GPUS), help="GPU, for --load (default %(default)s)"
    )
    load.add_argument(
        "--tp", type=int, default=settings.tp, help="TP degree, for --load (default %(default)s)"
    )
    load.add_argument(
        "--seed", type=int, default=settings.seed, help="seed of synthetic traces (default %(default)s)"
    )
    load.add_argument(
        "--energy-url",
        default=None,
        help="the sidecar's HTTP port, e.g. http://127.0.0.1:9401: read each request's attributed "
        "energy there (by the gateway's X-Throttllem-Request-Id) into --events and the summary",
    )
    load.add_argument(
        "--no-twin-keys",
        dest="twin_keys",
        action="store_false",
        help="leave the twin-only body keys prompt_tokens and output_tokens out: a real trtllm-serve "
        "refuses unknown keys (vLLM and Triton ignore them); answers then run to max_tokens or EOS",
    )
    output = load.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    output.add_argument(
        "--events",
        action="store_true",
        help="print JSON lines: a start event, one per finished request (with its token gaps), the summary",
    )
    load.set_defaults(func=cmd_load)
