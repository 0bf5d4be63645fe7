"""One engine on one GPU as the twin builds it, and the requests that engine can take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from agent.domain import GpuSpec, ModelSpec, Request
from agent.twin.gpu import DEFAULT_CLOCK_CHANGE_DELAY_S
from agent.twin.latency import LatencyModel
from agent.twin.memory import EngineConfig, kv_cache_blocks


@dataclass(frozen=True, slots=True)
class TwinSetup:
    """One engine on one GPU: everything the twin needs besides the workload and the policy."""

    gpu: GpuSpec
    model: ModelSpec
    tp: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    clock_change_delay_s: float = DEFAULT_CLOCK_CHANGE_DELAY_S
    noise: float = 0.0  # sigma of log-normal jitter on each iteration's time (0 = exact)
    seed: int = 0

    @property
    def max_seq_len(self) -> int:
        """Prompt + output limit of the engine."""
        return self.engine.max_seq_len or self.model.max_context_tokens

    def kv_blocks(self) -> int:
        """KV-cache capacity (raises ModelDoesNotFitError when nothing fits)."""
        return kv_cache_blocks(self.gpu, self.model, self.tp, self.engine)

    def latency_model(self) -> LatencyModel:
        """The iteration-time model of this setup."""
        return LatencyModel(self.gpu, self.model, self.tp, self.engine.max_num_tokens)


def fit_to_engine(requests: Sequence[Request], setup: TwinSetup) -> tuple[list[Request], int]:
    """Truncate prompts the way a client does to fit the model's window; returns (requests, count)."""
    max_prompt = setup.max_seq_len
    if not setup.engine.chunked_context:
        max_prompt = min(max_prompt, setup.engine.max_num_tokens)
    fitted: list[Request] = []
    truncated = 0
    for req in requests:
        max_tokens = min(req.max_tokens, setup.max_seq_len - 1)
        prompt = min(req.prompt_tokens, max_prompt, setup.max_seq_len - max_tokens)
        if (prompt, max_tokens) != (req.prompt_tokens, req.max_tokens):
            truncated += 1
            output = None if req.output_tokens is None else min(req.output_tokens, max_tokens)
            req = replace(req, prompt_tokens=prompt, max_tokens=max_tokens, output_tokens=output)
        fitted.append(req)
    return fitted, truncated
