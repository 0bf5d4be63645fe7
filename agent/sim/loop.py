"""Virtual-time replay: a workload through the twin engine on the twin GPU under a clock policy.

The loop is a discrete-event simulation whose only events are request arrivals and iteration
ends; time jumps from one to the next, so an hour of traffic takes seconds. The same
`Policy.decide` the live sidecar calls is called before every iteration, and each iteration is
the twin's own step (`agent.twin.step`), the one its real-time server runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.control.admission import EngineLimits
from agent.control.policies import ControlView, Policy
from agent.control.scoreboard import Scoreboard
from agent.domain import EngineStats, Request
from agent.predict.lengths import LengthPredictor, MaxTokensPredictor
from agent.sim.results import SimulationResult
from agent.twin.engine import Engine, IterationOutcome, RequestRejectedError
from agent.twin.gpu import EngineGpus
from agent.twin.iteration_stats import IterationStats
from agent.twin.setup import TwinSetup, fit_to_engine
from agent.twin.step import Jitter, engine_stats, iteration_stats, run_on_gpu

DEFAULT_EPOCH_S = 1_700_158_546.68059  # virtual time 0 on the wall clock: the conv trace's first request
IterationObserver = Callable[[IterationStats], None]


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
        self.gpu = EngineGpus(setup.gpu, setup.tp, setup.clock_change_delay_s)
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
        self.gated = policy.gates_admission
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
            policy=self.policy.name,
            requests=len(self.requests),
            gpus=self.gpu.count,
            truncated=self.truncated,
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
