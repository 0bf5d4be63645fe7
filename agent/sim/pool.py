"""A node's pool of engines in virtual time: a router, the sizing state machine, shadow engines.

A node of `node_gpus` GPUs serves one model with engines of the tensor-parallel sizes of
`PoolConfig.setups`. A router sends every arrival to the engine that serves traffic. Every
`period_s` (paper §3.7: about 10 s) the arrival rate of the last period is given to the sizing
state machine of `agent.control.scaling`, and its decisions are carried out as the live
coordinator carries them out:

- START_SHADOW: an engine of the new size takes its GPUs as soon as the node has them free, draws
  idle power (stock clocks) for the cold start, then reports ready;
- SWITCH_TO: the router moves to the shadow; requests the old engine's gate still holds (never
  admitted, so never started) move with it; the old engine drains what it runs and queues, admits
  nothing new, and gives its GPUs back when it is empty;
- STOP: a shadow no longer wanted (or not ready in time) gives its GPUs back.

Each engine runs its own clock policy on its own scoreboard (`agent.sim.engine_run`), as its own
sidecar will live. Energy is counted two ways: the GPUs held by engines (GPUs no engine holds are
free for other work and cost nothing: the paper's view) and the whole node (free GPUs idle at
stock idle power). Time is virtual: events are arrivals, iteration ends, sizing ticks and cold
starts ending.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from agent.control.scaling import (
    LoadObserved,
    ScalingAction,
    ScalingConfig,
    ScalingDecision,
    ScalingEvent,
    ShadowReady,
    initial_state,
    transition,
)
from agent.domain import Request
from agent.policy_registry import BuiltPolicy
from agent.sim.engine_run import EngineRun
from agent.sim.loop import predicted_lengths
from agent.sim.results import SimulationResult
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup, fit_to_engine

DEFAULT_NODE_GPUS = 8  # a DGX A100 / AWS p4d.24xlarge, the paper's node
DEFAULT_PERIOD_S = 10.0  # paper §3.7: sizing decided about every 10 s
# A cold TensorRT-LLM engine takes "over 20 s" to start (paper §3.7). Llama-2-13B's 26 GB of fp16
# weights alone take about 13 s to read at a local NVMe's 2 GB/s, before Triton, the CUDA
# context and NCCL start; 30 s rounds the paper's bound up.
DEFAULT_COLD_START_S = 30.0
PROGRESS_EVERY = 4096  # loop passes between progress reports


class Role(Enum):
    """Where an engine of the pool is in its life."""

    WAITING = "waiting"  # a shadow waiting for the node to have its GPUs free
    STARTING = "starting"  # a shadow holding its GPUs through its cold start
    READY = "ready"  # a shadow that started and waits for traffic to switch to it
    SERVING = "serving"  # the engine the router sends arrivals to
    DRAINING = "draining"  # finishing what it had; admits nothing new
    RELEASED = "released"  # gone; its GPUs are free


HOLDS_GPUS = (Role.STARTING, Role.READY, Role.SERVING, Role.DRAINING)


PolicyFactory = Callable[[int], BuiltPolicy]  # engine size → a fresh policy for a new engine


@dataclass(frozen=True, slots=True)
class SizingKnobs:
    """The node, and how cautiously autoscaled runs move between sizes."""

    node_gpus: int = DEFAULT_NODE_GPUS
    period_s: float = DEFAULT_PERIOD_S
    cold_start_s: float = DEFAULT_COLD_START_S
    headroom: float = 0.8
    grace_s: float = 60.0
    shadow_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.node_gpus < 1:
            raise ValueError(f"a node has at least one GPU, got {self.node_gpus}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"the sizing period must be finite and > 0 s, got {self.period_s}")
        if not (self.cold_start_s >= 0 and math.isfinite(self.cold_start_s)):
            raise ValueError(f"the cold start must be finite and >= 0 s, got {self.cold_start_s}")

    def scaling(self, capacities_rps: Sequence[tuple[int, float]]) -> ScalingConfig:
        """The sizing state machine's configuration for these profiled capacities."""
        return ScalingConfig(tuple(capacities_rps), self.headroom, self.grace_s, self.shadow_timeout_s)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The node, its engine sizes and how the pool is sized."""

    setups: dict[int, TwinSetup]  # by TP degree: every engine size the pool may run
    initial_size: int  # the engine serving at time 0 (warm)
    scaling: ScalingConfig | None  # None: the initial engine serves alone throughout
    knobs: SizingKnobs = field(default_factory=SizingKnobs)

    def __post_init__(self) -> None:
        if self.initial_size not in self.setups:
            raise ValueError(f"initial size tp{self.initial_size} is not among {sorted(self.setups)}")
        for size, setup in self.setups.items():
            if setup.tp != size:
                raise ValueError(f"the setup listed as tp{size} is tp{setup.tp}")
        if len({(s.gpu.name, s.model.name) for s in self.setups.values()}) != 1:
            raise ValueError("every engine of a pool serves the same model on the same GPU type")
        if self.scaling is not None:
            unknown = {size for size, _ in self.scaling.capacities_rps} - set(self.setups)
            if unknown:
                raise ValueError(f"scaling knows sizes {sorted(unknown)} the pool has no setup for")
        if max(self.setups) > self.knobs.node_gpus:
            raise ValueError(f"tp{max(self.setups)} does not fit a node of {self.knobs.node_gpus} GPUs")

    @property
    def autoscaled(self) -> bool:
        """Whether the sizing state machine runs."""
        return self.scaling is not None


@dataclass(slots=True)
class PoolEngine:
    """One engine of the pool and its life on the node."""

    engine_id: int
    size: int
    run: EngineRun
    role: Role
    requested_s: float
    acquired_s: float | None = None  # GPUs held from
    ready_s: float | None = None  # cold start over
    released_s: float | None = None
    busy_until_s: float | None = None  # end of the iteration it is running
    accounted_s: float = 0.0  # its energy is accounted up to here

    def gpu_seconds(self, end_s: float) -> float:
        """GPU-seconds it held up to `end_s`."""
        if self.acquired_s is None:
            return 0.0
        until = self.released_s if self.released_s is not None else end_s
        return self.size * max(0.0, until - self.acquired_s)


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A sizing decision that did something, as the run carried it out."""

    time_s: float
    action: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class PoolSample:
    """The node at one sizing tick (every period, autoscaled or not): for the timeline plot."""

    time_s: float
    serving_size: int
    gpus_held: int
    engine_energy_j: float  # cumulative, every engine's GPUs (busy ones up to their iteration's end)
    arrival_rps: float  # over the last period


@dataclass(slots=True)
class PoolResult:
    """What a pool run produced: the requests as one result, and the node's view of it."""

    result: SimulationResult  # every engine's iterations and requests; energy: engine GPUs
    node_gpus: int
    node_energy_j: float  # engine GPUs plus free GPUs idling
    gpu_seconds_held: float
    events: list[ScaleEvent] = field(default_factory=list)
    engines: list[dict[str, Any]] = field(default_factory=list)  # per engine: size, times, iterations
    held_timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, GPUs held, serving size)
    samples: list[PoolSample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run's figures: the single-engine summary plus the node's."""
        summary = self.result.summary()
        span = self.result.sim_seconds
        tokens = self.result.tokens_out
        summary.update(
            {
                "energy_engine_gpus_j": self.result.energy_j,
                "energy_node_j": self.node_energy_j,
                "tokens_per_joule_node": tokens / self.node_energy_j if self.node_energy_j else None,
                "node_gpus": self.node_gpus,
                "gpu_seconds_held": self.gpu_seconds_held,
                "mean_gpus_held": self.gpu_seconds_held / span if span else None,
                "mean_power_per_gpu_w": self.result.energy_j / self.gpu_seconds_held
                if self.gpu_seconds_held
                else None,
                "scale_events": len(self.events),
                "switches": sum(1 for e in self.events if e.action == ScalingAction.SWITCH_TO.value),
                "sizes_served": sorted({e["size"] for e in self.engines if e["served"]}),
            }
        )
        return summary


class PoolSimulation:
    """One run of a node's pool; create, then `run()` once."""

    def __init__(self, config: PoolConfig, policies: PolicyFactory, requests: Sequence[Request]) -> None:
        self.config = config
        self._policies = policies
        smallest = config.setups[min(config.setups)]
        self.requests, truncated = fit_to_engine(sorted(requests, key=lambda r: r.arrival_s), smallest)
        first = policies(config.initial_size)
        self._predicted = predicted_lengths(first.policy, self.requests, first.lengths)
        self._arrivals = [r.arrival_s for r in self.requests]
        self._free_gpu_w = PowerModel(smallest.gpu).idle_w(None)
        self.engines: list[PoolEngine] = []  # every engine the run started, released ones too
        self._live: list[PoolEngine] = []  # those not released: what each pass of the loop looks at
        self.events: list[ScaleEvent] = []
        self.held_timeline: list[tuple[float, int, int]] = []
        self.samples: list[PoolSample] = []
        self._truncated = truncated
        self._state = (
            initial_state(config.scaling, config.initial_size, 0.0) if config.scaling is not None else None
        )
        self._due: set[int] = set()
        self.serving = self._new_engine(config.initial_size, 0.0, first)
        self._acquire(self.serving, 0.0)
        self.serving.role, self.serving.ready_s = Role.SERVING, 0.0  # warm at time 0

    # --- engines and GPUs -------------------------------------------------------------------

    def _new_engine(self, size: int, now_s: float, built: BuiltPolicy | None = None) -> PoolEngine:
        built = built or self._policies(size)
        policy_name = built.policy.name
        record = SimulationResult(policy=policy_name, requests=0, gpus=size)
        run = EngineRun(self.config.setups[size], built.policy, record)
        engine = PoolEngine(len(self.engines), size, run, Role.WAITING, now_s, accounted_s=now_s)
        self.engines.append(engine)
        self._live.append(engine)
        return engine

    def gpus_held(self) -> int:
        """GPUs the engines hold now."""
        return sum(e.size for e in self._live if e.role in HOLDS_GPUS)

    def _acquire(self, engine: PoolEngine, now_s: float) -> bool:
        """Give `engine` its GPUs if the node has them free; its cold start begins."""
        if self.gpus_held() + engine.size > self.config.knobs.node_gpus:
            return False
        engine.role = Role.STARTING
        engine.acquired_s = engine.accounted_s = now_s
        engine.ready_s = now_s + self.config.knobs.cold_start_s
        self._note_held(now_s)
        return True

    def _release(self, engine: PoolEngine, now_s: float) -> None:
        if engine.role in HOLDS_GPUS and engine.accounted_s < now_s:
            engine.run.idle(engine.accounted_s, now_s)
            engine.accounted_s = now_s
        engine.role = Role.RELEASED
        engine.released_s = now_s
        self._live.remove(engine)
        self._note_held(now_s)

    def _note_held(self, now_s: float) -> None:
        self.held_timeline.append((now_s, self.gpus_held(), self.serving.size))

    def _shadow(self) -> PoolEngine | None:
        for engine in self._live:
            if engine.role in (Role.WAITING, Role.STARTING, Role.READY):
                return engine
        return None

    # --- sizing -----------------------------------------------------------------------------

    def _observe(self, event: ScalingEvent) -> None:
        assert self._state is not None
        self._state, decision = transition(self._state, event)
        if decision.action is not ScalingAction.KEEP:
            self._carry_out(decision, event.now_s)

    def _carry_out(self, decision: ScalingDecision, now_s: float) -> None:
        size = decision.size
        assert size is not None, "every action but KEEP names a size"
        self.events.append(ScaleEvent(now_s, decision.action.value, size, decision.reason))
        if decision.action is ScalingAction.START_SHADOW:
            self._acquire(self._new_engine(size, now_s), now_s)
            return
        shadow = self._shadow()
        assert shadow is not None and shadow.size == size, "the state machine tracks the one shadow"
        if decision.action is ScalingAction.STOP:
            self._release(shadow, now_s)
            return
        old, self.serving = self.serving, shadow
        shadow.role = Role.SERVING
        old.role = Role.DRAINING
        old.run.draining = True
        for request, predicted in old.run.take_held():
            shadow.run.arrive(request, predicted)
        self._due.update((old.engine_id, shadow.engine_id))
        self._note_held(now_s)

    def _sample(self, now_s: float) -> None:
        """Bring idle engines' energy up to `now_s` and record the node's state for the timeline."""
        for engine in self._live:
            if engine.role in HOLDS_GPUS and engine.busy_until_s is None and engine.accounted_s < now_s:
                engine.run.idle(engine.accounted_s, now_s)
                engine.accounted_s = now_s
        self.samples.append(
            PoolSample(
                time_s=now_s,
                serving_size=self.serving.size,
                gpus_held=self.gpus_held(),
                engine_energy_j=sum(e.run.gpu.energy_j for e in self.engines),  # released ones count
                arrival_rps=self._rate_rps(now_s),
            )
        )

    # --- the loop ---------------------------------------------------------------------------

    def _next_tick_s(self, last_tick_s: float) -> float:
        if not self._arrivals:
            return math.inf
        tick = last_tick_s + self.config.knobs.period_s
        return tick if tick <= self._arrivals[-1] + self.config.knobs.period_s else math.inf

    def _rate_rps(self, now_s: float) -> float:
        lo = bisect.bisect_right(self._arrivals, now_s - self.config.knobs.period_s)
        hi = bisect.bisect_right(self._arrivals, now_s)
        return (hi - lo) / self.config.knobs.period_s

    def _step(self, engine: PoolEngine, now_s: float) -> None:
        if engine.accounted_s < now_s:
            engine.run.idle(engine.accounted_s, now_s)
        end_s = engine.run.step(now_s)
        engine.busy_until_s = end_s
        engine.accounted_s = now_s if end_s is None else end_s

    def run(self, progress: Callable[[float], None] | None = None) -> PoolResult:
        """Replay every request to completion and return what happened."""
        wall_start = time.perf_counter()
        arrivals, n = self._arrivals, len(self.requests)
        horizon = arrivals[-1] if arrivals else 0.0
        next_req, last_tick_s, now_s, end_s, passes = 0, 0.0, 0.0, 0.0, 0
        self._due.add(self.serving.engine_id)
        while (
            next_req < n
            or self._due
            or any(e.busy_until_s is not None or e.run.has_work() for e in self._live)
        ):
            busy = [e.busy_until_s for e in self._live if e.busy_until_s is not None]
            starting = [e.ready_s for e in self._live if e.role is Role.STARTING and e.ready_s is not None]
            next_arrival = arrivals[next_req] if next_req < n else math.inf
            tick_s = self._next_tick_s(last_tick_s)
            candidates = [next_arrival, tick_s, *busy, *starting]
            if self._due:
                candidates.append(now_s)
            now_s = min(candidates)
            if now_s == math.inf:
                break
            end_s = now_s
            for engine in self._live:
                if engine.busy_until_s is not None and engine.busy_until_s <= now_s:
                    engine.busy_until_s = None
                    self._due.add(engine.engine_id)
            while next_req < n and arrivals[next_req] <= now_s:
                self.serving.run.arrive(self.requests[next_req], int(self._predicted[next_req]))
                self._due.add(self.serving.engine_id)
                next_req += 1
            for engine in list(self._live):
                if engine.role is Role.STARTING and engine.ready_s is not None and engine.ready_s <= now_s:
                    engine.role = Role.READY
                    self._observe(ShadowReady(now_s, engine.size))
            if tick_s <= now_s:
                last_tick_s = tick_s
                self._sample(now_s)
                if self._state is not None:
                    self._observe(LoadObserved(now_s, self._rate_rps(now_s)))
            due, self._due = sorted(self._due), set()
            for engine_id in due:
                engine = self.engines[engine_id]
                if engine.busy_until_s is None and engine.role in (Role.SERVING, Role.DRAINING):
                    self._step(engine, now_s)
            for engine in list(self._live):
                if engine.role is Role.DRAINING and engine.busy_until_s is None and not engine.run.has_work():
                    self._release(engine, now_s)
            waiting = next((e for e in self._live if e.role is Role.WAITING), None)
            if waiting is not None:
                self._acquire(waiting, now_s)
            passes += 1
            if progress is not None and passes % PROGRESS_EVERY == 0:
                progress(min(now_s / horizon, 1.0) if horizon else 1.0)
        stuck = [e for e in self._live if e.run.has_work()]
        if stuck or next_req < n:
            raise RuntimeError(f"pool stalled with work left on tp{[e.size for e in stuck]} engines")
        return self._finish(end_s, wall_start)

    def _finish(self, end_s: float, wall_start: float) -> PoolResult:
        end_s = max([end_s, *(e.accounted_s for e in self.engines)])
        for engine in list(self._live):  # the run is over: every engine gives its GPUs back
            self._release(engine, end_s)
        merged = SimulationResult.merged(
            self.serving.run.policy.name,
            len(self.requests),
            [e.run.result for e in self.engines],
        )
        held = sum(e.gpu_seconds(end_s) for e in self.engines)
        engine_j = sum(e.run.gpu.energy_j for e in self.engines)
        free_j = self._free_gpu_w * max(0.0, self.config.knobs.node_gpus * end_s - held)
        merged.truncated = self._truncated
        merged.gpus = self.config.knobs.node_gpus
        merged.finish(
            sim_seconds=end_s,
            energy_j=engine_j,
            clock_changes=sum(e.run.gpu.clock_changes for e in self.engines),
            preemptions=sum(e.run.engine.preemptions for e in self.engines),
            wall_seconds=time.perf_counter() - wall_start,
        )
        return PoolResult(
            result=merged,
            node_gpus=self.config.knobs.node_gpus,
            node_energy_j=engine_j + free_j,
            gpu_seconds_held=held,
            events=self.events,
            engines=[_describe(e) for e in self.engines],
            held_timeline=self.held_timeline,
            samples=self.samples,
        )


def _describe(engine: PoolEngine) -> dict[str, Any]:
    return {
        "engine_id": engine.engine_id,
        "size": engine.size,
        "requested_s": engine.requested_s,
        "acquired_s": engine.acquired_s,
        "ready_s": engine.ready_s,
        "released_s": engine.released_s,
        "iterations": len(engine.run.result.iteration_s),
        "served": engine.run.iterations > 0,
        "energy_j": engine.run.gpu.energy_j,
    }


def simulate_pool(
    config: PoolConfig,
    policies: PolicyFactory,
    requests: Sequence[Request],
    progress: Callable[[float], None] | None = None,
) -> PoolResult:
    """Run `requests` through a node's pool of engines."""
    return PoolSimulation(config, policies, requests).run(progress)
