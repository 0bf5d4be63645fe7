"""What a sweep point means on a live engine: the requests that build it, the iterations that are its.

A sweep point (`agent.modeling.profile`) is a batch of requests with exact prompt and output
lengths under one locked clock. A live engine cannot be scripted iteration by iteration, so the
point's requests go out at once and we keep what the engine reports while they run. Two things
keep that honest:

- Exact sizes. Every request asks for exactly `output` tokens (`min_tokens` = `max_tokens`, and
  `ignore_eos` over the OpenAI API), so the batch holds until the sweep's planned finish rather
  than until the model happens to stop. Prompts are exact token ids over the OpenAI API (each
  request starts with its own token, so no prefix cache shares blocks between them); over
  Triton they are text of one word per token plus the twin's `prompt_tokens`.
- An envelope. An iteration that shows more requests, KV blocks or prefill tokens than the
  point's requests can produce came from something else (traffic the profile did not send, a
  previous point's stragglers) and is dropped rather than mislabelled. The bounds allow for
  tokenizers and special tokens: Triton's text prompts tokenize to about one token per word.

Engines report iterations two ways:

- trtllm-serve's iteration stats carry each iteration's latency: one row per iteration.
- Triton's gauges show only the last iteration of each stats poll, without latency. Between two
  snapshots, (timestamp difference) / (iteration counter difference) is the mean iteration time
  of the iterations in between. It is kept only when nothing joined or left in between: once a
  snapshot has shown all the point's requests active, none can join, so the same active count at
  both ends means none left either; both ends must also decode every active request (no prefill,
  nobody paused or waiting). Rows from Triton are therefore decode-only means, and a point whose
  requests were never all active at once (early ones finished before late ones arrived) gives none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from agent.domain import EngineStats, Request
from agent.modeling.dataset import Row
from agent.modeling.profile import ITERATION_MS_DECIMALS
from agent.workloads.loadgen import request_body

APIS = ("triton", "openai")  # Triton's generate extension; OpenAI completions (trtllm-serve)
TOKEN_IDS = (1000, 30000)  # prompt token ids are drawn from here: inside any LLM vocabulary (>= 32k)
TOKEN_SLACK = 8  # tokens per request an engine may add (BOS) or a tokenizer may split differently
RELATIVE_SLACK = 0.1  # Triton text prompts tokenize to about, not exactly, one token per word


@dataclass(frozen=True, slots=True)
class PointRequest:
    """One HTTP request of a point: the path under the engine URL and the JSON body."""

    path: str
    body: dict[str, Any]


def point_requests(
    api: str, model_name: str, prompts: Sequence[int], outputs: Sequence[int], point: int, seed: int
) -> list[PointRequest]:
    """The requests that make up a point: one per (prompt, output), each asking for exact sizes.

    Token ids depend only on (seed, point, request), so a re-run point sends the same prompts.
    """
    if len(prompts) != len(outputs) or not prompts:
        raise ValueError("a point needs one output length per prompt, and at least one prompt")
    if min(*prompts, *outputs) < 1:
        raise ValueError(f"prompts and outputs must be >= 1 token, got {prompts} / {outputs}")
    requests = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        match api:
            case "triton":
                body: dict[str, Any] = {
                    **request_body(Request(i, 0.0, prompt, output, output)),
                    "stream": False,
                    "min_tokens": output,
                    "exclude_input_in_output": True,
                }
                requests.append(PointRequest(f"/v2/models/{model_name}/generate", body))
            case "openai":
                body = {
                    "model": model_name,
                    "prompt": prompt_token_ids(prompt, seed, point, i),
                    "max_tokens": output,
                    "min_tokens": output,
                    "ignore_eos": True,
                    "stream": False,
                }
                requests.append(PointRequest("/v1/completions", body))
            case _:
                raise ValueError(f"unknown API {api!r}; choose one of: {', '.join(APIS)}")
    return requests


def prompt_token_ids(length: int, seed: int, point: int, request: int) -> list[int]:
    """`length` token ids; the first differs between the requests of a point, so none share a prefix."""
    low, high = TOKEN_IDS
    rng = np.random.default_rng([seed, point, request])
    ids = rng.integers(low, high, size=length)
    ids[0] = low + request % (high - low)
    return ids.tolist()


def _tokens_at_most(tokens: int) -> int:
    """The most tokens an engine may count for `tokens` we asked for."""
    return math.ceil(tokens * (1 + RELATIVE_SLACK)) + TOKEN_SLACK


@dataclass(frozen=True, slots=True)
class PointEnvelope:
    """What an iteration of a point can show; anything beyond came from other traffic."""

    requests: int  # the point's requests: the largest batch and active count
    kv_blocks: int  # blocks all of them hold at their longest (prompt + output), with slack
    prefill_tokens: int  # all prompts at once, with slack
    tokens_per_block: int  # the engine's block size: a record with another is not this engine

    @classmethod
    def of(cls, prompts: Sequence[int], outputs: Sequence[int], tokens_per_block: int) -> PointEnvelope:
        """The envelope of the requests (prompts[i], outputs[i]) on an engine with this block size."""
        return cls(
            requests=len(prompts),
            kv_blocks=sum(
                math.ceil(_tokens_at_most(p + o) / tokens_per_block)
                for p, o in zip(prompts, outputs, strict=True)
            ),
            prefill_tokens=sum(_tokens_at_most(p) for p in prompts),
            tokens_per_block=tokens_per_block,
        )

    def holds(self, stats: EngineStats) -> bool:
        """True if the point's requests alone can explain this iteration."""
        return (
            1 <= stats.scheduled_requests <= self.requests
            and stats.active_requests <= self.requests
            and stats.kv_blocks_used <= self.kv_blocks
            and stats.context_tokens <= self.prefill_tokens
            and stats.tokens_per_block == self.tokens_per_block
        )


@dataclass(frozen=True, slots=True)
class Matched:
    """Rows of one point, and how many of the engine's records could not become one."""

    rows: tuple[Row, ...]
    dropped: int  # records outside the envelope, without a latency, or (Triton) not a decode window


def _row(stats: EngineStats, iteration_ms: float, point: int, tp: int, clock_mhz: int) -> Row:
    return Row(
        point=point,
        tp=tp,
        batch=stats.scheduled_requests,
        kv_blocks=stats.kv_blocks_used,
        tokens_per_block=stats.tokens_per_block,
        prefill_tokens=stats.context_tokens,
        clock_mhz=clock_mhz,
        iteration_ms=round(iteration_ms, ITERATION_MS_DECIMALS),
    )


def rows_from_iterations(
    records: Sequence[EngineStats], envelope: PointEnvelope, *, point: int, tp: int, clock_mhz: int
) -> Matched:
    """One row per iteration record that fits the envelope and has a positive latency (trtllm-serve)."""
    rows = [
        _row(s, s.iteration_latency_s * 1000.0, point, tp, clock_mhz)
        for s in records
        if envelope.holds(s) and s.iteration_latency_s is not None and s.iteration_latency_s > 0
    ]
    return Matched(tuple(rows), len(records) - len(rows))


def _decodes_all(stats: EngineStats) -> bool:
    """Every active request is in the batch, decoding."""
    return (
        stats.context_requests == stats.context_tokens == 0
        and stats.scheduled_requests == stats.active_requests
    )


def rows_from_snapshots(
    snapshots: Sequence[EngineStats], envelope: PointEnvelope, *, point: int, tp: int, clock_mhz: int
) -> Matched:
    """One row per pair of consecutive snapshots that bound a decode window of fixed requests (Triton).

    The row describes the window's last iteration; its time is the window's mean iteration time.
    """
    rows: list[Row] = []
    all_in = False  # a snapshot has shown every request of the point active: none can join any more
    for a, b in pairwise(snapshots):
        all_in = all_in or (envelope.holds(a) and a.active_requests == envelope.requests)
        if (
            all_in
            and envelope.holds(a)
            and envelope.holds(b)
            and b.iteration > a.iteration
            and b.timestamp_s > a.timestamp_s
            and a.active_requests == b.active_requests
            and _decodes_all(a)
            and _decodes_all(b)
        ):
            ms = (b.timestamp_s - a.timestamp_s) * 1000.0 / (b.iteration - a.iteration)
            rows.append(_row(b, ms, point, tp, clock_mhz))
    return Matched(tuple(rows), max(len(snapshots) - 1, 0) - len(rows))
