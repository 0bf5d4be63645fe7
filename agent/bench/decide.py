"""How long one throttllem decision takes with a full scoreboard (the paper: tens of ms)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from agent.control.admission import EngineLimits
from agent.control.policies import ControlView, ThrottllemPolicy
from agent.control.scoreboard import Scoreboard
from agent.domain import EngineStats, Request
from agent.twin.simulator import TwinSetup


def full_scoreboard(running: int, queued: int, seed: int) -> Scoreboard:
    """`running` decoding requests and `queued` waiting ones with conv-like lengths."""
    rng = np.random.default_rng(seed)
    board = Scoreboard(capacity=running + queued)
    for i in range(running + queued):
        prompt = int(rng.lognormal(np.log(1020), 0.77))
        output = int(rng.lognormal(np.log(129), 0.93)) + 2
        board.add_queued(
            Request(i, -float(running + queued - i) / 10, min(prompt, 6000), 2048, output), output
        )
        if i < running:
            board.admit(i)
            board.first_token(i, -1.0)
            board.add_tokens(i, int(rng.integers(0, output)))
    return board


def benchmark_decide(
    policy: ThrottllemPolicy, setup: TwinSetup, running: int, queued: int, repeats: int, seed: int
) -> dict[str, Any]:
    """p50/p99 of `decide` on a fixed scoreboard (each call starts from the same guard state)."""
    board = full_scoreboard(running, queued, seed)
    limits = EngineLimits(
        kv_blocks=setup.kv_blocks(),
        tokens_per_block=setup.engine.tokens_per_block,
        max_batch_size=max(setup.engine.max_batch_size, running + queued),
        max_num_tokens=setup.engine.max_num_tokens,
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
        limits.kv_blocks // 2,
        limits.kv_blocks,
        limits.tokens_per_block,
        0.03,
    )
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
        "search": "bisection" if policy.bisect else "all clocks at once",
    }
