"""One engine iteration on the twin GPU, the step both the virtual-time loop and the real-time server run.

`run_on_gpu` costs a batch at the clock in force (lowered under a power limit, as the GPU's power
controller does: `agent.twin.power_limit`), jitters its duration and accounts its energy;
`engine_stats` and `iteration_stats` describe the iteration as the engine reports it: the
statistics a controller reads, and the record TRT-LLM's executor logs. Sharing this step is what
makes `agent.sim` and `agent.twin.server` run the same twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.domain import EngineStats
from agent.twin.engine import Batch, Engine, IterationOutcome
from agent.twin.gpu import EngineGpus
from agent.twin.iteration_stats import InflightBatchingStats, IterationStats, KvCacheStats
from agent.twin.latency import IterationCost, LatencyModel
from agent.twin.memory import RUNTIME_RESERVED_BYTES, activation_bytes
from agent.twin.power_limit import capped_clock_mhz
from agent.twin.setup import TwinSetup

NOISE_BLOCK = 4096  # jitter samples drawn at once


class Jitter:
    """Log-normal multipliers on iteration time (mean 1), drawn in blocks from one seeded generator."""

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = sigma  # 0: no jitter, every multiplier is exactly 1
        self._rng = np.random.default_rng(seed)
        self._block: list[float] = []

    def next(self) -> float:
        """The next multiplier."""
        if self.sigma <= 0:
            return 1.0
        if not self._block:
            sigma = self.sigma
            self._block = np.exp(sigma * self._rng.standard_normal(NOISE_BLOCK) - sigma**2 / 2).tolist()
        return self._block.pop()


@dataclass(frozen=True, slots=True)
class GpuIteration:
    """One batch on the GPU: the clock it ran at, what it cost, and its jittered duration and power."""

    start_s: float
    clock_mhz: int  # the clock it ended at (a change that took effect while it ran applies from then)
    cost: IterationCost  # its cost at that clock
    duration_s: float
    power_w: float  # mean power over the iteration, all the engine's GPUs
    power_capped: bool = False  # ran below the requested clock to keep the power limit (SwPowerCap)

    @property
    def end_s(self) -> float:
        """When the iteration ends."""
        return self.start_s + self.duration_s


def run_on_gpu(
    gpu: EngineGpus, latency: LatencyModel, batch: Batch, start_s: float, jitter: Jitter
) -> GpuIteration:
    """Cost `batch` from `start_s` on and account its energy on `gpu`.

    The iteration starts at the clock in force at `start_s`. A clock change that takes effect
    while it runs applies from that moment, as on a real GPU, where a lock changes the clock under
    a running kernel: the work left then runs at the new clock. (Holding the old clock to the end
    would run a burst's 800-ms prefill at the clock that was set for the decodes before it.)
    Shared by the virtual-time simulator and the real-time server, so both run the same twin.
    """
    requested = gpu.busy_clock_mhz(start_s)
    clock, cost = _clock_and_cost(gpu, latency, batch, requested)
    stretch = jitter.next()
    duration = cost.time_s * stretch
    change = gpu.change_within(start_s, start_s + duration)
    if change is None:
        power = gpu.run_busy(clock, duration, cost)
        return GpuIteration(start_s, clock, cost, duration, power, clock < requested)
    changed_s, requested = change
    head_s = changed_s - start_s
    head_w = gpu.run_busy(clock, head_s, cost)
    clock, cost = _clock_and_cost(gpu, latency, batch, requested)
    tail_s = (1.0 - head_s / duration) * cost.time_s * stretch  # the share of the work left
    tail_w = gpu.run_busy(clock, tail_s, cost)
    duration = head_s + tail_s
    power = (head_w * head_s + tail_w * tail_s) / duration
    return GpuIteration(start_s, clock, cost, duration, power, clock < requested)


def _clock_and_cost(
    gpu: EngineGpus, latency: LatencyModel, batch: Batch, requested_mhz: int
) -> tuple[int, IterationCost]:
    """The clock the batch runs at when `requested_mhz` is asked (lower under a power limit), and its cost."""

    def cost_at(clock_mhz: int) -> IterationCost:
        return latency.iteration(
            clock_mhz, batch.decode_seqs, batch.decode_context_tokens, batch.prefill_chunks
        )

    if gpu.power_cap_w is None:  # the default limit never binds: no search
        return requested_mhz, cost_at(requested_mhz)
    return capped_clock_mhz(requested_mhz, gpu.spec.sm_clocks_mhz, cost_at, gpu.power, gpu.power_cap_w)


def engine_stats(
    engine: Engine, batch: Batch, outcome: IterationOutcome, end_s: float, duration_s: float
) -> EngineStats:
    """The engine's statistics for the iteration that ran `batch`, as the control core sees them."""
    # As TRT-LLM's executor: requests are fetched from its queue into the active set up to
    # max_num_active_requests (= max_batch_size); active but unscheduled ones wait for KV.
    # Requests that finished in this iteration were active in it: without them, active minus
    # scheduled (the requests waiting) would go negative after a burst of completions.
    in_engine = engine.active_requests + len(engine.waiting) + len(outcome.finished)
    active = min(in_engine, engine.config.max_batch_size)
    return EngineStats(
        timestamp_s=end_s,
        iteration=batch.iteration,
        active_requests=active,
        queued_requests=in_engine - active,
        scheduled_requests=batch.decode_seqs + len(batch.context),
        context_requests=len(batch.context),
        generation_requests=batch.decode_seqs,
        paused_requests=engine.paused_requests,
        context_tokens=batch.tokens - batch.decode_seqs,
        kv_blocks_used=engine.used_blocks,
        kv_blocks_max=engine.kv_blocks,
        tokens_per_block=engine.config.tokens_per_block,
        iteration_latency_s=duration_s,
    )


def iteration_stats(
    setup: TwinSetup, batch: Batch, outcome: IterationOutcome, stats: EngineStats, epoch_s: float
) -> IterationStats:
    """The record TRT-LLM's executor would log for this iteration (`epoch_s`: wall time of time 0).

    The twin keeps no host buffers and no prefix cache: CPU/pinned memory and reused blocks
    are 0; block allocation counters are not modelled (None, as older releases omit them).
    """
    started = [seq for seq, (_, past) in zip(batch.context, batch.prefill_chunks, strict=True) if past == 0]
    queue_ms = sum(outcome.start_s - seq.request.arrival_s for seq in started) * 1000.0
    return IterationStats(
        timestamp=epoch_s + outcome.end_s,
        iter=batch.iteration,
        iter_latency_ms=(outcome.end_s - outcome.start_s) * 1000.0,
        new_active_requests_queue_latency_ms=queue_ms,
        num_new_active_requests=len(started),
        num_active_requests=stats.active_requests,
        num_queued_requests=stats.queued_requests,
        num_completed_requests=len(outcome.finished),
        max_num_active_requests=setup.engine.max_batch_size,
        gpu_mem_usage=activation_bytes(setup.model, setup.tp, setup.engine) + RUNTIME_RESERVED_BYTES,
        cpu_mem_usage=0,
        pinned_mem_usage=0,
        kv_cache_stats=KvCacheStats(
            max_num_blocks=stats.kv_blocks_max,
            free_num_blocks=stats.kv_blocks_max - stats.kv_blocks_used,
            used_num_blocks=stats.kv_blocks_used,
            tokens_per_block=stats.tokens_per_block,
            alloc_total_blocks=None,
            alloc_new_blocks=None,
            reused_blocks=0,
            missed_blocks=None,
        ),
        inflight_batching_stats=InflightBatchingStats(
            num_scheduled_requests=stats.scheduled_requests,
            num_context_requests=stats.context_requests,
            num_gen_requests=stats.generation_requests,
            num_paused_requests=stats.paused_requests,
            num_ctx_tokens=stats.context_tokens,
            micro_batch_id=0,
            avg_num_decoded_tokens_per_iter=1.0,
        ),
    )
