"""Engine configuration and how much KV cache fits beside the weights.

Follows TensorRT-LLM: after the engine (weights) and its activation buffers are loaded, the KV
cache takes `kv_cache_free_gpu_mem_fraction` (default 0.9) of the remaining free memory, in
blocks of `tokens_per_block` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.domain import BF16_BYTES, GpuSpec, ModelSpec

GIB = 1024**3
RUNTIME_RESERVED_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, TRT-LLM runtime
MAX_TP = 8  # Vidur profiles TP up to 8 (one DGX node)


class SchedulerPolicy(StrEnum):
    """TensorRT-LLM capacity scheduler policies."""

    GUARANTEED_NO_EVICT = "guaranteed_no_evict"  # admit only if KV for max_tokens is guaranteed
    MAX_UTILIZATION = "max_utilization"  # admit on current need; pause requests when KV runs out


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Build- and run-time settings of one TensorRT-LLM engine (names follow trtllm-build)."""

    max_batch_size: int = 256
    max_num_tokens: int = 8192  # tokens per iteration (prefill chunks + one per decoding request)
    tokens_per_block: int = 64
    kv_cache_free_gpu_mem_fraction: float = 0.9
    scheduler: SchedulerPolicy = SchedulerPolicy.GUARANTEED_NO_EVICT
    chunked_context: bool = False  # split long prompts across iterations
    max_seq_len: int | None = None  # prompt + output limit; None: the model's context window

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "tokens_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ValueError("kv_cache_free_gpu_mem_fraction must be in (0, 1]")


class ModelDoesNotFitError(ValueError):
    """The model, at this TP degree, does not fit the GPU with room for any KV cache."""


def activation_bytes(model: ModelSpec, tp: int, config: EngineConfig) -> int:
    """Activation buffers TensorRT-LLM sizes for `max_num_tokens` tokens per iteration."""
    per_token = 4 * model.hidden + 2 * model.intermediate // tp
    return config.max_num_tokens * per_token * BF16_BYTES


def kv_cache_blocks(gpu: GpuSpec, model: ModelSpec, tp: int, config: EngineConfig) -> int:
    """KV-cache blocks one GPU holds; refuses configurations that cannot serve one sequence."""
    if not 1 <= tp <= MAX_TP or tp & (tp - 1):
        raise ModelDoesNotFitError(f"TP degree must be a power of two from 1 to {MAX_TP}, got {tp}")
    weights = model.weight_bytes_per_gpu(tp)
    used = weights + activation_bytes(model, tp, config) + RUNTIME_RESERVED_BYTES
    free = gpu.memory_bytes - used
    kv_bytes = free * config.kv_cache_free_gpu_mem_fraction
    block_bytes = model.kv_bytes_per_token(tp) * config.tokens_per_block
    blocks = int(kv_bytes // block_bytes) if kv_bytes > 0 else 0
    seq_len = config.max_seq_len or model.max_context_tokens
    needed = -(-seq_len // config.tokens_per_block)
    if blocks < needed:
        raise ModelDoesNotFitError(
            f"{model.name} at TP{tp} does not fit on {gpu.name}: weights take "
            f"{weights / GIB:.1f} GiB per GPU of {gpu.memory_bytes / GIB:.0f} GiB, leaving KV cache for "
            f"{blocks * config.tokens_per_block} tokens; one {seq_len}-token sequence needs "
            f"{needed * config.tokens_per_block}. Use a larger TP degree or a bigger GPU."
        )
    return blocks
