"""Virtual-time replay: a workload through the twin engine on the twin GPU under a clock policy.

The loop is a discrete-event simulation whose only events are request arrivals and iteration
ends; time jumps from one to the next, so an hour of traffic takes seconds. The same
`Policy.decide` the live sidecar calls is called before every iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from agent.control.admission import EngineLimits
from agent.control.policies import ControlView, Policy
from agent.control.scoreboard import Scoreboard
from agent.domain import EngineStats, GpuSpec, ModelSpec, Request
from agent.predict.lengths import LengthPredictor, MaxTokensPredictor
from agent.twin.engine import Batch, Engine, IterationOutcome, RequestRejectedError
from agent.twin.gpu import DEFAULT_CLOCK_CHANGE_DELAY_S, TwinGpu
from agent.twin.iteration_stats import InflightBatchingStats, IterationStats, KvCacheStats
from agent.twin.latency import IterationCost, LatencyModel
from agent.twin.memory import RUNTIME_RESERVED_BYTES, EngineConfig, activation_bytes, kv_cache_blocks
from agent.twin.results import SimulationResult

NOISE_BLOCK = 4096  # jitter samples drawn at once
DEFAULT_EPOCH_S = 1_700_158_546.68059  # virtual time 0 on the wall clock: the conv trace's first request
IterationObserver = Callable[[IterationStats], None]


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
    clock_mhz: int
    cost: IterationCost
    duration_s: float
    power_w: float  # mean board power over the iteration

    @property
    def end_s(self) -> float:
        """When the iteration ends."""
        return self.start_s + self.duration_s


def run_on_gpu(
    gpu: TwinGpu, latency: LatencyModel, batch: Batch, start_s: float, jitter: Jitter
) -> GpuIteration:
    """Cost `batch` at the clock in force at `start_s` and account its energy on `gpu`.

    Shared by the virtual-time simulator and the real-time server, so both run the same twin.
    """
    clock = gpu.busy_clock_mhz(start_s)
    cost = latency.iteration(clock, batch.decode_seqs, batch.decode_context_tokens, batch.prefill_chunks)
    duration = cost.time_s * jitter.next()
    power = gpu.run_busy(clock, duration, cost)
    return GpuIteration(start_s, clock, cost, duration, power)


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


class Simulation:
    """One run; create, then `run()` once."""

    def __init__(
        self,
        setup: TwinSetup,
        policy: Policy,
        requests: Sequence[Request],
        on_iteration: IterationObserver | None = None,
        epoch_s: float = DEFAULT_EPOCH_S,
        length_predictor: LengthPredictor | None = None,
    ) -> None:
        self.setup = setup
        self.on_iteration = on_iteration  # receives TRT-LLM iteration stats; built only when set
        self.epoch_s = epoch_s
        self.policy = policy
        self.requests, self.truncated = fit_to_engine(sorted(requests, key=lambda r: r.arrival_s), setup)
        self.gpu = TwinGpu(setup.gpu, setup.clock_change_delay_s)
        self.engine = Engine(setup.engine, setup.kv_blocks(), setup.max_seq_len)
        self.latency = setup.latency_model()
        self._jitter = Jitter(setup.noise, setup.seed)
        self.now_s = 0.0
        self._last_stats: EngineStats | None = None
        self._last_clock: int | None = None
        self.limits = EngineLimits(
            kv_blocks=self.engine.kv_blocks,
            tokens_per_block=setup.engine.tokens_per_block,
            max_batch_size=setup.engine.max_batch_size,
            max_num_tokens=setup.engine.max_num_tokens,
        )
        # Policies that gate admission see a scoreboard fed by a length predictor; the others
        # let every arrival straight into the engine, as a stock Triton does.
        self.gated = bool(getattr(policy, "gates_admission", False))
        self.scoreboard = Scoreboard() if self.gated else None
        self._pending: dict[int, Request] = {}
        predictor = length_predictor or MaxTokensPredictor()
        self._predicted = predictor.predict(self.requests).tolist() if self.gated and self.requests else []

    def _apply_policy(self, result: SimulationResult) -> None:
        """Ask the policy; lock the clock it chose and start the requests it admitted."""
        view = ControlView(
            now_s=self.now_s,
            gpu=self.setup.gpu,
            stats=self._last_stats,
            limits=self.limits,
            scoreboard=self.scoreboard.view() if self.scoreboard is not None else None,
            last_clock_mhz=self._last_clock,
        )
        decision = self.policy.decide(view)
        if decision.sm_clock_mhz is None:
            self.gpu.reset_sm_clock(self.now_s)
        else:
            self.gpu.lock_sm_clock_mhz(decision.sm_clock_mhz, self.now_s)
        if self.scoreboard is None:
            return
        for request_id in decision.admit_request_ids:
            request = self._pending.pop(request_id)
            try:
                self.engine.submit(request)
            except RequestRejectedError:
                result.rejected += 1
                self.scoreboard.finish(request_id)
            else:
                self.scoreboard.admit(request_id)

    def _arrive(self, index: int, result: SimulationResult) -> None:
        request = self.requests[index]
        if self.scoreboard is not None:
            self._pending[request.request_id] = request
            self.scoreboard.add_queued(request, int(self._predicted[index]))
            return
        try:
            self.engine.submit(request)
        except RequestRejectedError:
            result.rejected += 1

    def _track(self, outcome: IterationOutcome) -> None:
        """Tell the scoreboard what the iteration produced."""
        if self.scoreboard is None:
            return
        self.scoreboard.decode_step()
        for request_id in outcome.first_token_ids:
            self.scoreboard.first_token(request_id, outcome.end_s)
        for done in outcome.finished:
            self.scoreboard.finish(done.request.request_id)

    def run(self, progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Replay every request to completion and return what happened."""
        wall_start = time.perf_counter()
        result = SimulationResult(
            policy=self.policy.name, requests=len(self.requests), truncated=self.truncated
        )
        arrivals = [r.arrival_s for r in self.requests]
        horizon = arrivals[-1] if arrivals else 0.0
        next_req = 0
        n = len(self.requests)
        while next_req < n or self.engine.has_work() or self._pending:
            while next_req < n and arrivals[next_req] <= self.now_s:
                self._arrive(next_req, result)
                next_req += 1
            self._apply_policy(result)
            batch = self.engine.schedule() if self.engine.has_work() else None
            if batch is None or batch.tokens == 0:
                if next_req >= n:
                    raise RuntimeError("engine stalled with queued work and no arrivals left")
                self.gpu.run_idle(self.now_s, arrivals[next_req])
                self.now_s = arrivals[next_req]
                continue
            run = run_on_gpu(self.gpu, self.latency, batch, self.now_s, self._jitter)
            outcome = self.engine.complete(batch, self.now_s, run.end_s)
            result.record_iteration(outcome, run.clock_mhz, run.power_w)
            self._track(outcome)
            self._last_stats = engine_stats(self.engine, batch, outcome, run.end_s, run.duration_s)
            self._last_clock = run.clock_mhz
            if self.on_iteration is not None:
                self.on_iteration(iteration_stats(self.setup, batch, outcome, self._last_stats, self.epoch_s))
            self.now_s = run.end_s
            if progress is not None and batch.iteration % 2048 == 0:
                progress(min(self.now_s / horizon, 1.0) if horizon else 1.0)
        result.finish(
            sim_seconds=self.now_s,
            energy_j=self.gpu.energy_j,
            clock_changes=self.gpu.clock_changes,
            preemptions=self.engine.preemptions,
            wall_seconds=time.perf_counter() - wall_start,
        )
        return result


def simulate(
    setup: TwinSetup,
    policy: Policy,
    requests: Sequence[Request],
    progress: Callable[[float], None] | None = None,
    on_iteration: IterationObserver | None = None,
    length_predictor: LengthPredictor | None = None,
) -> SimulationResult:
    """Run `requests` through the twin under `policy` (gating policies use `length_predictor`)."""
    return Simulation(setup, policy, requests, on_iteration, length_predictor=length_predictor).run(progress)
