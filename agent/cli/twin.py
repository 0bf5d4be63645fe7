"""`twin gpus|models|probe`: what the emulated world knows and how one iteration behaves."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from agent.catalog import GPUS, MODELS
from agent.cli.common import (
    DEFAULT_ENGINE,
    CliError,
    add_setup_args,
    print_figures,
    print_json,
    print_table,
    setup_from_args,
)
from agent.config import Settings
from agent.twin.memory import kv_cache_blocks
from agent.twin.power import PowerModel


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
        "phase": args.phase,
        "clock_mhz": clock,
        "iteration_ms": cost.time_s * 1000.0,
        "power_w": power,
        "energy_j": power * cost.time_s,
        "compute_share": cost.compute_share,
    }
    if args.json:
        print_json(result)
    else:
        print_figures("one iteration of the twin", result)
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `twin gpus`, `twin models` and `twin probe`."""
    twin = sub.add_parser("twin", help="inspect the emulated GPUs, models and latency model")
    twin_sub = twin.add_subparsers(dest="twin", required=True)
    gpus = twin_sub.add_parser("gpus", help="list known GPUs")
    gpus.add_argument("--json", action="store_true")
    gpus.set_defaults(func=cmd_twin_gpus)
    models = twin_sub.add_parser("models", help="list known models and the KV cache they leave")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_twin_models)
    probe = twin_sub.add_parser("probe", help="time and power of one iteration")
    add_setup_args(probe)
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
