"""How long one throttllem decision takes with a full scoreboard (the paper: tens of ms)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from agent.control.policies import ControlView, ThrottllemPolicy
from agent.control.scoreboard import Scoreboard
from agent.domain import EngineStats, Request
from agent.sim.policies import setup_limits
from agent.twin.setup import TwinSetup

KV_FILL = 0.7  # share of the KV cache the running requests hold: a busy engine, not an overflowing one
PROMPT_MEDIAN_TOKENS = 256  # a quarter of the conv trace's median prompt
ON_TRACK_SHARE = 0.6  # running requests have emitted tokens at this share of the TPOT target
QUEUE_SPREAD_S = 0.9  # queued requests arrived within this window: none urgent yet (TTFT 2 s)


def full_scoreboard(running: int, queued: int, seed: int, kv_tokens: int, tpot_s: float) -> Scoreboard:
    """A busy engine: `running` healthy decoding requests holding KV_FILL of `kv_tokens`, `queued` fresh.

    Lengths are log-normal like the conv trace's, but prompts are a quarter as long: at this
    concurrency conv-length prompts would arrive faster than the engine can prefill them, and the
    decision would rightly give up and run at max clock. Contexts are scaled down further if the
    batch would not fit the cache. Running requests are on track for their TPOT target, so the
    decision has a real admission and clock search to do.
    """
    rng = np.random.default_rng(seed)
    total = running + queued
    prompts = np.minimum(rng.lognormal(np.log(PROMPT_MEDIAN_TOKENS), 0.77, total), 6000)
    outputs = (rng.lognormal(np.log(129), 0.93, total) + 2).astype(int)
    generated = (rng.random(running) * outputs[:running]).astype(int)
    scale = min(1.0, KV_FILL * kv_tokens / max(float(prompts[:running].sum() + generated.sum()), 1.0))
    prompts = np.maximum(prompts * scale, 1)  # one workload: queued prompts are as short
    board = Scoreboard(capacity=total)
    for i in range(total):
        is_running = i < running
        first_token = -ON_TRACK_SHARE * tpot_s * generated[i] if is_running else 0.0
        arrival = first_token - 0.5 if is_running else -QUEUE_SPREAD_S * (total - i) / queued
        board.add_queued(Request(i, arrival, int(prompts[i]), 2048, int(outputs[i])), int(outputs[i]))
        if is_running:
            board.admit(i)
            board.first_token(i, first_token)
            board.add_tokens(i, int(generated[i]))
    return board


def benchmark_decide(
    policy: ThrottllemPolicy, setup: TwinSetup, running: int, queued: int, repeats: int, seed: int
) -> dict[str, Any]:
    """p50/p99 of `decide` on a fixed scoreboard (each call starts from the same guard state)."""
    engine = setup_limits(setup)
    limits = replace(engine, max_batch_size=max(engine.max_batch_size, running + queued))
    board = full_scoreboard(
        running, queued, seed, limits.kv_blocks * limits.tokens_per_block, policy.targets.tpot_s
    )
    stats = EngineStats(
        0.0,
        1,
        running,
        queued,
        running,
        0,
        running,
        0,
        0,
        int(KV_FILL * limits.kv_blocks),
        limits.kv_blocks,
        limits.tokens_per_block,
        0.03,
    )
    order = np.argsort(board.view().run_arrival_s)
    policy.record_arrivals(board.view().run_arrival_s[order], board.view().run_prompt[order])
    view = ControlView(0.0, setup.gpu, stats, limits, board.view(), setup.gpu.max_clock_mhz)
    guard = policy.guard
    samples = np.empty(repeats)
    for i in range(repeats):
        policy.guard = guard
        start = time.perf_counter()
        decision = policy.decide(replace(view, now_s=0.001 * i))
        samples[i] = time.perf_counter() - start
    return {
        "running": running,
        "queued": queued,
        "repeats": repeats,
        "decide_p50_ms": float(np.percentile(samples, 50) * 1e3),
        "decide_p99_ms": float(np.percentile(samples, 99) * 1e3),
        "clock_mhz": decision.sm_clock_mhz,
        "admitted": len(decision.admit_request_ids),
        "candidate_clocks": len(policy.model.clocks_mhz),
        "search": policy.search,
    }
