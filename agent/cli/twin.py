"""`twin gpus|models|probe|validate|serve`: the emulated world, measured and served.

What the twin knows, one iteration of it, how it compares with published measurements, and a
live twin.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict

from agent.catalog import GPUS, MODELS
from agent.cli.common import (
    DEFAULT_ENGINE,
    JSON_HELP,
    CliError,
    add_setup_args,
    print_figures,
    print_json,
    print_table,
    setup_from_args,
)
from agent.config import Settings
from agent.twin import validation
from agent.twin.memory import kv_cache_blocks
from agent.twin.power import PowerModel
from agent.twin.server.app import TRITON_MODEL_NAME, ServeApi, ServeConfig, serve


def cmd_twin_gpus(args: argparse.Namespace) -> int:
    """List the GPUs the twin knows."""
    if args.json:
        print_json([asdict(g) for g in GPUS.values()])
        return 0
    print_table(
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
        print_json(rows)
        return 0
    print_table(
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
    setup = setup_from_args(args)
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
        "gpus": setup.tp,
        "phase": args.phase,
        "clock_mhz": clock,
        "iteration_ms": cost.time_s * 1000.0,
        "power_per_gpu_w": power,
        "power_w": power * setup.tp,
        "energy_j": power * setup.tp * cost.time_s,
        "compute_share": cost.compute_share,
    }
    if args.json:
        print_json(result)
    else:
        print_figures("one iteration of the twin", result)
    return 0


def cmd_twin_validate(args: argparse.Namespace) -> int:
    """The twin's iteration times against every published measurement it is checked on."""
    sources = args.source or list(validation.SOURCES)
    groups = validation.group_errors(validation.comparisons(sources))
    if args.json:
        print_json([asdict(g) | {"limit": g.limit, "within_limit": g.within_limit} for g in groups])
        return 0
    print_table(
        "twin vs published measurements (MAPE per source, GPU, TP and phase)",
        ("source", "runtime", "GPU", "TP", "phase", "points", "MAPE", "bias", "worst", "limit"),
        [
            (
                g.source,
                g.runtime,
                g.gpu,
                str(g.tp),
                str(g.phase),
                str(g.points),
                f"{g.mape:.1%}",
                f"{g.bias:+.1%}",
                f"{g.max_error:+.1%}",
                f"{g.limit:.0%}" + ("" if g.within_limit else " missed"),
            )
            for g in groups
        ],
    )
    return 0


def cmd_twin_serve(args: argparse.Namespace) -> int:
    """Serve the twin with one server's HTTP API and metrics until SIGINT or SIGTERM."""
    setup = setup_from_args(args)
    config = ServeConfig(
        host=args.host,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_name=args.model_name,
        time_scale=args.time_scale,
        stats_period_ms=args.stats_period_ms,
        metrics_interval_ms=args.metrics_interval_ms,
        iteration_stats_stdout=args.iteration_stats_stdout,
        iteration_stats_endpoint=args.iteration_stats_endpoint,
        decoupled=args.decoupled_mode == "true",
        api=ServeApi(args.api),
    )
    try:
        asyncio.run(serve(setup, config))
    except ExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise CliError(f"the twin server stopped: {type(first).__name__}: {first}") from group
    return 0


def _add_serve_parser(twin_sub: argparse._SubParsersAction) -> None:
    serve_parser = twin_sub.add_parser(
        "serve",
        help="serve the twin in real time with Triton's, vLLM's or trtllm-serve's HTTP API, its "
        "metrics and a GPU control endpoint",
        description="Prints one JSON line at start (event, host, http_port, metrics_port: null "
        "without a metrics port, model_name, time_scale, api); stops on SIGINT or SIGTERM.",
    )
    add_setup_args(serve_parser)
    serve_parser.add_argument(
        "--api",
        choices=[api.value for api in ServeApi],
        default=ServeApi.TRITON.value,
        help="the server the HTTP port speaks as: triton (generate, KServe v2 health and metadata; "
        "metrics on --metrics-port), vllm (OpenAI /v1 routes, /health, /version, Prometheus "
        "/metrics) or trtllm-serve (OpenAI /v1 routes, /health, /version, iteration-stats "
        "/metrics) (default %(default)s)",
    )
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve_parser.add_argument(
        "--http-port", type=int, default=8000, help="HTTP API port, 0 for any (default %(default)s)"
    )
    serve_parser.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Triton's metrics port, 0 for any; unused by --api vllm and trtllm-serve, which serve "
        "their metrics on the HTTP port (default %(default)s)",
    )
    serve_parser.add_argument(
        "--model-name",
        default=None,
        help=f"model name clients address (default: {TRITON_MODEL_NAME} for --api triton, the --model "
        "catalog name, e.g. llama3-8b, for vllm and trtllm-serve)",
    )
    serve_parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="run twin time this many times faster than real time (default %(default)s)",
    )
    serve_parser.add_argument(
        "--stats-period-ms",
        type=float,
        default=100.0,
        help="TRT-LLM backend stats poll period, twin time; --api triton only (default %(default)s)",
    )
    serve_parser.add_argument(
        "--metrics-interval-ms",
        type=float,
        default=2000.0,
        help="Triton --metrics-interval-ms for GPU metrics, twin time; --api triton only "
        "(default %(default)s)",
    )
    serve_parser.add_argument(
        "--iteration-stats-stdout",
        action="store_true",
        help="write each iteration's TRT-LLM executor JSON to stdout",
    )
    serve_parser.add_argument(
        "--iteration-stats-endpoint",
        action="store_true",
        help="--api triton: also answer trtllm-serve's GET /metrics on the HTTP port, every "
        "iteration's stats (with its latency) since the last call as a JSON array "
        "(--api trtllm-serve always does)",
    )
    serve_parser.add_argument(
        "--decoupled-mode",
        choices=("true", "false"),
        default="true",
        help="--api triton: TRT-LLM's decoupled_mode. true streams one response per token over "
        "generate_stream and answers HTTP infer 501, as Triton does for a decoupled model; false "
        "sends one response per request and serves KServe infer (default %(default)s)",
    )
    serve_parser.set_defaults(func=cmd_twin_serve)


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `twin gpus`, `twin models`, `twin probe`, `twin validate` and `twin serve`."""
    twin = sub.add_parser(
        "twin", help="inspect the emulated GPUs, models and latency model; serve a live twin"
    )
    twin_sub = twin.add_subparsers(dest="twin", required=True)
    gpus = twin_sub.add_parser("gpus", help="list known GPUs")
    gpus.add_argument("--json", action="store_true", help="print the list as JSON")
    gpus.set_defaults(func=cmd_twin_gpus)
    models = twin_sub.add_parser("models", help="list known models and the KV cache they leave")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.set_defaults(func=cmd_twin_models)
    probe = twin_sub.add_parser("probe", help="time and power of one iteration")
    add_setup_args(probe)
    probe.add_argument(
        "--phase", choices=("decode", "prefill"), default="decode", help="the iteration (default %(default)s)"
    )
    probe.add_argument("--batch", type=int, default=1, help="decoding requests (decode)")
    probe.add_argument(
        "--context",
        type=int,
        default=None,
        help="cached tokens per request (default: 1024 decode, 0 prefill)",
    )
    probe.add_argument("--tokens", type=int, default=1024, help="prompt tokens (prefill)")
    probe.add_argument("--clock", type=int, default=None, help="SM clock MHz (default: max)")
    probe.add_argument("--json", action="store_true", help=JSON_HELP)
    probe.set_defaults(func=cmd_twin_probe)
    validate = twin_sub.add_parser(
        "validate", help="the twin's iteration times against published measurements (MAPE)"
    )
    validate.add_argument(
        "--source",
        action="append",
        choices=tuple(validation.SOURCES),
        help="only this source (repeatable; default: all)",
    )
    validate.add_argument("--json", action="store_true", help="print the comparison as JSON")
    validate.set_defaults(func=cmd_twin_validate)
    _add_serve_parser(twin_sub)
