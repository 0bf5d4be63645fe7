"""Engine sizing: which tensor-parallel degree should serve the current load (paper §3.7).

Every decision period (the coordinator's; the paper uses about 10 s) the measured request rate is
compared with the offline-profiled capacity of each engine size. The smallest size whose capacity
× headroom covers the rate is the target. A new engine takes over 20 s to start cold, so a change
of size starts a **shadow** instance while the current one keeps serving, and traffic switches when
the shadow reports ready. Scaling up starts at once; scaling down waits until a grace period has
passed since the last switch *and* the smaller size has sufficed at every observation for a whole
grace period, so a lull between bursts does not make the engines flap.

    SERVING(tp) --load above tp--------------------------> STARTING(tp → bigger)    start_shadow
    SERVING(tp) --smaller sufficed for grace_s-----------> STARTING(tp → smaller)   start_shadow
    STARTING    --shadow ready-------------------------------> SERVING(shadow)      switch_to
    STARTING    --not ready within shadow_timeout_s---------> SERVING(tp)           stop(shadow)
    STARTING(tp → smaller) --load above the smaller size---> SERVING(tp)           stop(shadow)

`switch_to(size)` moves new requests to `size`; the coordinator drains the engine that served
until then and stops it. `stop(size)` abandons a shadow that is no longer wanted. A scale-up shadow
is never abandoned for lack of load: the grace period after its switch decides that, as the paper's
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """Engine sizes, their capacity, and how cautiously to move between them."""

    capacities_rps: tuple[tuple[int, float], ...]  # (TP degree, peak req/s profiled offline), by size
    headroom: float = 0.8  # plan for this fraction of peak: queueing delay explodes near saturation
    grace_s: float = 60.0  # scale down only this long after a switch, once a smaller size sufficed as long
    shadow_timeout_s: float = 120.0  # a shadow not ready by then has failed (cold start is over 20 s)

    def __post_init__(self) -> None:
        if not self.capacities_rps:
            raise ValueError("capacities_rps needs at least one engine size")
        sizes = [size for size, _ in self.capacities_rps]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"engine sizes listed twice: {sizes}")
        if any(size <= 0 or not capacity > 0 for size, capacity in self.capacities_rps):
            raise ValueError(f"sizes and capacities must be positive: {self.capacities_rps}")
        if not 0 < self.headroom <= 1 or self.grace_s < 0 or self.shadow_timeout_s <= 0:
            raise ValueError("headroom must be in (0, 1], grace_s ≥ 0 and shadow_timeout_s > 0")
        object.__setattr__(self, "capacities_rps", tuple(sorted(self.capacities_rps)))

    def capacity_rps(self, size: int) -> float:
        """Profiled peak rate of engine size `size`."""
        for tp, capacity in self.capacities_rps:
            if tp == size:
                return capacity
        raise ValueError(f"unknown engine size tp{size}; known: {[tp for tp, _ in self.capacities_rps]}")


def target_size(config: ScalingConfig, rps: float) -> int:
    """Smallest engine size whose capacity × headroom covers `rps`; the largest when none does."""
    for size, capacity in config.capacities_rps:
        if capacity * config.headroom >= rps:
            return size
    return config.capacities_rps[-1][0]


class ScalingMode(Enum):
    """Whether one engine serves alone or a shadow of another size is starting beside it."""

    SERVING = "serving"
    STARTING = "starting"


class ScalingAction(Enum):
    """What the coordinator should do."""

    KEEP = "keep"  # nothing
    START_SHADOW = "start_shadow"  # start an engine of `size` in the background
    SWITCH_TO = "switch_to"  # route traffic to `size`; drain and stop the previous engine
    STOP = "stop"  # stop the shadow of `size`: it is no longer wanted


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """One sizing decision and why it was taken."""

    action: ScalingAction
    size: int | None  # TP degree the action concerns; None with KEEP
    reason: str  # for logs and telemetry, with the figures that decided


@dataclass(frozen=True, slots=True)
class ScalingState:
    """Where the sizing state machine is."""

    config: ScalingConfig
    mode: ScalingMode
    size: int  # TP degree of the engine serving traffic
    last_switch_s: float  # when traffic last moved to another engine (or the first one started)
    shadow_size: int | None = None  # STARTING: size of the shadow; else None
    shadow_started_s: float | None = None  # STARTING: when it was started; else None
    down_since_s: float | None = None  # SERVING: start of the run of ticks where a smaller size sufficed
    down_size: int | None = None  # largest target over that run: it sufficed at every tick of it


def initial_state(config: ScalingConfig, size: int, now_s: float) -> ScalingState:
    """Serving with engine `size`, which started (counts as a switch) at `now_s`."""
    config.capacity_rps(size)  # refuses a size that was never profiled
    return ScalingState(config, ScalingMode.SERVING, size, now_s)


@dataclass(frozen=True, slots=True)
class LoadObserved:
    """The periodic decision tick: the request rate measured over the last period."""

    now_s: float
    rps: float


@dataclass(frozen=True, slots=True)
class ShadowReady:
    """The shadow engine of `size` reports ready to serve."""

    now_s: float
    size: int


ScalingEvent = LoadObserved | ShadowReady


def _serving(state: ScalingState, size: int, last_switch_s: float) -> ScalingState:
    return ScalingState(state.config, ScalingMode.SERVING, size, last_switch_s)


def _starting(state: ScalingState, shadow: int, now_s: float) -> ScalingState:
    return ScalingState(state.config, ScalingMode.STARTING, state.size, state.last_switch_s, shadow, now_s)


def _above(cfg: ScalingConfig, rps: float, size: int) -> str:
    return f"{rps:.2f} rps is above {cfg.headroom:g} × {cfg.capacity_rps(size):g} rps of tp{size}"


def _keep(reason: str) -> ScalingDecision:
    return ScalingDecision(ScalingAction.KEEP, None, reason)


def transition(state: ScalingState, event: ScalingEvent) -> tuple[ScalingState, ScalingDecision]:
    """Advance the sizing state machine by one event; the decision says what to do about it."""
    match state.mode, event:
        case ScalingMode.SERVING, LoadObserved(now_s=now, rps=rps):
            return _on_load_serving(state, now, rps)
        case ScalingMode.STARTING, LoadObserved(now_s=now, rps=rps):
            return _on_load_starting(state, now, rps)
        case ScalingMode.STARTING, ShadowReady(now_s=now, size=size) if size == state.shadow_size:
            reason = f"tp{size} is ready; tp{state.size} drains and stops"
            return _serving(state, size, now), ScalingDecision(ScalingAction.SWITCH_TO, size, reason)
        case _, ShadowReady(size=size):
            return state, _keep(f"ignored ready report of tp{size}: no such shadow is starting")
        case _:
            raise TypeError(f"not a scaling event: {event!r}")


def _on_load_serving(state: ScalingState, now_s: float, rps: float) -> tuple[ScalingState, ScalingDecision]:
    cfg = state.config
    size = state.size
    target = target_size(cfg, rps)
    if target > size:
        reason = _above(cfg, rps, size)
        return _starting(state, target, now_s), ScalingDecision(ScalingAction.START_SHADOW, target, reason)
    if target == size:
        return _serving(state, size, state.last_switch_s), _keep(f"tp{size} fits {rps:.2f} rps")

    since = now_s if state.down_since_s is None else state.down_since_s
    down = target if state.down_size is None else max(state.down_size, target)
    # The run restarts at every switch, so a run of grace_s is also grace_s since the last switch.
    if now_s - since >= cfg.grace_s:
        reason = f"tp{down} has sufficed for {now_s - since:.0f} s (grace {cfg.grace_s:g} s)"
        return _starting(state, down, now_s), ScalingDecision(ScalingAction.START_SHADOW, down, reason)
    waiting = ScalingState(cfg, ScalingMode.SERVING, size, state.last_switch_s, None, None, since, down)
    return waiting, _keep(f"tp{down} suffices since {since:.0f} s; scale-down waits for the grace period")


def _on_load_starting(state: ScalingState, now_s: float, rps: float) -> tuple[ScalingState, ScalingDecision]:
    cfg = state.config
    shadow, started_s = state.shadow_size, state.shadow_started_s
    assert shadow is not None and started_s is not None, "STARTING always has a shadow"
    if now_s - started_s >= cfg.shadow_timeout_s:
        reason = f"tp{shadow} not ready after {now_s - started_s:.0f} s"
        return _serving(state, state.size, state.last_switch_s), ScalingDecision(
            ScalingAction.STOP, shadow, reason
        )
    target = target_size(cfg, rps)
    if shadow < state.size and target > shadow:
        reason = _above(cfg, rps, shadow)
        return _serving(state, state.size, state.last_switch_s), ScalingDecision(
            ScalingAction.STOP, shadow, reason
        )
    return state, _keep(f"waiting for tp{shadow} to start; {rps:.2f} rps wants tp{target}")
