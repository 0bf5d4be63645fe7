"""The live scoreboard: what the gateway sees of each request, and where it waits for admission.

The gateway reports arrivals, first tokens, streamed tokens and completions; the control loop
reads a snapshot (`view`) every tick and answers with the queued requests it admits (`release`).
A request the policy has not admitted yet waits here, bounded in number and in time:

- the hold is *fail-open*: when the control loop is not gating (a non-gating policy, or the
  watchdog found the loop unhealthy) every request is admitted at once, and nothing waits longer
  than `max_hold_s` whatever the loop does — the proxy must keep serving;
- when `max_held` requests already wait, a new one is refused with `HoldQueueFull`, which the
  gateway turns into 429 with Retry-After: never a silent drop. The gateway asks (`check_room`)
  before it reads a body, so a full queue costs no memory.

Times come from the injected `clock` (monotonic seconds), the same clock the loop decides with.
With an `energy` ledger the tracker also reports each request's tokens to it (prompt tokens with
the first output token, when prefill is done), so energy can be charged per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.control.scoreboard import Scoreboard, ScoreboardView
from agent.domain import Request
from agent.predict.lengths import LengthPredictor
from agent.sidecar.request_energy import RequestEnergyLedger

log = logging.getLogger(__name__)


class HoldQueueFullError(Exception):
    """Too many requests already wait for admission; retry after `retry_after_s`."""

    def __init__(self, held: int, retry_after_s: float) -> None:
        super().__init__(f"{held} requests already wait for admission")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Ticket:
    """One request through the gateway."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    admitted: asyncio.Future[None] = field(repr=False)
    public_id: str = field(default_factory=lambda: secrets.token_hex(16))  # opaque, for the client
    admitted_s: float | None = None
    first_token_s: float | None = None
    tokens: int = 0


@dataclass(slots=True)
class TrackerCounters:
    """Totals since start, for /metrics."""

    arrived: int = 0
    admitted: int = 0
    admitted_on_timeout: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0


class RequestTracker:
    """Requests between the gateway and the engine, on a control-core scoreboard."""

    def __init__(
        self,
        lengths: LengthPredictor,
        *,
        max_held: int = 256,
        max_hold_s: float = 5.0,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        energy: RequestEnergyLedger | None = None,
    ) -> None:
        self.lengths = lengths
        self.energy = energy  # told of every request's tokens, when energy is charged per request
        self.max_held = max_held
        self.max_hold_s = max_hold_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.gating = False  # the control loop turns this on when it runs a gating policy
        self.counters = TrackerCounters()
        self._board = Scoreboard()
        self._tickets: dict[int, Ticket] = {}
        self._held: dict[int, Ticket] = {}
        self._ids = itertools.count(1)

    @property
    def held(self) -> int:
        """Requests waiting for admission."""
        return len(self._held)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished."""
        return len(self._tickets) - len(self._held)

    def check_room(self) -> None:
        """HoldQueueFullError if a request arriving now would be refused: asked before its body is read."""
        if self.gating and len(self._held) >= self.max_held:
            self.counters.rejected += 1
            raise HoldQueueFullError(len(self._held), self.retry_after_s)

    def arrive(self, prompt_tokens: int, max_tokens: int, *, model: str = "", tenant: str = "") -> Ticket:
        """Register a request; it is admitted at once unless the loop gates admission.

        `model` and `tenant` label its energy (already cut to label length).
        """
        self.check_room()
        now = self.clock()
        request_id = next(self._ids)
        prompt, cap = max(1, prompt_tokens), max(1, max_tokens)
        request = Request(request_id, now, prompt, cap)
        predicted = int(self.lengths.predict([request])[0])
        self._board.add_queued(request, predicted)
        ticket = Ticket(request_id, now, prompt, cap, asyncio.get_running_loop().create_future())
        self._tickets[request_id] = ticket
        self._held[request_id] = ticket
        self.counters.arrived += 1
        if self.energy is not None:
            self.energy.open(ticket.public_id, model, tenant)
        if not self.gating:
            self._admit(ticket, now)
        return ticket

    async def wait_admitted(self, ticket: Ticket) -> None:
        """Return once the request may go to the engine (at the latest after `max_hold_s`)."""
        if ticket.admitted.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(ticket.admitted), self.max_hold_s)
        except TimeoutError:
            if ticket.request_id in self._held:
                log.warning(
                    "request %d held %.1f s without admission: sending it", ticket.request_id, self.max_hold_s
                )
                self.counters.admitted_on_timeout += 1
                self._admit(ticket, self.clock())

    def release(self, request_ids: Iterable[int]) -> None:
        """The control loop admits these queued requests."""
        now = self.clock()
        for request_id in request_ids:
            ticket = self._held.get(request_id)
            if ticket is not None:
                self._admit(ticket, now)

    def release_all(self) -> None:
        """Fail open: admit everything that waits (loop unhealthy, policy no longer gating)."""
        self.release(list(self._held))

    def first_token(self, ticket: Ticket) -> None:
        """The engine streamed the request's first output token."""
        if ticket.first_token_s is None and ticket.request_id in self._tickets:
            ticket.first_token_s = self.clock()
            ticket.tokens = 1
            self._board.first_token(ticket.request_id, ticket.first_token_s)
            if self.energy is not None:  # prefill is done: the prompt's tokens count now
                self.energy.add_tokens(ticket.public_id, ticket.prompt_tokens + 1)

    def add_tokens(self, ticket: Ticket, tokens: int) -> None:
        """More output tokens streamed (after the first)."""
        if tokens > 0 and ticket.request_id in self._tickets:
            ticket.tokens += tokens
            self._board.add_tokens(ticket.request_id, tokens)
            if self.energy is not None:
                self.energy.add_tokens(ticket.public_id, tokens)

    def finish(self, ticket: Ticket, ok: bool) -> None:
        """The request completed (`ok`) or failed; forget it."""
        if self._tickets.pop(ticket.request_id, None) is None:
            return
        held = self._held.pop(ticket.request_id, None)
        if held is not None and not held.admitted.done():
            held.admitted.cancel()
        self._board.finish(ticket.request_id)
        if self.energy is not None:
            self.energy.finish(ticket.public_id, self.clock())
        if ok:
            self.counters.completed += 1
        else:
            self.counters.failed += 1

    def view(self) -> ScoreboardView:
        """Snapshot for one decision."""
        return self._board.view()

    def _admit(self, ticket: Ticket, now: float) -> None:
        del self._held[ticket.request_id]
        ticket.admitted_s = now
        self._board.admit(ticket.request_id)
        self.counters.admitted += 1
        if not ticket.admitted.done():
            ticket.admitted.set_result(None)
