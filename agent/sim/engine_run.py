"""One engine in virtual time: its GPUs, its scheduler, and the clock policy that steers it.

An `EngineRun` is what one live sidecar and its engine are: requests routed to it are held on its
own scoreboard (policies that gate admission) or go straight into its queue (the others, as a
stock Triton takes them); before every iteration its policy decides a clock and whom to admit;
the iteration is the twin's own step. The caller owns time: it says when the engine steps and
accounts the idle gaps between, so one engine (`agent.sim.loop`) and a node's pool of them
(`agent.sim.pool`) run the same code.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.control.admission import EngineLimits
from agent.control.policies import ControlView, Policy
from agent.control.scoreboard import Scoreboard
from agent.domain import EngineStats, Request
from agent.sim.results import SimulationResult
from agent.twin.engine import Batch, Engine, IterationOutcome, RequestRejectedError
from agent.twin.gpu import EngineGpus
from agent.twin.iteration_stats import IterationStats
from agent.twin.setup import TwinSetup
from agent.twin.step import GpuIteration, Jitter, engine_stats, iteration_stats, run_on_gpu

DEFAULT_EPOCH_S = 1_700_158_546.68059  # virtual time 0 on the wall clock: the conv trace's first request
IterationObserver = Callable[[IterationStats], None]
# What ran, what it produced and what it cost: a whole trajectory, for offline analyses of a run.
BatchObserver = Callable[[Batch, IterationOutcome, GpuIteration], None]


class DrainingError(RuntimeError):
    """A request was routed to an engine that is draining: it admits nothing new."""


class EngineRun:
    """One engine and its clock policy; every time is given by the caller."""

    def __init__(
        self,
        setup: TwinSetup,
        policy: Policy,
        result: SimulationResult,
        on_iteration: IterationObserver | None = None,
        epoch_s: float = DEFAULT_EPOCH_S,
    ) -> None:
        self.setup = setup
        self.policy = policy
        self.result = result  # where its iterations and finished requests are recorded
        self.on_iteration = on_iteration  # receives TRT-LLM iteration stats; built only when set
        self.on_batch: BatchObserver | None = None  # receives every batch, its outcome and its cost
        self.epoch_s = epoch_s
        self.gpu = EngineGpus(setup.gpu, setup.tp, setup.clock_change_delay_s)
        self.engine = Engine(setup.engine, setup.kv_blocks(), setup.max_seq_len)
        self.latency = setup.latency_model()
        self._jitter = Jitter(setup.noise, setup.seed)
        self.limits = EngineLimits(
            kv_blocks=self.engine.kv_blocks,
            tokens_per_block=setup.engine.tokens_per_block,
            max_batch_size=setup.engine.max_batch_size,
            max_num_tokens=setup.engine.max_num_tokens,
        )
        # Policies that gate admission see a scoreboard fed by a length predictor; the others
        # let every arrival straight into the engine, as a stock Triton does.
        self.scoreboard = Scoreboard() if policy.gates_admission else None
        self._held: dict[int, tuple[Request, int]] = {}  # gated: arrived, not admitted, with prediction
        self._last_stats: EngineStats | None = None
        self._last_clock: int | None = None
        self._power_limit_w: float | None = None  # the limit last applied; None: the default (TDP)
        self.draining = False  # set when traffic moves away: nothing new enters

    def has_work(self) -> bool:
        """Requests held or in the engine, running or waiting."""
        return bool(self._held) or self.engine.has_work()

    def arrive(self, request: Request, predicted_tokens: int) -> None:
        """A request routed here: held for the policy, or submitted as a stock engine takes it."""
        if self.draining:
            raise DrainingError(f"request {request.request_id} routed to a draining tp{self.setup.tp} engine")
        if self.scoreboard is not None:
            self._held[request.request_id] = (request, predicted_tokens)
            self.scoreboard.add_queued(request, predicted_tokens)
            return
        try:
            self.engine.submit(request)
        except RequestRejectedError:
            self.result.rejected += 1

    def take_held(self) -> list[tuple[Request, int]]:
        """Give up every request held and not yet admitted (traffic moves to another engine)."""
        held = list(self._held.values())
        self._held.clear()
        if self.scoreboard is not None:
            for request, _ in held:
                self.scoreboard.finish(request.request_id)
        return held

    def _apply_policy(self, now_s: float) -> None:
        """Ask the policy; lock the clock and set the power limit it chose, start whom it admitted."""
        view = ControlView(
            now_s=now_s,
            gpu=self.setup.gpu,
            stats=self._last_stats,
            limits=self.limits,
            scoreboard=self.scoreboard.view() if self.scoreboard is not None else None,
            last_clock_mhz=self._last_clock,
        )
        decision = self.policy.decide(view)
        if decision.sm_clock_mhz is None:
            self.gpu.reset_sm_clock(now_s)
        else:
            self.gpu.lock_sm_clock_mhz(decision.sm_clock_mhz, now_s)
        if decision.power_limit_w != self._power_limit_w:
            self.gpu.set_power_limit_w(decision.power_limit_w)
            self._power_limit_w = decision.power_limit_w
        if self.scoreboard is None:
            return
        for request_id in decision.admit_request_ids:
            request, _ = self._held.pop(request_id)
            try:
                self.engine.submit(request)
            except RequestRejectedError:
                self.result.rejected += 1
                self.scoreboard.finish(request_id)
            else:
                self.scoreboard.admit(request_id)

    def _track(self, outcome: IterationOutcome) -> None:
        """Tell the scoreboard what the iteration produced."""
        if self.scoreboard is None:
            return
        self.scoreboard.decode_step()
        for request_id in outcome.first_token_ids:
            self.scoreboard.first_token(request_id, outcome.end_s)
        for done in outcome.finished:
            self.scoreboard.finish(done.request.request_id)

    def step(self, now_s: float) -> float | None:
        """Decide, then run one iteration from `now_s`; its end time, or None when nothing ran."""
        self._apply_policy(now_s)
        if not self.engine.has_work():
            return None
        batch = self.engine.schedule()
        if batch.tokens == 0:
            return None
        run = run_on_gpu(self.gpu, self.latency, batch, now_s, self._jitter)
        outcome = self.engine.complete(batch, now_s, run.end_s)
        self.result.record_iteration(outcome, run.clock_mhz, run.power_w)
        self._track(outcome)
        if self.on_batch is not None:
            self.on_batch(batch, outcome, run)
        self._last_stats = engine_stats(self.engine, batch, outcome, run.end_s, run.duration_s)
        self._last_clock = run.clock_mhz
        if self.on_iteration is not None:
            self.on_iteration(iteration_stats(self.setup, batch, outcome, self._last_stats, self.epoch_s))
        return run.end_s

    @property
    def iterations(self) -> int:
        """Iterations run so far."""
        return len(self.result.iteration_s)

    def idle(self, start_s: float, end_s: float) -> None:
        """Account an idle gap of the engine's GPUs at the clock in force."""
        self.gpu.run_idle(start_s, end_s)
