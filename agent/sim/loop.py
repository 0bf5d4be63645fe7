"""Virtual-time replay: a workload through one twin engine under a clock policy.

The loop is a discrete-event simulation whose only events are request arrivals and iteration
ends; time jumps from one to the next, so an hour of traffic takes seconds. The same
`Policy.decide` the live sidecar calls is called before every iteration (`agent.sim.engine_run`),
and each iteration is the twin's own step (`agent.twin.step`), the one its real-time server runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.control.policies import Policy
from agent.domain import Request
from agent.predict.lengths import LengthPredictor, MaxTokensPredictor
from agent.sim.engine_run import DEFAULT_EPOCH_S, EngineRun, IterationObserver
from agent.sim.results import SimulationResult
from agent.twin.setup import TwinSetup, fit_to_engine

PROGRESS_EVERY = 2048  # iterations between progress reports


def predicted_lengths(
    policy: Policy, requests: Sequence[Request], predictor: LengthPredictor | None
) -> list[int]:
    """Predicted output lengths for a policy that gates admission (zeros for one that does not)."""
    if not policy.gates_admission or not requests:
        return [0] * len(requests)
    return (predictor or MaxTokensPredictor()).predict(requests).tolist()


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
        self.policy = policy
        self.requests, self.truncated = fit_to_engine(sorted(requests, key=lambda r: r.arrival_s), setup)
        self._predicted = predicted_lengths(policy, self.requests, length_predictor)
        self.result = SimulationResult(
            policy=policy.name, requests=len(self.requests), gpus=setup.tp, truncated=self.truncated
        )
        self.engine = EngineRun(setup, policy, self.result, on_iteration, epoch_s)
        self.now_s = 0.0

    def run(self, progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Replay every request to completion and return what happened."""
        wall_start = time.perf_counter()
        engine, result = self.engine, self.result
        arrivals = [r.arrival_s for r in self.requests]
        horizon = arrivals[-1] if arrivals else 0.0
        next_req = 0
        n = len(self.requests)
        while next_req < n or engine.has_work():
            while next_req < n and arrivals[next_req] <= self.now_s:
                engine.arrive(self.requests[next_req], int(self._predicted[next_req]))
                next_req += 1
            end_s = engine.step(self.now_s)
            if end_s is None:
                if next_req >= n:
                    raise RuntimeError("engine stalled with queued work and no arrivals left")
                engine.idle(self.now_s, arrivals[next_req])
                self.now_s = arrivals[next_req]
                continue
            self.now_s = end_s
            if progress is not None and engine.iterations % PROGRESS_EVERY == 0:
                progress(min(self.now_s / horizon, 1.0) if horizon else 1.0)
        result.finish(
            sim_seconds=self.now_s,
            energy_j=engine.gpu.energy_j,
            clock_changes=engine.gpu.clock_changes,
            preemptions=engine.engine.preemptions,
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
