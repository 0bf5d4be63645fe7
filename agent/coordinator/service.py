"""The coordinator's loop: the sizing state machine of `agent.control.scaling`, carried out live.

Every tick (`period_s`, paper §3.7: about 10 s):

1. a shadow that is starting and reports ready moves traffic (`ShadowReady` → SWITCH_TO): the
   backend routes to it, and the engine that served until then **drains**;
2. the serving engine's arrival rate since the last tick (its sidecar's arrival counter) is the
   `LoadObserved` event; a tick whose load cannot be read decides nothing;
3. a draining engine is stopped once its sidecar holds and runs no request (and it has drained
   at least `min_drain_s`, for requests still on their way), or after `drain_timeout_s`
   whatever it holds (its sidecar resets its GPUs as it stops).

An action the backend fails is kept and retried first on the next tick; every action is
idempotent. Traffic is routed only to an engine the backend reports ready. On start the
coordinator asks the backend where things stand: the routed size is the serving one (started
if it is not running); any other size still running is drained if it is ready, so a coordinator
restarted in the middle of a switch finishes it rather than starting over, and stopped at once
if it is not (it never served). A start the backend fails is tried again the next period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from agent.control.scaling import (
    LoadObserved,
    ScalingAction,
    ScalingConfig,
    ScalingEvent,
    ScalingMode,
    ScalingState,
    ShadowReady,
    initial_state,
    transition,
)
from agent.coordinator.backend import BackendError, ScaleBackend
from agent.coordinator.load import ArrivalRate

log = logging.getLogger(__name__)

TRACER_NAME = "throttllem.coordinator"

DEFAULT_DRAIN_TIMEOUT_S = 300.0  # a request may stream for minutes; past this the engine stops anyway
# Requests routed just before a switch are still on their way (a proxy's connection, kube-proxy
# rules updating on every node): an engine drains at least this long even when it looks idle.
DEFAULT_MIN_DRAIN_S = 10.0


class _NotReadyError(Exception):
    """A route waits for its engine to be ready: not a failure, tried again next tick."""


@dataclass(frozen=True, slots=True)
class Action:
    """A backend call the state machine decided, kept until it succeeds."""

    kind: str  # "start", "route", "stop"
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    """Where the coordinator stands, for /healthz and /metrics."""

    serving: int | None
    shadow: int | None
    draining: tuple[int, ...]
    pending: tuple[str, ...]  # actions waiting to be carried out, e.g. "route tp2"
    last_reason: str
    arrival_rate_rps: float | None


@dataclass(slots=True)
class CoordinatorRecord:
    """What the coordinator did, for its /metrics and logs."""

    actions: list[tuple[float, Action]] = field(default_factory=list)  # (time, action) that succeeded
    failures: int = 0  # backend calls that failed (and were retried)
    last_reason: str = ""  # the latest decision's reason
    last_rate_rps: float | None = None


class Coordinator:
    """Sizes one model's engine; call `start()` once, then `tick()` every period."""

    def __init__(
        self,
        backend: ScaleBackend,
        scaling: ScalingConfig,
        *,
        initial_size: int,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        min_drain_s: float = DEFAULT_MIN_DRAIN_S,
        clock: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if not 0 <= min_drain_s <= drain_timeout_s:
            raise ValueError("need 0 <= min_drain_s <= drain_timeout_s")
        scaling.capacity_rps(initial_size)  # refuses a size that was never profiled
        self.backend = backend
        self.scaling = scaling
        self.initial_size = initial_size
        self.drain_timeout_s = drain_timeout_s
        self.min_drain_s = min_drain_s
        self.clock = clock
        self.state: ScalingState | None = None
        self.draining: dict[int, float] = {}  # size -> when traffic left it
        self.record = CoordinatorRecord()
        self._pending: list[Action] = []
        self._rate = ArrivalRate()
        self._tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer(TRACER_NAME)

    async def start(self) -> None:
        """Rebuild where things stand from the backend; route to the initial size if nothing is.

        Called again after a lapse of leadership, it forgets what it had planned: the backend,
        which another coordinator may have changed meanwhile, is the truth.
        """
        now = self.clock()
        self._pending.clear()
        self.draining.clear()
        self._rate.reset()
        routed = await self.backend.routed_size()
        serving = routed if routed is not None else self.initial_size
        self.state = initial_state(self.scaling, serving, now)
        running = await self.backend.running_sizes()
        if routed is None:
            self._pending += [
                Action("start", serving, "nothing routed yet"),
                Action("route", serving, "first"),
            ]
        elif routed not in running:
            self._pending.append(Action("start", serving, "routed to but not running"))
        for size in running:
            if size == serving:
                continue
            if await self._ready(size):
                self.draining[size] = now  # a switch left half done: finish it
            else:  # never served (a shadow, or a Deployment just created at one replica): nothing to drain
                self._pending.append(Action("stop", size, "running, not routed to, not ready"))
        await self._run_pending(now)

    def status(self) -> CoordinatorStatus:
        """A snapshot of the state machine, the drains and what waits."""
        state = self.state
        return CoordinatorStatus(
            serving=None if state is None else state.size,
            shadow=None if state is None else state.shadow_size,
            draining=tuple(sorted(self.draining)),
            pending=tuple(f"{a.kind} tp{a.size}" for a in self._pending),
            last_reason=self.record.last_reason,
            arrival_rate_rps=self.record.last_rate_rps,
        )

    async def tick(self) -> None:
        """One period: retry what failed, switch to a ready shadow, decide on load, stop drained engines."""
        assert self.state is not None, "call start() first"
        now = self.clock()
        if not await self._run_pending(now):  # what failed last period goes first, alone
            return
        if not await self._switch_to_ready_shadow(now):
            return
        rate = await self._arrival_rate(now)
        if rate is not None:
            self._observe(LoadObserved(now, rate), now)
            if not await self._run_pending(now):
                return
        await self._stop_drained(now)
        await self._run_pending(now)

    async def check_shadow(self) -> None:
        """Between ticks: move traffic as soon as the starting shadow is ready, not a period later."""
        assert self.state is not None, "call start() first"
        if not self._pending:  # what failed waits for the tick, which retries it first
            await self._switch_to_ready_shadow(self.clock())

    async def _switch_to_ready_shadow(self, now: float) -> bool:
        """Route to the starting shadow if it is ready; False when an action it needs failed."""
        assert self.state is not None
        shadow = self.state.shadow_size if self.state.mode is ScalingMode.STARTING else None
        if shadow is None or not await self._ready(shadow):
            return True
        self._observe(ShadowReady(now, shadow), now)
        return await self._run_pending(now)

    async def _ready(self, size: int) -> bool:
        try:
            return await self.backend.is_ready(size)
        except BackendError as err:
            log.warning("could not tell whether tp%d is ready: %s", size, err)
            return False

    async def _arrival_rate(self, now: float) -> float | None:
        assert self.state is not None
        try:
            load = await self.backend.load(self.state.size)
        except BackendError as err:
            log.warning("no load from tp%d this period, nothing decided: %s", self.state.size, err)
            self._rate.reset()
            return None
        rate = self._rate.update(now, load.arrived_total)
        self.record.last_rate_rps = rate
        return rate

    def _observe(self, event: ScalingEvent, now: float) -> None:
        """Advance the state machine; what it decides joins the pending actions."""
        assert self.state is not None
        serving_before = self.state.size
        self.state, decision = transition(self.state, event)
        self.record.last_reason = decision.reason
        size = decision.size
        if decision.action is ScalingAction.KEEP or size is None:
            return
        log.info("%s tp%d: %s", decision.action.value, size, decision.reason)
        if decision.action is ScalingAction.START_SHADOW:
            self.draining.pop(size, None)  # an engine of that size still draining serves as the shadow
            self._pending.append(Action("start", size, decision.reason))
        elif decision.action is ScalingAction.STOP:
            self._pending.append(Action("stop", size, decision.reason))
        else:
            self._pending.append(Action("route", size, decision.reason))
            self.draining[serving_before] = now
            self.draining.pop(size, None)
            self._rate.reset()  # the arrival counter to read is the new engine's

    async def _run_pending(self, now: float) -> bool:
        """Carry out pending actions in order; False when one failed (it stays, with those after it)."""
        while self._pending:
            action = self._pending[0]
            try:
                await self._call(action)
            except _NotReadyError:
                return False
            except BackendError as err:
                self.record.failures += 1
                log.warning("%s tp%d failed, retried next period: %s", action.kind, action.size, err)
                return False
            self._pending.pop(0)
            self.record.actions.append((now, action))
        return True

    async def _call(self, action: Action) -> None:
        """One backend call, as one span (a route still waiting for readiness records none)."""
        if action.kind == "route" and not await self.backend.is_ready(action.size):
            raise _NotReadyError(
                f"tp{action.size} is not ready yet"
            )  # never route to an engine that cannot serve
        attributes = {
            "throttllem.action": action.kind,
            "throttllem.tp": action.size,
            "throttllem.reason": action.reason,
        }
        with self._tracer.start_as_current_span(f"coordinator.{action.kind}", attributes=attributes) as span:
            try:
                await self._backend_call(action)
            except BackendError as err:
                span.set_status(Status(StatusCode.ERROR, str(err)))
                raise

    async def _backend_call(self, action: Action) -> None:
        if action.kind == "start":
            await self.backend.start(action.size)
        elif action.kind == "route":
            await self.backend.route_to(action.size)
        else:
            await self.backend.stop(action.size)

    async def _stop_drained(self, now: float) -> None:
        for size, since in list(self.draining.items()):
            if now - since < self.min_drain_s:
                continue
            try:
                busy = (await self.backend.load(size)).busy
            except BackendError as err:
                log.warning("no load from draining tp%d: %s", size, err)
                busy = True
            if busy and now - since < self.drain_timeout_s:
                continue
            reason = (
                "drained" if not busy else f"drain timeout ({self.drain_timeout_s:g} s) with requests left"
            )
            self._pending.append(Action("stop", size, reason))
            del self.draining[size]


class Elector(Protocol):
    """Who may act: a Lease on Kubernetes (`agent.coordinator.lease`)."""

    async def hold(self) -> bool:
        """Acquire or renew leadership; whether this coordinator may act until the next call."""
        ...


Sleep = Callable[[float], Awaitable[object]]


async def wait_period(
    coordinator: Coordinator, period_s: float, sleep: Sleep, ready_poll_s: float | None
) -> None:
    """Sleep one period; every `ready_poll_s` of it (None: never) switch to a shadow that is ready."""
    if ready_poll_s is None or coordinator.state is None:
        await sleep(period_s)
        return
    waited = 0.0
    while period_s - waited > 1e-9:
        step = min(ready_poll_s, period_s - waited)
        await sleep(step)
        waited += step
        if waited < period_s - 1e-9:  # the tick after the last step looks anyway
            await coordinator.check_shadow()


async def lead(
    coordinator: Coordinator,
    elector: Elector,
    period_s: float,
    sleep: Sleep = asyncio.sleep,
    ready_poll_s: float | None = None,
) -> None:
    """Tick `coordinator` every period in which it leads; rebuild its state each time it gains the lead.

    Within a period it leads, it also looks every `ready_poll_s` for a shadow that became ready
    (the Lease it renewed at the period's start outlasts the period).
    """
    leading = False
    while True:
        try:
            holds = await elector.hold()
        except BackendError as err:
            log.warning("leadership unknown, not acting this period: %s", err)
            holds = False
        if holds and not leading:
            log.info("leading: reading where engines stand")
            try:
                await coordinator.start()
            except BackendError as err:
                log.warning("could not read where engines stand, tried again next period: %s", err)
                holds = False  # not leading yet: start again next period
        elif holds:
            await coordinator.tick()
        elif leading:
            log.warning("lost the lead: another coordinator acts now")
        leading = holds
        await wait_period(coordinator, period_s, sleep, ready_poll_s if leading else None)
