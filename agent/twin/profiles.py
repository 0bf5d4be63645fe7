"""Operator latencies at max clock, read from the Vidur profiling tables shipped in `data/`.

Source: microsoft/vidur@7d47513 (MIT), `data/profiling/compute/{a100,h100}/<model>/mlp.csv`,
`data/profiling/network/{a100,h100}_dgx/all_reduce.csv`, and the A100 attention profile from
vidur@acb95f6 (Llama-2-70B geometry at TP2). All times are milliseconds per layer.

Models without their own profile are derived from the nearest profiled model on the same GPU:
every linear operator of a layer is a GEMM whose weight bytes and FLOPs are both proportional to
the layer's parameter count, so the table is scaled by the parameter ratio. Attention is fitted
once (decode: a launch term plus KV bytes over an effective bandwidth; prefill: a power law in
chunk and context length) and scaled by the heads each GPU holds.

Measured tables are noisy: a profile may list 32 tokens as faster than 16, or an all-reduce of
190 kB as faster than one of 130 kB (NCCL switching protocols between runs). An engine never does
less work by being given more, and a twin that says otherwise rewards the wrong batch sizes, so
every table is replaced by its least-squares non-decreasing fit (isotonic regression) before use.
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources

import numpy as np
from scipy.optimize import isotonic_regression

from agent.domain import BF16_BYTES, ModelSpec

LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPS = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")
MEMORY_BOUND_TOKENS = 16  # at or below this many tokens a linear layer only streams its weights

# Profiled models: (profile GPU, Hugging Face name) -> file, and the geometry of each.
MLP_TABLES = {
    ("a100", "meta-llama/Meta-Llama-3-8B"): "a100__meta-llama__Meta-Llama-3-8B__mlp.csv",
    ("a100", "meta-llama/Llama-2-7b-hf"): "a100__meta-llama__Llama-2-7b-hf__mlp.csv",
    ("a100", "meta-llama/Llama-2-70b-hf"): "a100__meta-llama__Llama-2-70b-hf__mlp.csv",
    ("h100", "meta-llama/Llama-2-7b-hf"): "h100__meta-llama__Llama-2-7b-hf__mlp.csv",
    ("h100", "meta-llama/Llama-2-70b-hf"): "h100__meta-llama__Llama-2-70b-hf__mlp.csv",
}
ALL_REDUCE_TABLES = {"a100": "a100_dgx__all_reduce.csv", "h100": "h100_dgx__all_reduce.csv"}
ATTENTION_TABLE = "a100__attention__combined_acb95f6.csv"
ATTENTION_GEOMETRY = {"q_heads_per_gpu": 32, "kv_heads_per_gpu": 4, "head_dim": 128}  # 70B at TP2


def non_decreasing(values: np.ndarray) -> np.ndarray:
    """The least-squares fit to `values` (in the order given) that never decreases."""
    return np.asarray(isotonic_regression(values, increasing=True).x)


def _rows(name: str) -> list[dict[str, str]]:
    text = resources.files("agent.twin").joinpath("data", name).read_text()
    return list(csv.DictReader(text.splitlines()))


@dataclass(frozen=True, slots=True)
class MlpProfile:
    """Per-layer time of one profiled model at one TP degree, as a function of batch tokens."""

    hf_name: str
    layer_params: int  # parameters of one layer of the profiled model (scales the GEMMs)
    hidden: int  # model width (scales the elementwise kernels, which stream tokens x hidden)
    tokens: np.ndarray  # ascending token counts the profile lists
    linear_ms: np.ndarray  # sum of the four GEMMs (QKV, O, gate+up, down), made non-decreasing
    elementwise_ms: np.ndarray  # norms, rotary, activation, residual add, made non-decreasing


@functools.cache
def mlp_profile(profile_gpu: str, hf_name: str, tp: int) -> MlpProfile:
    """Median op times per token count (duplicate rows averaged)."""
    samples: dict[int, list[tuple[float, float]]] = defaultdict(list)
    geometry: dict[str, int] = {}
    for row in _rows(MLP_TABLES[(profile_gpu, hf_name)]):
        if int(row["num_tensor_parallel_workers"]) != tp:
            continue
        linear = sum(float(row[f"time_stats.{op}.median"]) for op in LINEAR_OPS)
        elementwise = sum(float(row[f"time_stats.{op}.median"]) for op in ELEMENTWISE_OPS)
        samples[int(row["num_tokens"])].append((linear, elementwise))
        geometry = {k: int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd")}
    if not samples:
        raise ValueError(f"no Vidur profile for {hf_name} at TP{tp} on {profile_gpu}")
    tokens = np.array(sorted(samples), dtype=float)
    means = np.array([np.mean(samples[int(t)], axis=0) for t in tokens])
    linear_ms, elementwise_ms = non_decreasing(means[:, 0]), non_decreasing(means[:, 1])
    hidden, heads = geometry["n_embd"], geometry["n_head"]
    head_dim = hidden // heads
    layer_params = (
        hidden * (heads + 2 * geometry["n_kv_head"]) * head_dim
        + hidden * hidden
        + 3 * hidden * geometry["n_expanded_embd"]
    )
    return MlpProfile(hf_name, layer_params, hidden, tokens, linear_ms, elementwise_ms)


def reference_model(profile_gpu: str, model: ModelSpec) -> str:
    """The profiled model to derive `model` from: itself if profiled, else the closest in size."""
    candidates = [name for gpu, name in MLP_TABLES if gpu == profile_gpu]
    if model.hf_name in candidates:
        return model.hf_name
    return min(
        candidates,
        key=lambda name: abs(np.log(mlp_profile(profile_gpu, name, 1).layer_params / model.layer_params())),
    )


@dataclass(frozen=True, slots=True)
class LinearCost:
    """Per-layer linear and elementwise cost of `model`, split for the frequency model.

    A GEMM's time at max clock is ``sqrt(mem^2 + comp^2)`` (an L2 roofline blend): ``mem`` is the
    weight streaming the profile shows at small batch (the SM clock barely touches it: HBM runs on
    its own clock), ``comp`` is what more tokens add on top of it (this part slows with the SM
    clock), so the blend reproduces the measured table exactly at max clock.
    """

    memory_ms: np.ndarray  # index M -> clock-insensitive part of one layer's GEMMs
    compute_ms: np.ndarray  # index M -> clock-sensitive part of one layer's GEMMs
    elementwise_ms: np.ndarray  # index M -> elementwise kernels of one layer
    bytes_per_ms: float  # effective HBM bandwidth implied by the small-batch time
    flops_per_ms: float  # effective GEMM throughput implied by the large-batch time


def linear_cost(profile_gpu: str, model: ModelSpec, tp: int, max_tokens: int) -> LinearCost:
    """Tabulate the per-layer linear cost of `model` for 0..max_tokens batch tokens."""
    profile = mlp_profile(profile_gpu, reference_model(profile_gpu, model), tp)
    scale = model.layer_params() / profile.layer_params
    width = model.hidden / profile.hidden
    last = profile.tokens[-1]
    tokens = np.arange(max_tokens + 1, dtype=float)
    linear = np.interp(tokens, profile.tokens, profile.linear_ms) * scale
    elementwise = np.interp(tokens, profile.tokens, profile.elementwise_ms) * width
    # Beyond the last profiled count both grow linearly (compute- and bandwidth-bound).
    beyond = tokens > last
    linear[beyond] = profile.linear_ms[-1] * scale * tokens[beyond] / last
    elementwise[beyond] = profile.elementwise_ms[-1] * width * tokens[beyond] / last
    linear[0] = elementwise[0] = 0.0

    flops_per_token = 2.0 * model.layer_params() / tp
    flops_per_ms = flops_per_token * last / (profile.linear_ms[-1] * scale)
    small_batch_ms = float(np.min(profile.linear_ms[profile.tokens <= MEMORY_BOUND_TOKENS])) * scale
    # Streaming the weights costs the same whatever the batch; what the batch adds on top is
    # arithmetic. Both parts are then non-decreasing in tokens, so any rescaling of one of them
    # (another GPU's bandwidth or bf16 peak, a lower SM clock) keeps the total non-decreasing.
    memory = np.where(tokens > 0, np.minimum(small_batch_ms, linear), 0.0)
    compute = np.sqrt(np.maximum(linear**2 - memory**2, 0.0))
    return LinearCost(
        memory_ms=memory,
        compute_ms=compute,
        elementwise_ms=elementwise,
        bytes_per_ms=float(BF16_BYTES * model.layer_params() / tp / small_batch_ms),
        flops_per_ms=float(flops_per_ms),
    )


@dataclass(frozen=True, slots=True)
class AttentionFit:
    """Fitted A100 attention cost for the profiled geometry (ms per layer)."""

    decode_launch_ms: float  # fixed cost of a decode-attention kernel
    decode_bytes_per_ms: float  # effective bandwidth reading the KV cache
    prefill_launch_ms: float
    prefill_coeff: float  # t = launch + coeff * 1e-6 * P^a * (K + P/2)^b
    prefill_chunk_exp: float  # a
    prefill_context_exp: float  # b


def _kv_bytes(tokens: np.ndarray) -> np.ndarray:
    g = ATTENTION_GEOMETRY
    return tokens * g["kv_heads_per_gpu"] * g["head_dim"] * 2 * 2


@functools.cache
def attention_fit() -> AttentionFit:
    """Least-squares fits (relative error) to the Vidur A100 attention profile."""
    rows = _rows(ATTENTION_TABLE)
    decode = [r for r in rows if r["is_prefill"] == "False"]
    t = np.array([float(r["time_stats.attn_decode.median"]) for r in decode])
    kv = _kv_bytes(np.array([float(r["batch_size"]) * float(r["kv_cache_size"]) for r in decode]))
    launch, inv_bw = np.linalg.lstsq(np.column_stack([1 / t, kv / t]), np.ones_like(t), rcond=None)[0]

    prefill = [r for r in rows if r["is_prefill"] == "True"]
    tp = np.array([float(r["time_stats.attn_prefill.median"]) for r in prefill])
    chunk = np.array([float(r["prefill_chunk_size"]) for r in prefill])
    past = np.array([float(r["kv_cache_size"]) for r in prefill])
    features = np.column_stack([np.ones_like(chunk), np.log(chunk), np.log(past + chunk / 2)])
    best: tuple[float, float, np.ndarray] | None = None
    for c0 in np.linspace(0.0, 0.95 * tp.min(), 48):
        coef = np.linalg.lstsq(features, np.log(tp - c0), rcond=None)[0]
        err = float(np.median(np.abs(np.log(c0 + np.exp(features @ coef)) - np.log(tp))))
        if best is None or err < best[0]:
            best = (err, c0, coef)
    assert best is not None
    _, c0, coef = best
    return AttentionFit(
        decode_launch_ms=float(launch),
        decode_bytes_per_ms=float(1 / inv_bw),
        prefill_launch_ms=float(c0),
        prefill_coeff=float(np.exp(coef[0]) * 1e6),
        prefill_chunk_exp=float(coef[1]),
        prefill_context_exp=float(coef[2]),
    )


def attention_decode_ms(fit: AttentionFit, kv_bytes: float) -> float:
    """Decode attention of one layer reading `kv_bytes` of KV cache (profiled GPU, max clock)."""
    return fit.decode_launch_ms + kv_bytes / fit.decode_bytes_per_ms


def attention_prefill_ms(fit: AttentionFit, chunk: int, past: int, head_scale: float) -> float:
    """Prefill attention of one layer for a chunk of `chunk` tokens after `past` cached tokens."""
    work = (
        fit.prefill_coeff
        * 1e-6
        * chunk**fit.prefill_chunk_exp
        * (past + chunk / 2) ** fit.prefill_context_exp
    )
    return fit.prefill_launch_ms + work * head_scale


@functools.cache
def all_reduce_table(profile_gpu: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(log bytes, log ms) of one all-reduce among `workers` GPUs of one node (non-decreasing)."""
    points: dict[int, list[float]] = defaultdict(list)
    for row in _rows(ALL_REDUCE_TABLES[profile_gpu]):
        if int(row["num_workers"]) == workers and int(row["devices_per_node"]) == workers:
            points[int(row["size"])].append(float(row["time_stats.all_reduce.median"]))
    if not points:
        raise ValueError(f"no all-reduce profile for {workers} GPUs on {profile_gpu}")
    sizes = np.array(sorted(points), dtype=float)
    times = non_decreasing(np.array([np.mean(points[int(s)]) for s in sizes]))
    return np.log(sizes), np.log(times)


def all_reduce_bytes_per_ms(profile_gpu: str, workers: int) -> float:
    """The bandwidth NCCL reaches with the largest message profiled (bytes per ms)."""
    log_sizes, log_times = all_reduce_table(profile_gpu, workers)
    return float(np.exp(log_sizes[-1] - log_times[-1]))


def all_reduce_ms(profile_gpu: str, workers: int, size_bytes: np.ndarray | float) -> np.ndarray:
    """All-reduce time for each size (log-log interpolation; linear in bytes past the table)."""
    log_sizes, log_times = all_reduce_table(profile_gpu, workers)
    log_size = np.log(np.maximum(np.asarray(size_bytes, dtype=float), 1.0))
    inside = np.exp(np.interp(log_size, log_sizes, log_times))
    beyond = np.exp(log_times[-1] + log_size - log_sizes[-1])
    return np.where(log_size > log_sizes[-1], beyond, inside)
