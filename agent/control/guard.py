"""The SLO guard: keeps the predictive clock choice honest with what is measured (paper §3.6).

The clock search trusts a model of iteration time; the guard reinforces it in three ways, all pure
(the shell passes time and measurements in, and keeps the returned state):

- **Online correction.** Every iteration adds measured/predicted to a bounded window of its clock
  band. `correction(state, clock_mhz)` is a high quantile of that band's ratios, never below 1:
  multiplying predicted times by it only makes them more pessimistic. A band with few samples
  borrows from its neighbours (the model's error drifts slowly with the clock), then from all clocks.
- **Emergency boost.** When any request's projected slack falls below a margin, the GPU goes to
  max clock (the paper's fallback for requests about to be lost) and stays there until slack has
  been back above `margin × k` for a hold time. Modes and events are explicit (`transition`).
- **Hysteresis and a switch budget.** A clock lock costs ~5 ms on NVML (A800 measurement, p50) and
  stalls the engine while it settles, so `settle_clock` raises at once (SLO first), lowers only
  after the lower clock has been proposed for a dwell time, and never makes more than
  `max_switches_per_s` changes in any one-second window.

Invariant of `settle_clock`: the settled clock is never below the proposed one (capped at max).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from enum import Enum

_SWITCH_WINDOW_S = 1.0  # the budget counts switches in any window this long


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Guard tuning; every default is a starting point to measure, not a law."""

    band_width_mhz: int = 100  # clocks in one band share a correction; 100 MHz ≈ 7 NVML steps
    window: int = 256  # ratios kept per band (and globally): a few seconds of decode, so drift is followed
    quantile: float = 0.9  # the correction is this quantile of measured/predicted: p90 covers most noise
    min_samples: int = 16  # a band with fewer ratios borrows from its neighbours, then from all clocks
    boost_margin_s: float = 0.1  # slack below this → max clock; a few decode steps + a clock-lock delay
    boost_exit_factor: float = 2.0  # k: boost ends only once slack is back above margin × k ...
    boost_hold_s: float = 0.5  # ... continuously for this long, so one good projection does not end it
    dwell_s: float = 0.05  # a lower clock must be proposed this long before the guard lowers
    max_switches_per_s: int = 10  # clock changes allowed in any 1-s window (each costs ~5 ms of NVML)
    step_mhz: int = 15  # a lowering smaller than this is ignored; 15 MHz is NVML's clock grid

    def __post_init__(self) -> None:
        if self.band_width_mhz <= 0 or self.window <= 0 or self.min_samples <= 0 or self.step_mhz <= 0:
            raise ValueError("band_width_mhz, window, min_samples and step_mhz must be positive")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.boost_margin_s < 0 or self.boost_hold_s < 0 or self.dwell_s < 0:
            raise ValueError("boost_margin_s, boost_hold_s and dwell_s must not be negative")
        if self.boost_exit_factor < 1.0:
            raise ValueError(f"boost_exit_factor must be ≥ 1, got {self.boost_exit_factor}")
        if self.max_switches_per_s < 2:
            # One slot is always kept for a raise, so fewer than two would forbid every lowering.
            raise ValueError(f"max_switches_per_s must be ≥ 2, got {self.max_switches_per_s}")


DEFAULT_GUARD_CONFIG = GuardConfig()


@dataclass(frozen=True, slots=True)
class RatioWindow:
    """The last `GuardConfig.window` ratios measured/predicted of one band (or of every clock)."""

    recent: tuple[float, ...]  # oldest first; the oldest leaves when the window is full
    ordered: tuple[float, ...]  # the same ratios sorted, so any quantile costs O(1)

    def quantile(self, q: float) -> float:
        """Quantile with linear interpolation between order statistics (numpy's default method)."""
        ordered = self.ordered
        h = (len(ordered) - 1) * q
        lo = math.floor(h)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


class GuardMode(Enum):
    """Whether the guard leaves the clock to the controller or forces max clock."""

    STEADY = "steady"  # the controller's clock, through hysteresis and the switch budget
    BOOST = "boost"  # max clock: some request's slack fell below the margin


@dataclass(frozen=True, slots=True)
class BoostState:
    """Where the boost state machine is."""

    mode: GuardMode
    recovered_since_s: float | None  # BOOST: since when slack has stayed ≥ margin × k; else None


@dataclass(frozen=True, slots=True)
class ClockState:
    """The settled clock and what hysteresis and the switch budget remember."""

    clock_mhz: int  # the clock the guard last settled on (starts at max: SLO first)
    pending_since_s: float | None  # since when every proposal has been a lowering; None: none pending
    pending_mhz: int | None  # highest proposal since then: the clock all of them would accept
    switch_times_s: tuple[float, ...]  # times of the switches still inside the 1-s budget window


@dataclass(frozen=True, slots=True)
class GuardState:
    """Everything the guard carries from one iteration to the next."""

    config: GuardConfig
    max_clock_mhz: int  # the GPU's highest SM clock: boost target and cap of every proposal
    bands: tuple[RatioWindow | None, ...]  # indexed by clock_mhz // band_width_mhz; None: no sample
    overall: RatioWindow | None  # every clock together: last fallback and the telemetry figure
    boost: BoostState
    clock: ClockState


def initial_state(max_clock_mhz: int, config: GuardConfig = DEFAULT_GUARD_CONFIG) -> GuardState:
    """A fresh guard: no ratios yet, steady, settled at max clock (stock behaviour under load)."""
    if max_clock_mhz <= 0:
        raise ValueError(f"max_clock_mhz must be positive, got {max_clock_mhz}")
    return GuardState(
        config=config,
        max_clock_mhz=max_clock_mhz,
        bands=(None,) * (max_clock_mhz // config.band_width_mhz + 1),
        overall=None,
        boost=BoostState(GuardMode.STEADY, None),
        clock=ClockState(max_clock_mhz, None, None, ()),
    )


# --- online correction -------------------------------------------------------------------------


def _band(state: GuardState, clock_mhz: int) -> int:
    if not 0 < clock_mhz <= state.max_clock_mhz:
        raise ValueError(f"clock {clock_mhz} MHz outside (0, {state.max_clock_mhz}]")
    return clock_mhz // state.config.band_width_mhz


def _push(window: RatioWindow | None, ratio: float, capacity: int) -> RatioWindow:
    if window is None:
        return RatioWindow((ratio,), (ratio,))
    ordered = list(window.ordered)
    if len(window.recent) >= capacity:
        del ordered[bisect.bisect_left(ordered, window.recent[0])]
        recent = (*window.recent[1:], ratio)
    else:
        recent = (*window.recent, ratio)
    bisect.insort(ordered, ratio)
    return RatioWindow(recent, tuple(ordered))


def observe(state: GuardState, clock_mhz: int, predicted_s: float, measured_s: float) -> GuardState:
    """Record one iteration that ran at `clock_mhz`: the model said `predicted_s`, it took `measured_s`."""
    if not (predicted_s > 0 and measured_s > 0 and math.isfinite(predicted_s) and math.isfinite(measured_s)):
        raise ValueError(f"iteration times must be positive and finite, got {predicted_s=} {measured_s=}")
    b = _band(state, clock_mhz)
    ratio = measured_s / predicted_s
    capacity = state.config.window
    bands = state.bands
    return GuardState(
        config=state.config,
        max_clock_mhz=state.max_clock_mhz,
        bands=(*bands[:b], _push(bands[b], ratio, capacity), *bands[b + 1 :]),
        overall=_push(state.overall, ratio, capacity),
        boost=state.boost,
        clock=state.clock,
    )


def correction(state: GuardState, clock_mhz: int) -> float:
    """Factor (≥ 1) to multiply predicted iteration times at `clock_mhz` by."""
    return _band_correction(state, _band(state, clock_mhz))


def _band_correction(state: GuardState, b: int) -> float:
    """Correction of band `b`, falling back when it has fewer than `min_samples` ratios.

    Fallbacks in order: the more pessimistic of its two neighbours (the model's error drifts
    slowly with the clock), every clock together (even below `min_samples`: some evidence beats
    none), then 1.
    """
    cfg = state.config
    bands = state.bands
    own = bands[b]
    if own is not None and len(own.recent) >= cfg.min_samples:
        return max(1.0, own.quantile(cfg.quantile))
    best: float | None = None
    for i in (b - 1, b + 1):
        if 0 <= i < len(bands):
            neighbour = bands[i]
            if neighbour is not None and len(neighbour.recent) >= cfg.min_samples:
                q = neighbour.quantile(cfg.quantile)
                best = q if best is None else max(best, q)
    if best is not None:
        return max(1.0, best)
    if state.overall is not None:
        return max(1.0, state.overall.quantile(cfg.quantile))
    return 1.0


def summary(state: GuardState) -> dict[str, object]:
    """Telemetry snapshot: mode, settled clock, the ratio distribution overall and per band."""
    cfg = state.config
    overall = state.overall
    return {
        "mode": state.boost.mode.value,
        "clock_mhz": state.clock.clock_mhz,
        "samples": 0 if overall is None else len(overall.recent),
        "ratio_p50": None if overall is None else overall.quantile(0.5),
        "ratio_quantile": None if overall is None else overall.quantile(cfg.quantile),
        "ratio_max": None if overall is None else overall.ordered[-1],
        "bands": {
            b * cfg.band_width_mhz: {
                "samples": len(window.recent),
                "correction": _band_correction(state, b),
            }
            for b, window in enumerate(state.bands)
            if window is not None
        },
    }


# --- emergency boost ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlackObserved:
    """The controller projected every request's finish; the tightest one has this much slack."""

    now_s: float
    min_slack_s: float | None  # min over requests of deadline − projected finish; None: no requests


@dataclass(frozen=True, slots=True)
class TimePassed:
    """Time moved on without a new projection (e.g. an idle tick)."""

    now_s: float


GuardEvent = SlackObserved | TimePassed


def needs_boost(min_slack_s: float | None, margin_s: float) -> bool:
    """Whether the tightest request is too close to its deadline to trust any lower clock."""
    return min_slack_s is not None and min_slack_s < margin_s


def _boost_after(boost: BoostState, cfg: GuardConfig, event: GuardEvent) -> BoostState:
    match boost.mode, event:
        case GuardMode.STEADY, SlackObserved(min_slack_s=slack):
            return BoostState(GuardMode.BOOST, None) if needs_boost(slack, cfg.boost_margin_s) else boost
        case GuardMode.STEADY, TimePassed():
            return boost
        case GuardMode.BOOST, SlackObserved(now_s=now, min_slack_s=slack):
            if needs_boost(slack, cfg.boost_margin_s * cfg.boost_exit_factor):
                return BoostState(GuardMode.BOOST, None)
            since = now if boost.recovered_since_s is None else boost.recovered_since_s
            return _leave_if_held(since, now, cfg)
        case GuardMode.BOOST, TimePassed(now_s=now):
            if boost.recovered_since_s is None:
                return boost
            return _leave_if_held(boost.recovered_since_s, now, cfg)
        case _:
            raise TypeError(f"not a guard event: {event!r}")


def _leave_if_held(recovered_since_s: float, now_s: float, cfg: GuardConfig) -> BoostState:
    if now_s - recovered_since_s >= cfg.boost_hold_s:
        return BoostState(GuardMode.STEADY, None)
    return BoostState(GuardMode.BOOST, recovered_since_s)


def transition(state: GuardState, event: GuardEvent) -> GuardState:
    """Advance the boost state machine by one event.

    STEADY → BOOST when slack < margin. BOOST → STEADY once slack has stayed ≥ margin × k for the
    hold time; any observation below margin × k restarts the hold.
    """
    boost = _boost_after(state.boost, state.config, event)
    if boost is state.boost:
        return state
    return GuardState(state.config, state.max_clock_mhz, state.bands, state.overall, boost, state.clock)


# --- hysteresis and switch budget --------------------------------------------------------------


def settle_clock(state: GuardState, proposed_mhz: int, now_s: float) -> tuple[int, GuardState]:
    """The clock to lock now, given the controller's proposal; `now_s` never decreases.

    - BOOST: max clock, whatever was proposed.
    - Raise: at once. When the raise would use the last switch of the budget it goes to max clock,
      so no further raise can be needed before the budget frees up.
    - Lowering: only after every proposal has been at least one step lower for `dwell_s`, to the
      highest of those proposals, and only while a switch would still leave one for a raise.
    """
    cfg = state.config
    clk = state.clock
    top = state.max_clock_mhz
    switches = clk.switch_times_s
    if switches and now_s < switches[-1]:
        raise ValueError(f"time went backwards: {now_s} < last switch at {switches[-1]}")
    start = 0
    while start < len(switches) and now_s - switches[start] >= _SWITCH_WINDOW_S:
        start += 1
    switches = switches[start:]
    budget_left = cfg.max_switches_per_s - len(switches)
    target = top if state.boost.mode is GuardMode.BOOST else min(proposed_mhz, top)
    current = clk.clock_mhz

    if target > current:
        new = target if budget_left > 1 else top
        return new, _with_clock(state, ClockState(new, None, None, (*switches, now_s)))
    if current - target < cfg.step_mhz:
        if clk.pending_since_s is None and start == 0:
            return current, state
        return current, _with_clock(state, ClockState(current, None, None, switches))

    since = now_s if clk.pending_since_s is None else clk.pending_since_s
    lower_to_mhz = target if clk.pending_mhz is None else max(clk.pending_mhz, target)
    if now_s - since >= cfg.dwell_s and budget_left > 1:
        return lower_to_mhz, _with_clock(state, ClockState(lower_to_mhz, None, None, (*switches, now_s)))
    return current, _with_clock(state, ClockState(current, since, lower_to_mhz, switches))


def _with_clock(state: GuardState, clock: ClockState) -> GuardState:
    return GuardState(state.config, state.max_clock_mhz, state.bands, state.overall, state.boost, clock)
