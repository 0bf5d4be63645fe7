"""The control loop: every period, poll the engine, decide, admit, set the clock — and fail safe.

One tick::

    adapter.poll() ─▶ watchdog: fresh? ─▶ policy.decide(view) ─▶ tracker.release(admitted)
                                              │ (pure, ~1 ms)        ─▶ actuator (only on change)
                                              └──────────────────────▶ observers (metrics, spans)

A policy decides when a new engine iteration arrives or requests wait for admission; between
those nothing it looks at has changed. Whatever goes wrong, the GPU goes back to stock clocks and
requests stop waiting (fail open), as DESIGN.md's "Safety first" asks:

- telemetry stale (`watchdog.stale_reason`) → stock until it is fresh again; every engine poll
  and GPU call has a deadline (`watchdog.call_timeout_s`), and staleness is checked before and
  after the poll, so stock is requested within `stale_after + poll interval` of the last fresh
  telemetry even when the engine or the GPU stops answering mid-tick;
- a tick raises → stock, then the loop restarts after an exponential backoff with a new policy;
- GPU errors by their kind (`agent.gpus.base`): transient (a call past its deadline too) → retry
  next tick, one WARNING per outage; permission denied or not supported → observe only
  (dry-run), loudly; lost → stop actuating.

The gateway never waits on this loop: it only reads `tracker.gating`, which is on only while a
gating policy controls a GPU it can actuate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.control.admission import EngineLimits
from agent.control.guard import GuardState
from agent.control.policies import ControlView, Policy, ThrottllemPolicy
from agent.domain import EngineStats, GpuSpec
from agent.engines.base import EngineAdapter, EngineError
from agent.gpus.base import (
    Actuator,
    DriverNotLoadedError,
    GpuLostError,
    GpuNotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    TransientGpuError,
)
from agent.gpus.dryrun import DryRunActuator
from agent.policy_registry import BuiltPolicy, needs_limits
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.tracker import RequestTracker
from agent.sidecar.watchdog import (
    ActuatorMode,
    Backoff,
    LoopMode,
    TelemetryTimes,
    call_timeout_s,
    not_ready_reasons,
    stale_reason,
    stock_deadline_s,
)

log = logging.getLogger(__name__)

PolicyBuilder = Callable[[str, EngineLimits | None], BuiltPolicy]  # (spec, limits) -> policy; may block


class OutageLog:
    """One WARNING when an outage starts, DEBUG while it lasts, one INFO when it ends.

    A lasting outage must not log a line per tick.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._failures = 0
        self._warned = False

    def failed(self, message: str, *, reported_elsewhere: bool = False) -> None:
        """One more failed call; `reported_elsewhere`: another part already warned of this outage."""
        first = self._failures == 0 and not reported_elsewhere
        log.log(logging.WARNING if first else logging.DEBUG, "%s", message)
        self._warned = self._warned or first
        self._failures += 1

    def recovered(self) -> None:
        """A call succeeded: the outage, if any, is over."""
        if self._warned:
            log.info("%s answers again after %d failed calls", self._what, self._failures)
        self._failures, self._warned = 0, False


@dataclass(frozen=True, slots=True)
class LoopConfig:
    """Timing and engine limits of the loop."""

    poll_interval_s: float = 0.1  # one poll and (at most) one decision per period
    stale_after_s: float = 2.0  # telemetry older than this: stock clocks, admission open
    max_batch_size: int = 256  # engine's build limit (not in its metrics)
    max_num_tokens: int = 8192  # engine's build limit (not in its metrics)
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision and what it was based on: the source of the metrics and spans."""

    at_s: float  # loop clock (monotonic), seconds
    wall_ns: int  # wall clock at the start of the decision, for spans
    decision_s: float  # time `policy.decide` took
    policy: str
    sm_clock_mhz: int | None  # clock asked for; None: stock
    clock_changed: bool  # a new lock or a reset was sent (or recorded, in dry-run)
    predicted_ips: float | None  # model's iterations/s at the chosen clock for the current batch
    measured_ips: float | None  # engine's iterations/s, measured
    min_slack_s: float | None  # least projected SLO slack of any request (predictive policies)
    batch: int | None  # requests in the engine's latest iteration
    kv_blocks_used: int | None
    kv_blocks_max: int | None
    guard_mode: str | None  # the SLO guard's mode (steady / boost) for guarded policies
    running: int  # requests admitted and not finished, at decision time
    queued: int  # requests waiting for admission, at decision time
    admitted: int  # of those, admitted by this decision


@dataclass(slots=True)
class LoopCounters:
    """Totals since start, for /metrics."""

    decisions: int = 0
    clock_changes: int = 0  # locks and resets that changed the GPU's state
    loop_restarts: int = 0  # ticks that raised
    stale_episodes: int = 0  # times telemetry went stale
    actuator_errors: int = 0  # GPU calls that failed


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """A snapshot of the loop for /readyz, /metrics and the admin API."""

    mode: LoopMode
    actuator_mode: ActuatorMode
    actuator: str  # the actuator's name (dryrun:... once the loop fell back to observing)
    policy_spec: str  # the policy asked for
    policy: str | None  # the policy deciding now; None while none is (starting, stale, failed)
    policy_error: str | None  # why the policy asked for could not be built
    locked_mhz: int | None  # clock the loop has locked; None: stock
    stale_reason: str | None
    last_error: str | None  # the last tick failure or GPU error
    engine_restarts: int
    not_ready: tuple[str, ...]  # empty when ready


class ControlLoop:
    """Drives one policy against one engine and one GPU; owns the actuator from `start` to `shutdown`."""

    def __init__(
        self,
        *,
        adapter: EngineAdapter,
        actuator: Actuator,
        tracker: RequestTracker,
        gpu: GpuSpec,
        policy_spec: str,
        build_policy: PolicyBuilder,
        config: LoopConfig = LoopConfig(),
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.adapter = adapter
        self.actuator = actuator
        self.tracker = tracker
        self.gpu = gpu
        self.config = config
        self.counters = LoopCounters()
        self.mode = LoopMode.STARTING
        self.actuator_mode = ActuatorMode.ACTUATING if actuator.actuates else ActuatorMode.OBSERVING
        self.last_decision: DecisionRecord | None = None
        self.last_error: str | None = None
        self._clock = tracker.clock  # decisions and the scoreboard share one clock
        self._wall_ns = wall_clock_ns
        self._build = build_policy
        self._observers: list[Callable[[DecisionRecord], None]] = []
        self._shut_down = False
        self.reset_error: str | None = None  # why the shutdown reset failed: the GPUs may stay locked
        self._spec = policy_spec  # the policy asked for
        self._policy: Policy | None = None
        self._gates = False  # the current policy gates admission
        self._built_for: tuple[str, EngineLimits | None] | None = None  # what `_policy` was built for
        self._failed_build: tuple[str, EngineLimits | None] | None = None  # not retried until it changes
        self._policy_error: str | None = None
        self._stats: EngineStats | None = None  # latest engine iteration
        self._limits: EngineLimits | None = None
        self._measured_ips: float | None = None
        self._times = TelemetryTimes(None, None, None)
        self._engine_outage = OutageLog(adapter.name)
        self._gpu_outage = OutageLog(actuator.name)
        self._locked_mhz: int | None = None  # what the loop locked; None: stock
        self._lock_known = False  # False until a reset succeeded: a dead sidecar may have left a lock
        self._must_decide = True  # decide even without a new iteration (new mode or policy)
        self._failures = 0  # ticks failed in a row

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Clear any lock a previous run left behind, before the first decision."""
        await self._ensure_stock(force=True)

    async def run(self) -> None:
        """Tick every period until cancelled; a failing tick is contained and the loop restarts."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await self.tick()
            except Exception as exc:  # any failure: fail safe, back off, go on
                await asyncio.sleep(await self._tick_failed(exc))
                continue
            await asyncio.sleep(self._pause_s(loop.time() - began))

    def _pause_s(self, tick_s: float) -> float:
        """Until the next period, or sooner: the next tick must ask for stock by the deadline."""
        pause = self.config.poll_interval_s - tick_s
        if not self._at_stock():
            deadline = stock_deadline_s(self._times, self.config.stale_after_s, self.config.poll_interval_s)
            if deadline is not None:
                pause = min(pause, deadline - self._clock())
        return max(0.0, pause)

    async def shutdown(self) -> None:
        """Open admission, reset the clock (whatever the mode: best effort), close the actuator; once."""
        if self._shut_down:
            return
        self._shut_down = True
        self._set_gating(False)
        try:
            await self.actuator.reset()
            self._locked_mhz, self._lock_known = None, True
        except Exception as exc:  # shutdown goes on; the exit status and the log say what to do
            self.reset_error = f"{type(exc).__name__}: {exc}"
            log.error("could not reset the clocks of %s on shutdown: %s", self.actuator.name, exc)
        try:
            await self.actuator.close()
        except Exception as exc:
            log.error("closing %s failed: %s", self.actuator.name, exc)

    def add_observer(self, observer: Callable[[DecisionRecord], None]) -> None:
        """Call `observer` with every decision (metrics, spans); its failures never reach control."""
        self._observers.append(observer)

    def request_policy(self, spec: str) -> None:
        """Switch to the policy `spec` (already checked) from the next tick."""
        log.info("policy %r requested (was %r)", spec, self._spec)
        self._spec = spec

    # -- one tick ----------------------------------------------------------------------------

    async def tick(self) -> None:
        """Poll, check freshness, decide, admit and actuate once.

        Freshness is checked before the poll (a call of the last tick may have hung past the
        bound), after it, and after a policy build (which may take a second).
        """
        await self._stock_if_stale()
        now = self._clock()
        new = await self._poll(now)
        if await self._stock_if_stale():
            return
        policy = await self._current_policy()
        if policy is None:
            await self._fail_safe(LoopMode.STARTING, "no policy to decide with yet")
            return
        if await self._stock_if_stale():
            return
        self._failures = 0
        if self.mode is not LoopMode.CONTROLLING:
            log.info("controlling with %s (actuator %s)", policy.name, self.actuator.name)
            self.mode = LoopMode.CONTROLLING
            self._set_gating(self._gates)
        if new is None and not self._must_decide and self.tracker.held == 0:
            return
        self._must_decide = False
        await self._decide(policy, now, new)

    async def _decide(self, policy: Policy, now: float, new: EngineStats | None) -> None:
        board = self.tracker.view()
        view = ControlView(now, self.gpu, new, self._limits, board, self._ran_at_mhz())
        wall_ns = self._wall_ns()
        started = time.perf_counter()
        decision = policy.decide(view)
        decision_s = time.perf_counter() - started
        self.tracker.release(decision.admit_request_ids)
        changed = await self._actuate(decision.sm_clock_mhz)
        stats = self._stats
        record = DecisionRecord(
            at_s=now,
            wall_ns=wall_ns,
            decision_s=decision_s,
            policy=policy.name,
            sm_clock_mhz=decision.sm_clock_mhz,
            clock_changed=changed,
            predicted_ips=predicted_ips(policy, stats, decision.sm_clock_mhz or self.gpu.max_clock_mhz),
            measured_ips=self._measured_ips,
            min_slack_s=getattr(policy, "last_min_slack_s", None),
            batch=None if stats is None else stats.scheduled_requests,
            kv_blocks_used=None if stats is None else stats.kv_blocks_used,
            kv_blocks_max=None if stats is None else stats.kv_blocks_max,
            guard_mode=guard_mode(policy),
            running=board.running,
            queued=board.queued,
            admitted=len(decision.admit_request_ids),
        )
        self.last_decision = record
        self.counters.decisions += 1
        for observer in self._observers:
            try:
                observer(record)
            except Exception:  # telemetry never breaks control
                log.exception("decision observer %r failed", observer)

    async def _stock_if_stale(self) -> bool:
        """Stock clocks and open admission when the telemetry is stale now; True if it is."""
        reason = stale_reason(self._clock(), self._times, self.config.stale_after_s)
        if reason is None:
            return False
        first = self._times.last_ok_s is None
        await self._fail_safe(LoopMode.STARTING if first else LoopMode.STALE, reason)
        return True

    async def _poll(self, now: float) -> EngineStats | None:
        timeout = self._call_timeout_s()
        answered = True
        try:
            stats = await asyncio.wait_for(self.adapter.poll(), timeout)
        except EngineError:
            stats = None  # the adapter logged it and keeps it in `health`
        except TimeoutError:
            stats, answered = None, False
            self._engine_outage.failed(
                f"{self.adapter.name}: no answer within the control loop's deadline ({timeout:.2f} s)",
                reported_elsewhere=not self.adapter.health.healthy,
            )
        healthy = answered and self.adapter.health.healthy
        if healthy:
            self._engine_outage.recovered()
        last_ok = now if healthy else self._times.last_ok_s
        last_new = self._times.last_new_s
        if stats is not None:
            last_new = now
            self._measure(stats)
            self._stats = stats
            if stats.kv_blocks_max > 0 and stats.tokens_per_block > 0:
                self._limits = EngineLimits(
                    stats.kv_blocks_max,
                    stats.tokens_per_block,
                    self.config.max_batch_size,
                    self.config.max_num_tokens,
                )
        busy = self.tracker.in_flight + self.tracker.held > 0
        busy_since = (
            None if not busy else now if self._times.busy_since_s is None else self._times.busy_since_s
        )
        self._times = TelemetryTimes(last_ok, last_new, busy_since)
        return stats

    def _measure(self, stats: EngineStats) -> None:
        """Iterations per second: the engine's own latency when it reports one, else counter deltas."""
        previous = self._stats
        if stats.iteration_latency_s:
            self._measured_ips = 1.0 / stats.iteration_latency_s
        elif (
            previous is not None
            and stats.iteration > previous.iteration
            and stats.timestamp_s > previous.timestamp_s
        ):
            self._measured_ips = (stats.iteration - previous.iteration) / (
                stats.timestamp_s - previous.timestamp_s
            )

    # -- policy ------------------------------------------------------------------------------

    async def _current_policy(self) -> Policy | None:
        """The policy for the spec asked for and the engine's limits; (re)built when either changed."""
        spec = self._spec
        key = (spec, self._limits if needs_limits(spec) else None)
        if self._policy is not None and self._built_for == key:
            return self._policy
        if key == self._failed_build or (needs_limits(spec) and self._limits is None):
            self._policy = None
            return None
        # A policy built for another spec or other limits must not keep the clock while we build.
        await self._fail_safe(LoopMode.STARTING, f"building policy {spec!r}")
        self._policy = None
        try:
            built = await asyncio.to_thread(self._build, *key)  # throttllem tabulates its model: ~1 s
        except Exception as exc:  # stay at stock and say why
            log.exception("cannot build policy %r; clocks stay at stock", spec)
            self._failed_build, self._policy_error = key, f"{spec}: {exc}"
            return None
        self._policy, self._built_for, self._policy_error = built.policy, key, None
        self._gates = built.lengths is not None
        self.tracker.lengths = built.lengths or MaxTokensPredictor()
        self._must_decide = True
        log.info("policy %s built (gates admission: %s)", built.policy.name, self._gates)
        return self._policy

    # -- safety ------------------------------------------------------------------------------

    async def _fail_safe(self, mode: LoopMode, reason: str) -> None:
        """Stock clocks and open admission, logged once per change of mode."""
        if mode is not self.mode:
            level = logging.WARNING if mode in (LoopMode.STALE, LoopMode.FAILED) else logging.INFO
            log.log(level, "%s: %s; clocks to stock, admission open", mode.value, reason)
            if mode is LoopMode.STALE:
                self.counters.stale_episodes += 1
            self.mode = mode
        self._set_gating(False)
        self._must_decide = True
        await self._ensure_stock()

    async def _tick_failed(self, exc: Exception) -> float:
        """Contain a failed tick: stock clocks, admission open, a fresh policy; returns the backoff."""
        self._failures += 1
        self.counters.loop_restarts += 1
        delay = self.config.backoff.delay_s(self._failures)
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "control tick failed; clocks to stock, admission open, restarting in %.1f s",
            delay,
            exc_info=exc,
        )
        self.mode = LoopMode.FAILED
        self._policy, self._built_for = None, None  # its state may be what broke
        self._set_gating(False)
        try:
            await self._ensure_stock()
        except Exception:  # the next tick retries the reset
            log.exception("could not reset the clocks after the failure")
        return delay

    def _set_gating(self, on: bool) -> None:
        """Hold requests only while a gating policy controls a GPU it can actuate; else release all."""
        gating = (
            on
            and self.mode is LoopMode.CONTROLLING
            and self.actuator_mode is ActuatorMode.ACTUATING
            and self._policy is not None
        )
        self.tracker.gating = gating
        if not gating:
            self.tracker.release_all()

    async def _ensure_stock(self, force: bool = False) -> None:
        if force or not self._at_stock():
            await self._apply(None)

    def _at_stock(self) -> bool:
        """The GPU is known to run at stock clocks: nothing to undo if the telemetry goes stale."""
        return self._lock_known and self._locked_mhz is None

    def _call_timeout_s(self) -> float:
        """The deadline of the next engine poll or GPU call (`watchdog.call_timeout_s`)."""
        return call_timeout_s(
            self._clock(),
            self._times,
            self.config.stale_after_s,
            self.config.poll_interval_s,
            self._at_stock(),
        )

    async def _actuate(self, clock_mhz: int | None) -> bool:
        """Send `clock_mhz` (None: reset) if it differs from what is set; True when the GPU changed."""
        if self._lock_known and clock_mhz == self._locked_mhz:
            return False
        return await self._apply(clock_mhz)

    async def _apply(self, clock_mhz: int | None) -> bool:
        if self.actuator_mode is ActuatorMode.LOST:
            return False
        timeout = self._call_timeout_s()
        try:
            async with asyncio.timeout(timeout):
                if clock_mhz is None:
                    await self.actuator.reset()
                else:
                    await self.actuator.set_clock_mhz(clock_mhz)
        except TimeoutError:
            self._lock_known = False  # the call may or may not have reached the GPU
            what = "reset" if clock_mhz is None else f"lock to {clock_mhz} MHz"
            self._gpu_error(TransientGpuError(f"{what} got no answer within {timeout:.2f} s"), "will retry")
            return False
        except TransientGpuError as exc:
            self._gpu_error(exc, "will retry next tick")
            return False
        except (PermissionDeniedError, NotSupportedError) as exc:
            self._gpu_error(exc, "observing only from now on")
            await self._observe_only()
            return False
        except (GpuLostError, GpuNotFoundError, DriverNotLoadedError) as exc:
            self._gpu_error(exc, "no clock will be set any more; the gateway keeps serving")
            self.actuator_mode = ActuatorMode.LOST
            self._set_gating(False)
            return False
        self._gpu_outage.recovered()
        changed = self._lock_known and clock_mhz != self._locked_mhz
        self._locked_mhz, self._lock_known = clock_mhz, True
        if changed:
            self.counters.clock_changes += 1
        return changed

    def _gpu_error(self, exc: Exception, consequence: str) -> None:
        self.counters.actuator_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        message = f"{self.actuator.name}: {exc}; {consequence}"
        if isinstance(exc, TransientGpuError):
            self._gpu_outage.failed(message)
        else:
            log.error("%s", message)

    async def _observe_only(self) -> None:
        """Swap the actuator for a dry-run one that observes it: decisions go on, nothing is set."""
        refused = self.actuator
        try:
            self.actuator = await DryRunActuator.observing(refused)
        except Exception:  # cannot even read it: take the catalog's clocks
            self.actuator = DryRunActuator.from_spec(self.gpu)
            try:
                await refused.close()
            except Exception as exc:
                log.error("closing %s failed: %s", refused.name, exc)
        log.error(
            "NOT CONTROLLING CLOCKS: %s refused them, running as %s (shadow mode) until restarted",
            refused.name,
            self.actuator.name,
        )
        self.actuator_mode = ActuatorMode.OBSERVING
        self._locked_mhz, self._lock_known = None, True
        self._set_gating(False)

    def _ran_at_mhz(self) -> int:
        """The clock the latest iteration ran at: the lock, else stock (which boosts to max when busy)."""
        if self.actuator_mode is ActuatorMode.ACTUATING and self._locked_mhz is not None:
            return self._locked_mhz
        return self.gpu.max_clock_mhz

    # -- status ------------------------------------------------------------------------------

    def status(self) -> LoopStatus:
        """What the loop is doing now; staleness as of now, whatever the current tick is waiting on."""
        stale = stale_reason(self._clock(), self._times, self.config.stale_after_s)
        return LoopStatus(
            mode=self.mode,
            actuator_mode=self.actuator_mode,
            actuator=self.actuator.name,
            policy_spec=self._spec,
            policy=self._policy.name
            if self._policy is not None and self.mode is LoopMode.CONTROLLING
            else None,
            policy_error=self._policy_error,
            locked_mhz=self._locked_mhz,
            stale_reason=stale,
            last_error=self.last_error,
            engine_restarts=self.adapter.health.restarts,
            not_ready=tuple(not_ready_reasons(self.mode, self.actuator_mode, stale, self._policy_error)),
        )


def predicted_ips(policy: Policy, stats: EngineStats | None, clock_mhz: int) -> float | None:
    """What the policy's time model expects the current decode batch to run at, at `clock_mhz`."""
    if not isinstance(policy, ThrottllemPolicy) or stats is None or stats.scheduled_requests == 0:
        return None
    index = np.flatnonzero(policy.model.clocks_mhz == clock_mhz)[:1]
    if not len(index):
        return None  # a clock outside the model's candidates
    seconds = policy.model.decode_s(
        index, np.array([stats.scheduled_requests]), np.array([stats.kv_blocks_used])
    )
    return 1.0 / float(seconds[0])


def guard_mode(policy: Policy) -> str | None:
    """The SLO guard's mode of a guarded policy (steady or boost)."""
    guard = getattr(policy, "guard", None)
    return guard.boost.mode.value if isinstance(guard, GuardState) else None
