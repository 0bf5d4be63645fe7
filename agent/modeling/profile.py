"""Profiling sweeps: iteration timings over (batch, KV, clock, prefill) for the IPS model.

A sweep is a list of points. Each point locks one SM clock, submits a batch of requests at
once and runs them to completion, recording every engine iteration — the prefill iterations
that fill the batch, the mixed ones, the decode ones and the tail as requests finish — so the
data has the prefill/decode mix a serving engine sees. Points spread over the clock (uniform
over the supported clocks above a floor), the batch (log-uniform: load spans orders of
magnitude, so each octave gets similar coverage) and the KV-cache occupancy (uniform, ~2–95%
of capacity).

The sweep talks to a `ProfileTarget`: here the twin, in virtual time; or a live engine and GPU
(`agent.modeling.live_profile`). Point i depends only on (seed, i), so a sweep can stop and
resume, and the same seed gives the same file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import count
from typing import Any, Protocol

import numpy as np

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.control.policies import StaticPolicy
from agent.domain import Request
from agent.modeling.dataset import (
    DatasetMismatchError,
    DatasetWriter,
    Row,
    describe_mismatch,
    mismatched_keys,
)
from agent.sim.loop import Simulation
from agent.twin.gpu import UnsupportedClockError
from agent.twin.iteration_stats import IterationStats
from agent.twin.setup import TwinSetup

KV_OCCUPANCY = (0.02, 0.95)  # share of the KV cache a point's batch fills (prompt + output)
DECODE_TOKENS = (8, 64)  # decode iterations every request gets once the whole batch is running
ITERATION_MS_DECIMALS = 6  # nanoseconds: far below the jitter, keeps the CSV readable


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    """What an engine accepts: the bounds a sweep's points must respect."""

    tp: int
    max_batch_size: int
    max_num_tokens: int  # tokens per iteration; also the longest prompt without chunked context
    tokens_per_block: int
    kv_blocks: int  # KV-cache capacity
    max_seq_len: int  # prompt + output


class ProfileTarget(Protocol):
    """An engine on a GPU whose clock can be locked: the twin, or a live GPU."""

    def setup_description(self) -> dict[str, Any]:
        """JSON-ready description of the hardware and engine, for the dataset sidecar."""
        ...

    def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks the GPU accepts for a lock."""
        ...

    def limits(self) -> ProfileLimits:
        """The engine's limits."""
        ...

    def run_point(
        self, clock_mhz: int, prompts: Sequence[int], outputs: Sequence[int], point: int
    ) -> list[Row]:
        """Lock `clock_mhz`, submit all requests at once, run them to completion, reset the clock.

        Returns one row per iteration, prefill iterations included, tagged with `point` (which
        also seeds anything random the target does, so a point is reproducible on its own). A
        live target may return none (its engine showed no usable iteration): the point is then
        not written, and a resumed sweep runs it again.
        """
        ...


class TwinProfileTarget:
    """The twin as a profile target: every point is a fresh virtual-time simulation.

    A fresh engine and GPU per point make points independent (no lock or cache state outlives
    its point), so any subset can be run, or re-run on resume, with the same result; the
    point's jitter is seeded from (setup.seed, point).
    """

    def __init__(self, setup: TwinSetup) -> None:
        self.setup = setup
        self._limits = ProfileLimits(
            tp=setup.tp,
            max_batch_size=setup.engine.max_batch_size,
            max_num_tokens=setup.engine.max_num_tokens,
            tokens_per_block=setup.engine.tokens_per_block,
            kv_blocks=setup.kv_blocks(),
            max_seq_len=setup.max_seq_len,
        )

    def setup_description(self) -> dict[str, Any]:
        """GPU, model, TP, engine configuration and the twin's noise."""
        setup, engine = self.setup, self.setup.engine
        return {
            "target": "twin",
            "gpu": setup.gpu.name,
            "model": setup.model.name,
            "tp": setup.tp,
            "engine": {
                "max_batch_size": engine.max_batch_size,
                "max_num_tokens": engine.max_num_tokens,
                "tokens_per_block": engine.tokens_per_block,
                "kv_blocks": self._limits.kv_blocks,
                "max_seq_len": setup.max_seq_len,
                "scheduler": engine.scheduler.value,
                "chunked_context": engine.chunked_context,
            },
            "noise": setup.noise,
            "noise_seed": setup.seed,
            "clock_change_delay_s": setup.clock_change_delay_s,
        }

    def supported_clocks_mhz(self) -> tuple[int, ...]:
        """The GPU's NVML clock list."""
        return self.setup.gpu.sm_clocks_mhz

    def limits(self) -> ProfileLimits:
        """Limits of the twin engine."""
        return self._limits

    def run_point(
        self, clock_mhz: int, prompts: Sequence[int], outputs: Sequence[int], point: int
    ) -> list[Row]:
        """Run one point through the simulator under a static clock (see ProfileTarget)."""
        if len(prompts) != len(outputs) or not prompts:
            raise ValueError("a point needs one output length per prompt, and at least one prompt")
        seed = int(np.random.SeedSequence([self.setup.seed, point]).generate_state(1)[0])
        setup = replace(self.setup, seed=seed)
        # Submit once the lock has taken effect, as a live sweep waits for NVML before loading.
        start_s = setup.clock_change_delay_s
        requests = [
            Request(i, start_s, prompt, output, output)
            for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True))
        ]
        rows: list[Row] = []
        tp = setup.tp

        def record(stats: IterationStats) -> None:
            kv, batching = stats.kv_cache_stats, stats.inflight_batching_stats
            assert kv is not None and batching is not None and stats.iter_latency_ms is not None
            rows.append(
                Row(
                    point=point,
                    tp=tp,
                    batch=batching.num_scheduled_requests,
                    kv_blocks=kv.used_num_blocks,
                    tokens_per_block=kv.tokens_per_block,
                    prefill_tokens=batching.num_ctx_tokens,
                    clock_mhz=clock_mhz,
                    iteration_ms=round(stats.iter_latency_ms, ITERATION_MS_DECIMALS),
                )
            )

        # The GPU refuses an unsupported clock when the policy locks it (UnsupportedClockError).
        result = Simulation(setup, StaticPolicy(clock_mhz), requests, on_iteration=record).run()
        if result.rejected or result.truncated:
            raise ValueError(
                f"point {point}: the engine refused {result.rejected} and truncated {result.truncated} "
                f"of {len(requests)} requests; its prompts/outputs exceed {self._limits}"
            )
        return rows


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One profiling run: a batch of requests under one locked clock."""

    index: int
    clock_mhz: int
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]  # exact output lengths (the engine stops each request there)


def eligible_clocks(clocks: Iterable[int], min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ) -> tuple[int, ...]:
    """The clocks at or above the floor, ascending (so the order clocks are listed in is irrelevant)."""
    eligible = tuple(sorted({c for c in clocks if c >= min_clock_mhz}))
    if not eligible:
        raise ValueError(f"no clock at or above {min_clock_mhz} MHz to sweep")
    return eligible


def sweep_point(
    limits: ProfileLimits,
    clocks: Iterable[int],
    seed: int,
    index: int,
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ,
) -> SweepPoint:
    """Point `index` of the sweep with `seed`; depends on nothing else, so a sweep can resume.

    The batch's KV budget (occupancy × capacity) is split evenly over its requests, each capped
    at max_seq_len, so the whole batch fits the cache at once (every request holds at least a
    block, which bounds the batch on small caches). Without chunked context a prompt is
    prefilled in one iteration, so a batch of long prompts takes about `waits` iterations to
    start; outputs are `waits` plus 8–64 tokens (within the budget), so the whole batch decodes
    together for a while before requests finish.
    """
    rng = np.random.default_rng([seed, index])
    clock = int(rng.choice(eligible_clocks(clocks, min_clock_mhz)))
    max_batch = max(1, min(limits.max_batch_size, int(KV_OCCUPANCY[1] * limits.kv_blocks)))
    batch = min(max_batch, int(math.exp(rng.uniform(0.0, math.log(max_batch + 1)))))
    occupancy = rng.uniform(*KV_OCCUPANCY)
    blocks_each = max(1, int(occupancy * limits.kv_blocks / batch))
    per_request = max(2, min(blocks_each * limits.tokens_per_block, limits.max_seq_len))
    typical_prompt = max(1, per_request - DECODE_TOKENS[1])
    per_iteration = max(1, (limits.max_num_tokens - batch) // typical_prompt)
    waits = -(-batch // per_iteration) - 1
    decode = rng.integers(DECODE_TOKENS[0], DECODE_TOKENS[1] + 1, size=batch)
    outputs = np.clip(waits + decode, 1, per_request - 1)
    prompts = np.minimum(per_request - outputs, limits.max_num_tokens)
    return SweepPoint(index, clock, tuple(prompts.tolist()), tuple(outputs.tolist()))


def sweep_points(
    limits: ProfileLimits,
    clocks: Iterable[int],
    n_points: int,
    seed: int,
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ,
) -> list[SweepPoint]:
    """Points 0..n_points-1 of the sweep with `seed`."""
    clocks = tuple(clocks)
    return [sweep_point(limits, clocks, seed, i, min_clock_mhz) for i in range(n_points)]


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """What decides a sweep's points besides the target."""

    seed: int = 0
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ
    clocks_mhz: tuple[int, ...] | None = None  # restrict to these clocks; None: all supported

    def clocks(self, target: ProfileTarget) -> tuple[int, ...]:
        """The clocks to sweep; refuses any the target's GPU does not support."""
        supported = target.supported_clocks_mhz()
        if self.clocks_mhz is None:
            return eligible_clocks(supported, self.min_clock_mhz)
        unsupported = sorted(set(self.clocks_mhz) - set(supported))
        if unsupported:
            raise UnsupportedClockError(
                f"clocks {unsupported} MHz are not supported by the target "
                f"({min(supported)}..{max(supported)} MHz, {len(supported)} clocks)"
            )
        return eligible_clocks(self.clocks_mhz, self.min_clock_mhz)


def sweep_meta(target: ProfileTarget, config: SweepConfig) -> dict[str, Any]:
    """The dataset sidecar's description of a sweep: target setup, seed and clocks."""
    return {
        **target.setup_description(),
        "seed": config.seed,
        "min_clock_mhz": config.min_clock_mhz,
        "clocks_mhz": list(config.clocks(target)),
    }


@dataclass(frozen=True, slots=True)
class SweepProgress:
    """Where a sweep stands: totals in the file, and what this run added."""

    points: int
    rows: int
    new_points: int
    new_rows: int


def run_sweep(
    target: ProfileTarget,
    writer: DatasetWriter,
    config: SweepConfig,
    *,
    rows: int | None = None,
    points: int | None = None,
    progress: Callable[[SweepProgress], None] | None = None,
) -> SweepProgress:
    """Run the sweep's points in order, skipping those already in `writer`, until done.

    Stops after the point that brings the file to `rows` rows, or after point `points - 1`
    (whichever comes first); points are never cut, so the file may hold a few more rows.
    """
    if rows is None and points is None:
        raise ValueError("say how much to profile: rows or points")
    wanted = sweep_meta(target, config)
    if mismatched_keys(writer.meta, wanted):
        raise DatasetMismatchError(describe_mismatch(writer.path, writer.meta, wanted))
    limits, clocks = target.limits(), config.clocks(target)
    new_points = new_rows = 0
    for index in count() if points is None else range(points):
        if rows is not None and writer.rows >= rows:
            break
        if index in writer.completed_points:
            continue
        point = sweep_point(limits, clocks, config.seed, index, config.min_clock_mhz)
        written = target.run_point(point.clock_mhz, point.prompts, point.outputs, index)
        if not written:
            continue
        writer.write_point(written)
        new_points += 1
        new_rows += len(written)
        if progress is not None:
            progress(SweepProgress(len(writer.completed_points), writer.rows, new_points, new_rows))
    return SweepProgress(len(writer.completed_points), writer.rows, new_points, new_rows)
