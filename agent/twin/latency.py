"""Iteration time of one engine step on one GPU, as a function of batch, context and SM clock.

One iteration runs every layer once over all its tokens (prefill chunks plus one token per
decoding sequence), then the LM head over the sequences that emit a token::

    t = layers * (GEMMs + elementwise + decode attention + prefill attention + 2 all-reduces)
        + LM head + per-iteration overhead

At max clock each term comes from the Vidur profiles (`profiles.py`). The clock acts on the
compute-bound part only: a GEMM is ``sqrt(mem^2 + (S(f) * comp)^2)`` (weights stream from HBM at
a fixed memory clock; the arithmetic slows like Perseus' S(f)), prefill attention and small
kernels slow by S(f), decode attention (a KV-cache read) does not, and the per-iteration
overhead has a host part (fixed) and a device part (slows by S(f)).

GPUs other than the profiled ones scale the memory-bound parts by the HBM bandwidth ratio and
the compute-bound parts by the bf16 peak ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.domain import BF16_BYTES, GpuSpec, ModelSpec
from agent.twin import profiles
from agent.twin.frequency import frequency_response

# Profiled GPU family and the bandwidth / bf16 peak of the exact part Vidur measured.
PROFILED = {"a100": (2.039e12, 312e12), "h100": (3.35e12, 989e12)}
ATTENTION_PROFILE_GPU = "a100"  # the only attention table

# Share of each term's time that is compute-bound, for the power model.
ELEMENTWISE_COMPUTE_SHARE = 0.5
ALL_REDUCE_COMPUTE_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class EngineRuntime:
    """What the serving engine's own software adds to, or takes from, the profiled kernels.

    The GPU kernels come from Vidur's PyTorch profiles; an engine runs its own kernels and has its
    own host loop. Each field is fitted to one source's measurements of that engine (see
    `agent.twin.validation`); the defaults change nothing.
    """

    name: str
    host_ms: float = 0.20  # per iteration on the host before the GPU starts (scheduling, sampling)
    device_ms: float = 0.10  # launch gaps and tiny kernels per iteration on the GPU; slows with S(f)
    prefill_host_ms: float = 0.0  # more host work in an iteration that starts a prefill
    host_ms_per_layer: float = 0.0  # host time to launch one layer's kernels, overlapped with the GPU
    all_reduce_latency_ms: float | None = None  # small-message all-reduce; None: NCCL's, as profiled
    gemm_memory_scale: float = 1.0  # weight-streaming GEMM time relative to the profiled kernels
    gemm_compute_scale: float = 1.0  # compute-bound GEMM time relative to the profiled kernels
    kv_read_scale: float = 1.0  # decode attention's KV-cache read time relative to the profile


TRTLLM = "trtllm"  # the engine the twin serves as: TensorRT-LLM's C++ runtime and kernels
VLLM_2023 = "vllm-2023"  # the vLLM branch Splitwise profiled (2023): Python host loop, NCCL
RUNTIMES: dict[tuple[str, str], EngineRuntime] = {
    (TRTLLM, "a100"): EngineRuntime(
        TRTLLM,
        prefill_host_ms=4.36,
        all_reduce_latency_ms=0.099,
        gemm_memory_scale=0.925,
        gemm_compute_scale=0.833,
        kv_read_scale=0.998,
    ),
    (TRTLLM, "h100"): EngineRuntime(
        TRTLLM,
        prefill_host_ms=0.0,
        all_reduce_latency_ms=0.017,
        gemm_memory_scale=1.120,
        gemm_compute_scale=1.050,
        kv_read_scale=0.954,
    ),
    (VLLM_2023, "a100"): EngineRuntime(
        VLLM_2023, host_ms=3.79, prefill_host_ms=10.70, host_ms_per_layer=0.546, gemm_compute_scale=1.026
    ),
    (VLLM_2023, "h100"): EngineRuntime(
        VLLM_2023, host_ms=9.36, prefill_host_ms=9.22, host_ms_per_layer=0.279, gemm_compute_scale=1.318
    ),
}


def engine_runtime(name: str, gpu: GpuSpec) -> EngineRuntime:
    """The calibrated runtime `name` on `gpu`'s family."""
    try:
        return RUNTIMES[(name, profile_family(gpu))]
    except KeyError:
        known = sorted({runtime for runtime, _ in RUNTIMES})
        raise ValueError(f"unknown engine runtime {name!r}; known: {', '.join(known)}") from None


def default_runtime(gpu: GpuSpec) -> EngineRuntime:
    """TensorRT-LLM on `gpu`: what the twin emulates unless told otherwise."""
    return engine_runtime(TRTLLM, gpu)


@dataclass(frozen=True, slots=True)
class IterationCost:
    """Time of one iteration and how hard it worked the GPU."""

    time_s: float
    busy_fraction: float  # share of the time the GPU runs kernels (not waiting on the host)
    compute_share: float  # of the busy time, the share that is compute-bound (0 = pure streaming)
    attention_share: float = 0.0  # of the busy time, the share spent in decode attention


def all_reduce_ms(family: str, tp: int, size_bytes: np.ndarray, runtime: EngineRuntime) -> np.ndarray:
    """All-reduce time per size: NCCL's profile, or the runtime's own kernel.

    An engine with its own all-reduce (TensorRT-LLM's custom all-reduce over NVLink) pays its
    latency plus the bytes at the link bandwidth NCCL reaches with its largest messages, never
    more than NCCL itself would take.
    """
    nccl = profiles.all_reduce_ms(family, tp, size_bytes)
    if runtime.all_reduce_latency_ms is None:
        return nccl
    return np.minimum(
        nccl, runtime.all_reduce_latency_ms + size_bytes / profiles.all_reduce_bytes_per_ms(family, tp)
    )


def profile_family(gpu: GpuSpec) -> str:
    """Which profiled GPU family `gpu` is derived from."""
    family = gpu.name.split("-")[0]
    if family not in PROFILED:
        raise ValueError(f"no latency profile for GPU family {family!r} ({gpu.name})")
    return family


class LatencyModel:
    """Iteration time of `model` at TP `tp` on `gpu`, for any batch composition and clock."""

    def __init__(
        self,
        gpu: GpuSpec,
        model: ModelSpec,
        tp: int,
        max_num_tokens: int,
        runtime: EngineRuntime | None = None,
    ) -> None:
        family = profile_family(gpu)
        profiled_bw, profiled_flops = PROFILED[family]
        attn_bw, attn_flops = PROFILED[ATTENTION_PROFILE_GPU]
        self.gpu, self.model, self.tp = gpu, model, tp
        self.max_num_tokens = max_num_tokens
        self.runtime = runtime = runtime or default_runtime(gpu)
        self._response = frequency_response(gpu.max_clock_mhz, gpu.min_clock_mhz)
        self._factor_cache: dict[int, tuple[float, float]] = {}

        cost = profiles.linear_cost(family, model, tp, max_num_tokens)
        bandwidth_scale = profiled_bw / gpu.hbm_bandwidth_bytes_s
        self._mem_ms_array = cost.memory_ms * bandwidth_scale * runtime.gemm_memory_scale
        self._mem_ms = self._mem_ms_array.tolist()
        compute_scale = profiled_flops / gpu.peak_bf16_flops
        self._comp_ms_array = cost.compute_ms * compute_scale * runtime.gemm_compute_scale
        self._comp_ms = self._comp_ms_array.tolist()
        self._elem_ms_array = cost.elementwise_ms
        self._elem_ms = self._elem_ms_array.tolist()

        fit = profiles.attention_fit()
        self._attn = fit
        self._decode_launch_ms = fit.decode_launch_ms
        kv_bytes_per_token_layer = model.kv_bytes_per_token(tp) / model.layers
        self._decode_ms_per_token = (
            kv_bytes_per_token_layer
            / fit.decode_bytes_per_ms
            * attn_bw
            / gpu.hbm_bandwidth_bytes_s
            * runtime.kv_read_scale
        )
        g = profiles.ATTENTION_GEOMETRY
        heads_per_gpu = max(1, model.heads // tp)
        self._prefill_head_scale = (
            heads_per_gpu * model.head_dim / (g["q_heads_per_gpu"] * g["head_dim"])
        ) * (attn_flops / gpu.peak_bf16_flops)

        lm_bytes = BF16_BYTES * model.vocab * model.hidden / tp
        self._lm_mem_ms = lm_bytes / cost.bytes_per_ms * bandwidth_scale
        self._lm_comp_ms_per_seq = 2.0 * model.vocab * model.hidden / tp / cost.flops_per_ms * compute_scale
        sizes = np.arange(max_num_tokens + 1) * model.hidden * BF16_BYTES
        self._all_reduce_ms_array = (
            np.zeros(max_num_tokens + 1) if tp == 1 else all_reduce_ms(family, tp, sizes, runtime)
        )
        self._host_layers_ms = model.layers * runtime.host_ms_per_layer
        self._all_reduce_ms = self._all_reduce_ms_array.tolist()

    def slowdown(self, clock_mhz: int) -> float:
        """Compute-bound time multiplier at `clock_mhz` (1.0 at max clock)."""
        return self.clock_factors(clock_mhz)[0]

    def clock_factors(self, clock_mhz: int) -> tuple[float, float]:
        """(compute-bound, memory-bound) time multipliers at `clock_mhz` (1.0 at max clock)."""
        factors = self._factor_cache.get(clock_mhz)
        if factors is None:
            response = self._response
            factors = (response.slowdown_at(clock_mhz), response.memory_slowdown_at(clock_mhz))
            self._factor_cache[clock_mhz] = factors
        return factors

    def decode_time_s(
        self, clock_mhz: np.ndarray, batch: np.ndarray, context_tokens: np.ndarray
    ) -> np.ndarray:
        """Time of decode-only iterations, vectorised (broadcasts its arguments).

        The same arithmetic as `iteration` with no prefill chunks, for building exact tables
        (the `throttllem-exact` policy's "perfect model"); a test holds the two to each other.
        """
        s = np.interp(clock_mhz, self._response.clock_mhz, self._response.slowdown)
        m = np.interp(clock_mhz, self._response.clock_mhz, self._response.memory_slowdown)
        b = np.clip(np.asarray(batch, dtype=np.intp), 1, self.max_num_tokens)
        gemm = np.hypot(m * self._mem_ms_array[b], s * self._comp_ms_array[b])
        decode_attn = s * self._decode_launch_ms + m * self._decode_ms_per_token * np.asarray(context_tokens)
        layer = gemm + s * self._elem_ms_array[b] + decode_attn + 2.0 * self._all_reduce_ms_array[b]
        lm_head = np.hypot(m * self._lm_mem_ms, s * self._lm_comp_ms_per_seq * b)
        busy_ms = self.model.layers * layer + lm_head + s * self.runtime.device_ms
        return (np.maximum(busy_ms, self._host_layers_ms) + self.runtime.host_ms) / 1000.0

    def iteration(
        self,
        clock_mhz: int,
        decode_seqs: int,
        decode_context_tokens: int,
        prefill_chunks: Sequence[tuple[int, int]] = (),
    ) -> IterationCost:
        """Cost of one step.

        `decode_seqs` sequences each add one token and read `decode_context_tokens` cached
        tokens in total; each prefill chunk is (new tokens, tokens already cached).
        """
        prefill_tokens = sum(chunk for chunk, _ in prefill_chunks)
        tokens = decode_seqs + prefill_tokens
        if tokens == 0:
            raise ValueError("an iteration needs at least one token")
        if tokens > self.max_num_tokens:
            raise ValueError(f"{tokens} tokens exceed max_num_tokens={self.max_num_tokens}")
        s, m = self.clock_factors(clock_mhz)

        gemm_comp = s * self._comp_ms[tokens]
        gemm = math.hypot(m * self._mem_ms[tokens], gemm_comp)
        elem = s * self._elem_ms[tokens]
        decode_attn = (
            s * self._decode_launch_ms + m * self._decode_ms_per_token * decode_context_tokens
            if decode_seqs
            else 0.0
        )
        prefill_attn = s * sum(
            profiles.attention_prefill_ms(self._attn, chunk, past, self._prefill_head_scale)
            for chunk, past in prefill_chunks
        )
        all_reduce = 2.0 * self._all_reduce_ms[tokens]
        layer = gemm + elem + decode_attn + prefill_attn + all_reduce

        logits = decode_seqs + len(prefill_chunks)
        lm_comp = s * self._lm_comp_ms_per_seq * logits
        lm_head = math.hypot(m * self._lm_mem_ms, lm_comp)
        device_overhead = s * self.runtime.device_ms

        busy_ms = self.model.layers * layer + lm_head + device_overhead
        compute_ms = (
            self.model.layers
            * (
                gemm * (gemm_comp / gemm) ** 2
                + ELEMENTWISE_COMPUTE_SHARE * elem
                + prefill_attn
                + ALL_REDUCE_COMPUTE_SHARE * all_reduce
            )
            + lm_head * (lm_comp / lm_head) ** 2
            + device_overhead
        )
        host_ms = self.runtime.host_ms + (self.runtime.prefill_host_ms if prefill_chunks else 0.0)
        total_ms = max(busy_ms, self._host_layers_ms) + host_ms
        return IterationCost(
            time_s=total_ms / 1000.0,
            busy_fraction=busy_ms / total_ms,
            compute_share=compute_ms / busy_ms,
            attention_share=self.model.layers * decode_attn / busy_ms,
        )

    def token_floor(self, clock_mhz: int, tokens: int) -> IterationCost:
        """The cost every iteration of `tokens` tokens pays at least, whatever its batch.

        Only what scales with the tokens (GEMMs, elementwise kernels, all-reduces), one logit, the
        device overhead and the host loop: no attention and no prefill host time. Each of its
        time, busy time and compute-bound time is at most that of any batch of `tokens` tokens at
        `clock_mhz` (what it leaves out is >= 0); `agent.sim.energy_bound` charges tokens from it.
        """
        if not 1 <= tokens <= self.max_num_tokens:
            raise ValueError(f"tokens must be in 1..{self.max_num_tokens}, got {tokens}")
        s, m = self.clock_factors(clock_mhz)
        gemm_comp = s * self._comp_ms[tokens]
        gemm = math.hypot(m * self._mem_ms[tokens], gemm_comp)
        elem = s * self._elem_ms[tokens]
        all_reduce = 2.0 * self._all_reduce_ms[tokens]
        lm_comp = s * self._lm_comp_ms_per_seq
        lm_head = math.hypot(m * self._lm_mem_ms, lm_comp)
        device_overhead = s * self.runtime.device_ms
        busy_ms = self.model.layers * (gemm + elem + all_reduce) + lm_head + device_overhead
        compute_ms = (
            self.model.layers
            * (
                gemm * (gemm_comp / gemm) ** 2
                + ELEMENTWISE_COMPUTE_SHARE * elem
                + ALL_REDUCE_COMPUTE_SHARE * all_reduce
            )
            + lm_head * (lm_comp / lm_head) ** 2
            + device_overhead
        )
        total_ms = max(busy_ms, self._host_layers_ms) + self.runtime.host_ms
        return IterationCost(
            time_s=total_ms / 1000.0, busy_fraction=busy_ms / total_ms, compute_share=compute_ms / busy_ms
        )
