"""Value types shared by every layer: the seams between the core, the twin and the sidecar.

All are frozen: a value crossing a seam is never mutated. Units are in the field names; `None`
means "unknown", never zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BF16_BYTES = 2

# Inputs of the iterations-per-second model, in column order (ONNX input and dataset columns).
IPS_FEATURES = ("tp", "batch", "kv_blocks", "clock_mhz", "prefill_tokens")


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model as NVML and its datasheet describe it."""

    name: str  # catalog key, e.g. "a100-sxm4-80gb"
    product_name: str  # what nvmlDeviceGetName returns, e.g. "NVIDIA A100-SXM4-80GB"
    sm_clocks_mhz: tuple[int, ...]  # supported SM clocks, highest first (as NVML lists them)
    memory_bytes: int  # HBM capacity
    hbm_bandwidth_bytes_s: float  # datasheet peak HBM bandwidth
    peak_bf16_flops: float  # dense bf16 tensor-core peak at max SM clock
    tdp_w: float  # board power limit; compute-bound work at max clock draws about this
    min_power_limit_w: float  # lowest board power limit NVML accepts (its max is tdp_w)
    idle_w: float  # idle with a CUDA context held (an inference server is always running)
    calibrated_clock_floor_mhz: int  # lowest clock the frequency data covers; below: extrapolated

    @property
    def max_clock_mhz(self) -> int:
        """Highest supported SM clock: what a stock GPU boosts to when busy."""
        return self.sm_clocks_mhz[0]

    @property
    def min_clock_mhz(self) -> int:
        """Lowest clock NVML accepts for a lock."""
        return self.sm_clocks_mhz[-1]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense decoder-only transformer (Llama family), served in bf16."""

    name: str  # catalog key, e.g. "llama3-8b"
    hf_name: str  # the Hugging Face repository it describes
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int  # gated-MLP inner size
    vocab: int
    max_context_tokens: int  # trained context window

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer: QKV, O, gate+up, down, two RMSNorms."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        out = self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return qkv + out + mlp + 2 * self.hidden

    def params(self) -> int:
        """Total parameters: layers, input embedding, LM head (untied) and the final norm."""
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden

    def weight_bytes_per_gpu(self, tp: int) -> int:
        """Bf16 weight bytes on each GPU when every layer and the LM head are split across `tp`."""
        return math.ceil(self.params() * BF16_BYTES / tp)

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads each GPU holds: split across TP, replicated once TP exceeds the KV head count."""
        return max(1, self.kv_heads // tp)

    def kv_bytes_per_token(self, tp: int) -> int:
        """KV-cache bytes per token on each GPU (K and V, every layer, bf16)."""
        return 2 * self.layers * self.kv_heads_per_gpu(tp) * self.head_dim * BF16_BYTES


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as a workload or the gateway sees it."""

    request_id: int  # unique within a run
    arrival_s: float  # seconds from the start of the run (virtual or wall clock)
    prompt_tokens: int  # input length
    max_tokens: int  # the client's output limit; the engine reserves KV for it
    output_tokens: int | None = None  # true output length (from a trace); None when unknown (live)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One iteration-level snapshot of an engine, as TRT-LLM / vLLM report it."""

    timestamp_s: float  # end of the iteration, seconds (engine clock)
    iteration: int  # engine's iteration counter; resets when the engine restarts
    active_requests: int  # admitted and not finished (scheduled + paused + waiting for KV)
    queued_requests: int | None  # waiting to enter the engine; Triton does not export it
    scheduled_requests: int  # in this iteration's batch
    context_requests: int  # of which in prefill
    generation_requests: int  # of which decoding
    paused_requests: int  # preempted (max_utilization) and waiting to resume
    context_tokens: int  # prefill tokens processed this iteration
    kv_blocks_used: int
    kv_blocks_max: int
    tokens_per_block: int
    iteration_latency_s: float | None  # known from TRT-LLM iteration stats; None from Prometheus


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets one request is held to."""

    ttft_s: float | None  # time to first token; None: not a target (as in the paper)
    tbt_s: float  # time between tokens (mean over a request, as the paper and MLPerf TPOT use)
    e2e_s: float | None  # arrival to last token; None: not a target


@dataclass(frozen=True, slots=True)
class Decision:
    """What a policy decided for the next control period."""

    sm_clock_mhz: int | None  # clock to lock; None: leave the GPU at stock (unlocked) behaviour
    admit_request_ids: tuple[int, ...] = ()  # queued requests the engine may start now
    # Board power limit per GPU, W; None: the default limit (TDP), as sm_clock_mhz=None is stock.
    power_limit_w: float | None = None
