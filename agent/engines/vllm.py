"""vLLM (V1 engine): `EngineStats` from its Prometheus metrics, with documented approximations.

vLLM exports no iteration counter, no block counts and no per-iteration batch composition
(reference/interfaces.md §3.1), so some fields are derived. Exact:

- `active_requests` = `scheduled_requests` = `vllm:num_requests_running` (requests in the batch);
- `queued_requests` = `vllm:num_requests_waiting` (includes preempted requests, which vLLM puts
  back in the waiting queue, so `paused_requests` is always 0).

Approximated, over the engine steps since the previous poll (or since the engine started, on the
first poll and after a restart, when the counters restart from 0):

- `iteration`: the count of the `vllm:iteration_tokens_total` histogram, observed once per engine
  step that produced output; it going backwards is an engine restart. A count of 0 means no step
  yet (None); an unchanged count means nothing new (None).
- `timestamp_s`: the sidecar's wall clock when the scrape was read (vLLM exports no engine time).
- `context_tokens`: prefill tokens per step, the increase of `vllm:prompt_tokens_total` over the
  number of steps. vLLM counts a prompt when its prefill finishes, so chunked prefills are
  credited to their last chunk.
- `generation_requests`: generated tokens per step (increase of `vllm:generation_tokens_total`
  over steps), since each decoding request yields one token per step without speculative
  decoding; capped at the running count. `context_requests` is the rest of the running requests,
  at least 1 when prompt tokens were processed and 0 when none were.
- `kv_blocks_used` = round(`vllm:kv_cache_usage_perc` x `kv_blocks_max`); the older
  `vllm:gpu_cache_usage_perc` is read when the new name is absent.
- `kv_blocks_max` and `tokens_per_block`: the constructor's values, else the `num_gpu_blocks` and
  `block_size` labels of `vllm:cache_config_info`; `tokens_per_block` defaults to vLLM's 16.
- `iteration_latency_s`: None (a histogram of per-step time is not exported).

Counters that go backwards without the step count doing so are read as reset to 0 (as
Prometheus' `increase()` does). `model_name` and `engine` labels select one engine (data
parallelism exports one `engine` per rank); by default the only one present.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Unpack

from agent.domain import EngineStats
from agent.engines.base import (
    MAX_COUNT,
    MAX_COUNTER,
    IterationChange,
    MalformedMetricsError,
    MissingMetricsError,
    plausible,
)
from agent.engines.http import HttpOptions, HttpPollingAdapter
from agent.engines.prometheus_text import Samples, count, label_choices, parse_samples, select, value

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_DEPRECATED = "vllm:gpu_cache_usage_perc"  # deprecated in 0.9, gone by ~0.12
STEPS = "vllm:iteration_tokens_total_count"  # sample of the vllm:iteration_tokens_total histogram
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
CACHE_CONFIG = "vllm:cache_config_info"  # labels: CacheConfig fields and `engine` (no model_name)
DEFAULT_TOKENS_PER_BLOCK = 16  # vLLM's default --block-size on GPUs
_KEYS = ("model_name", "engine")
_HINT = "check the URL is a vLLM (V1) server's /metrics and that its version exports them"


@dataclass(frozen=True, slots=True)
class VllmReading:
    """What one scrape says about one vLLM engine; counters are cumulative, as exported."""

    running: int  # requests in the batch
    waiting: int  # requests queued or preempted
    kv_usage: float  # fraction of KV-cache blocks in use, 0..1
    steps: int  # engine steps observed: the iteration-tokens histogram count
    prompt_tokens: int  # counter: prefill tokens processed
    generation_tokens: int  # counter: tokens generated
    kv_blocks_max: int  # blocks in the KV-cache pool
    tokens_per_block: int


def _series(name: str, match: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in match.items()) + "}"


def _cache_config(samples: Samples, engine: str) -> dict[str, str]:
    for sample in samples.get(CACHE_CONFIG, ()):
        if sample.labels.get("engine") == engine:
            return sample.labels
    return {}


def _config_int(config: dict[str, str], key: str) -> int | None:
    """An integer label of `vllm:cache_config_info`; vLLM writes "None" for an unset field."""
    raw = config.get(key, "None")
    if raw == "None":
        return None
    try:
        number = int(raw)
    except ValueError as exc:
        raise MalformedMetricsError(f'{CACHE_CONFIG}{{{key}="{raw}"}} is not an integer') from exc
    if not 0 <= number <= MAX_COUNT:
        raise MalformedMetricsError(f'{CACHE_CONFIG}{{{key}="{raw:.40}"}} is not a count (0..{MAX_COUNT})')
    return number


def read_vllm(
    samples: Samples,
    *,
    model_name: str | None = None,
    engine: str | None = None,
    kv_blocks_max: int | None = None,
    tokens_per_block: int | None = None,
) -> VllmReading:
    """One engine's metrics; the KV geometry from the arguments, else from `vllm:cache_config_info`.

    Raises `MissingMetricsError` naming absent metrics, `EngineConfigError` when the engine
    selection is ambiguous or matches nothing, `MalformedMetricsError` for values that are not
    counts.
    """
    names = (RUNNING, WAITING, KV_USAGE, KV_USAGE_DEPRECATED, STEPS)
    choices = label_choices(samples, names, _KEYS)
    if not choices:
        raise MissingMetricsError((RUNNING, WAITING, KV_USAGE, "vllm:iteration_tokens_total"), _HINT)
    match = dict(zip(_KEYS, select(choices, (model_name, engine), _KEYS, "vLLM metrics"), strict=True))
    raw = {name: value(samples, name, match) for name in (*names, PROMPT_TOKENS, GENERATION_TOKENS)}
    missing = [name for name in (RUNNING, WAITING, PROMPT_TOKENS, GENERATION_TOKENS) if raw[name] is None]
    usage = raw[KV_USAGE] if raw[KV_USAGE] is not None else raw[KV_USAGE_DEPRECATED]
    if usage is None:
        missing.append(f"{KV_USAGE} (or {KV_USAGE_DEPRECATED})")
    if raw[STEPS] is None:
        missing.append("vllm:iteration_tokens_total")
    config = _cache_config(samples, match["engine"])
    blocks = kv_blocks_max if kv_blocks_max is not None else _config_int(config, "num_gpu_blocks")
    if blocks is None:
        missing.append(f"{CACHE_CONFIG}{{num_gpu_blocks}}")
    if usage is None or blocks is None or missing:
        geometry = "; or pass kv_blocks_max (vLLM logs its KV-cache size at start)" if blocks is None else ""
        raise MissingMetricsError(tuple(missing), _HINT + geometry)
    if blocks <= 0:
        raise MalformedMetricsError(f"a KV-cache of {blocks} blocks; pass kv_blocks_max > 0")
    if not math.isfinite(usage):
        raise MalformedMetricsError(f"KV-cache usage is {usage}")
    counts = {
        name: count(v, _series(name, match), MAX_COUNT if name in (RUNNING, WAITING) else MAX_COUNTER)
        for name, v in raw.items()
        if v is not None and name not in (KV_USAGE, KV_USAGE_DEPRECATED)
    }
    return VllmReading(
        running=counts[RUNNING],
        waiting=counts[WAITING],
        kv_usage=min(max(usage, 0.0), 1.0),
        steps=counts[STEPS],
        prompt_tokens=counts[PROMPT_TOKENS],
        generation_tokens=counts[GENERATION_TOKENS],
        kv_blocks_max=blocks,
        tokens_per_block=tokens_per_block or _config_int(config, "block_size") or DEFAULT_TOKENS_PER_BLOCK,
    )


def _increase(previous: int, current: int) -> int:
    """Counter increase; a counter below its previous value was reset to 0 and counts from there."""
    return current - previous if current >= previous else current


def vllm_engine_stats(
    previous: VllmReading | None, current: VllmReading, *, timestamp_s: float
) -> EngineStats:
    """`EngineStats` for the steps between two readings (`previous` None: since the engine started).

    The caller guarantees `current` has more steps than `previous` (or `previous` is None); see
    the module docstring for each approximation.
    """
    if previous is None:  # counters count from 0 at engine start
        steps, prompt, generated = current.steps, current.prompt_tokens, current.generation_tokens
    else:
        steps = current.steps - previous.steps
        prompt = _increase(previous.prompt_tokens, current.prompt_tokens)
        generated = _increase(previous.generation_tokens, current.generation_tokens)
    running = current.running
    if prompt > 0:
        decoding = min(running, round(generated / steps))
        context_requests = min(running, max(1, running - decoding))
    else:
        context_requests = 0
    return EngineStats(
        timestamp_s=timestamp_s,
        iteration=current.steps,
        active_requests=running,
        queued_requests=current.waiting,
        scheduled_requests=running,
        context_requests=context_requests,
        generation_requests=running - context_requests,
        paused_requests=0,
        context_tokens=round(prompt / steps),
        kv_blocks_used=round(current.kv_usage * current.kv_blocks_max),
        kv_blocks_max=current.kv_blocks_max,
        tokens_per_block=current.tokens_per_block,
        iteration_latency_s=None,
    )


class VllmAdapter(HttpPollingAdapter):
    """Scrapes a vLLM server's `/metrics` (its API port, default 8000) for one engine.

    `model_name` / `engine` select the engine by label (None: the only one); `kv_blocks_max` and
    `tokens_per_block` override what `vllm:cache_config_info` says; `wall_clock` stamps readings
    (epoch seconds). `http`: timeout and session, see `HttpPollingAdapter`.
    """

    kind = "vllm"
    accept = "text/plain; version=0.0.4"

    def __init__(
        self,
        url: str,
        *,
        model_name: str | None = None,
        engine: str | None = None,
        kv_blocks_max: int | None = None,
        tokens_per_block: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        **http: Unpack[HttpOptions],
    ) -> None:
        for setting, given in (("kv_blocks_max", kv_blocks_max), ("tokens_per_block", tokens_per_block)):
            if given is not None and given <= 0:
                raise ValueError(f"{setting} must be positive, got {given}")
        super().__init__(url, **http)
        self.model_name = model_name
        self.engine = engine
        self.kv_blocks_max = kv_blocks_max
        self.tokens_per_block = tokens_per_block
        self._wall_clock = wall_clock
        self._previous: VllmReading | None = None

    def _ingest(self, body: str) -> list[EngineStats]:
        reading = read_vllm(
            parse_samples(body),
            model_name=self.model_name,
            engine=self.engine,
            kv_blocks_max=self.kv_blocks_max,
            tokens_per_block=self.tokens_per_block,
        )
        if reading.steps == 0:
            return []
        change = self._observe(reading.steps)
        if change is IterationChange.SAME:
            return []
        previous = None if change is IterationChange.RESTART else self._previous
        self._previous = reading
        return [plausible(vllm_engine_stats(previous, reading, timestamp_s=self._wall_clock()))]
