"""Engine adapters: read a real inference engine's telemetry as the core's `EngineStats`.

One adapter per engine kind, all behind the `EngineAdapter` protocol (`agent.engines.base`):
Triton with the TensorRT-LLM backend, trtllm-serve, and vLLM.
"""

from __future__ import annotations

from typing import Any

from agent.engines.base import EngineAdapter

ENGINE_KINDS = ("triton", "trtllm-serve", "vllm")


def build_adapter(kind: str, url: str, **opts: Any) -> EngineAdapter:
    """The adapter for `kind`, reading `url` (a bare host URL gets "/metrics" appended).

    `opts` go to the adapter's constructor (e.g. `model=` for Triton, `kv_blocks_max=` for vLLM,
    `timeout_s=` for all). The adapter modules are imported here, not at package import, so that
    `agent.engines.trtllm_stats` (which the twin shares) does not pull in aiohttp.
    """
    match kind:
        case "triton":
            from agent.engines.triton_trtllm import TritonTrtllmAdapter

            return TritonTrtllmAdapter(url, **opts)
        case "trtllm-serve":
            from agent.engines.trtllm_serve import TrtllmServeAdapter

            return TrtllmServeAdapter(url, **opts)
        case "vllm":
            from agent.engines.vllm import VllmAdapter

            return VllmAdapter(url, **opts)
    raise ValueError(f"unknown engine kind {kind!r}; choose one of: {', '.join(ENGINE_KINDS)}")
