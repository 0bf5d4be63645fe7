"""Joules per request: the meter's energy split among the requests that processed tokens.

The rule. Between two meter readings that advanced (a *window*), the engine's GPUs (all of
them) used ``E = reading_now - reading_before``. A request processed tokens in that window when:

- its prefill completed — its first output token arrived — which counts its prompt tokens and
  that first token;
- an output token of it was streamed (a whole, non-streamed answer counts all its tokens when
  it arrives).

Request ``r`` is charged ``E * tokens_r / tokens_all`` of the window. A window in which no
request processed a token is *idle* energy, counted apart and charged to nobody; so, exactly up
to float rounding, ``sum(charged) + idle == metered`` (the readings' increase since the first).
A request's energy is final at the first window that closes after it finished.

Why tokens: a transformer's forward pass costs ~2 x parameters FLOPs per token, in prefill and
decode alike, and energy follows FLOPs to first order. The limits of that:

- prefill and decode tokens weigh the same, though prefill is compute-bound and batched while
  decode is memory-bound: at small batches a decode token costs more energy than a prompt token,
  and long prompts are charged less than their attention (quadratic in length) costs;
- the window's whole energy, idle power included, goes to the tokens of that window: a request
  alone on the GPU pays for all of it, one among many pays a share;
- the resolution is the meter's: tokens are placed in the window in which the gateway saw them
  (an iteration or so after the GPU computed them), and all tokens of a window cost the same;
- a request that failed before its first token is charged nothing, though its prefill may
  have run; prompt tokens are the gateway's count (the tokenizer's, or an estimate).

Meter readings arrive through `tick`. A reading equal to the last one (the meter has not
updated: dcgm-exporter publishes on its own interval, and a GPU never draws 0 W) or none (the
read failed) keeps the window open, so its energy is charged once the meter updates. A reading
below the last one (the meter restarted) starts afresh: the tokens of that window are charged
nothing, as are those before the first reading. A finished request waits at most
`settle_within_s` (and behind at most `max_finished` others) for its window to close; past
that it is final with what it has, so a meter that stops updating cannot hold requests forever.

Bounded memory: finished requests are kept for lookup in an LRU of `max_finished`; open ones
are the tracker's, which bounds them. Pure: no I/O, no clock — times are passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_FINISHED = 10_000  # finished requests kept for lookup (~300 B each: 3 MB)
DEFAULT_SETTLE_WITHIN_S = 120.0  # > dcgm-exporter's default 30 s collection interval, with room
MAX_LABEL_CHARS = 64  # a model or tenant longer than this is cut: a label value is not a payload
OVERFLOW_LABEL = "other"  # the label value of every model or tenant past the cap


@dataclass(frozen=True, slots=True)
class RequestEnergy:
    """One request's energy as known now."""

    request_id: str  # the opaque id the client was given
    energy_j: float  # joules charged so far (all of it once `final`)
    tokens: int  # prompt and output tokens counted so far
    final: bool  # the request finished and its last window closed: `energy_j` will not change
    model: str  # the served model the request named ("" when it named none)
    tenant: str  # the tenant header's value ("" when unset or absent)


@dataclass(slots=True)
class _Open:
    """A request not final yet: running, or finished and waiting for its window to close."""

    model: str
    tenant: str
    energy_j: float = 0.0
    tokens: int = 0
    window_tokens: int = 0  # tokens in the open window
    finished_s: float | None = None


class RequestEnergyLedger:
    """Charges each window's energy to the requests that processed tokens in it."""

    def __init__(
        self, max_finished: int = DEFAULT_MAX_FINISHED, settle_within_s: float = DEFAULT_SETTLE_WITHIN_S
    ) -> None:
        if max_finished < 1:
            raise ValueError(f"max_finished must be >= 1, got {max_finished}")
        if settle_within_s <= 0:
            raise ValueError(f"settle_within_s must be positive, got {settle_within_s}")
        self.max_finished = max_finished
        self.settle_within_s = settle_within_s
        self.metered_j = 0.0  # the readings' increase since the first reading
        self.attributed_j = 0.0  # charged to requests
        self.idle_j = 0.0  # windows without tokens
        self._reading_j: float | None = None  # the last reading that closed a window
        self._open: dict[str, _Open] = {}
        self._window: dict[str, _Open] = {}  # requests with tokens in the open window
        self._window_tokens = 0
        self._finished: dict[str, _Open] = {}  # finished, not final; in finishing order
        self._final: OrderedDict[str, RequestEnergy] = OrderedDict()

    def open(self, request_id: str, model: str = "", tenant: str = "") -> None:
        """A request arrived."""
        self._open[request_id] = _Open(model, tenant)

    def add_tokens(self, request_id: str, tokens: int) -> None:
        """The request processed `tokens` more (prompt tokens when its first token arrives)."""
        request = self._open.get(request_id)
        if request is None or request.finished_s is not None or tokens <= 0:
            return
        request.tokens += tokens
        request.window_tokens += tokens
        self._window_tokens += tokens
        self._window[request_id] = request

    def finish(self, request_id: str, now_s: float) -> None:
        """The request completed or failed; its energy is final when its window closes."""
        request = self._open.get(request_id)
        if request is None or request.finished_s is not None:
            return
        request.finished_s = now_s
        self._finished[request_id] = request

    def tick(self, reading_j: float | None, now_s: float) -> list[RequestEnergy]:
        """A meter reading (joules since the meter opened; None: the read failed): what became final.

        Costs O(requests with tokens in the window + requests that became final).
        """
        if reading_j is not None and self._reading_j is not None and reading_j > self._reading_j:
            self._close_window(reading_j - self._reading_j)
            self._reading_j = reading_j
            return [self._settle(request_id) for request_id in list(self._finished)]
        if reading_j is not None and (self._reading_j is None or reading_j < self._reading_j):
            self._drop_window()  # first reading, or the meter restarted: this window's energy is unknown
            self._reading_j = reading_j
            return [self._settle(request_id) for request_id in list(self._finished)]
        return [self._settle(request_id) for request_id in self._overdue(now_s)]

    def lookup(self, request_id: str) -> RequestEnergy | None:
        """The request's energy now; None when it is unknown (never seen, or forgotten)."""
        request = self._open.get(request_id)
        if request is not None:
            return _energy(request_id, request, final=False)
        known = self._final.get(request_id)
        if known is not None:
            self._final.move_to_end(request_id)
        return known

    def _close_window(self, energy_j: float) -> None:
        self.metered_j += energy_j
        if not self._window_tokens:
            self.idle_j += energy_j
            return
        per_token = energy_j / self._window_tokens
        for request in self._window.values():
            share = request.window_tokens * per_token
            request.energy_j += share
            self.attributed_j += share
            request.window_tokens = 0
        self._window.clear()
        self._window_tokens = 0

    def _drop_window(self) -> None:
        for request in self._window.values():
            request.window_tokens = 0
        self._window.clear()
        self._window_tokens = 0

    def _overdue(self, now_s: float) -> list[str]:
        """Finished requests that waited too long, or too many: the oldest first, O(their number)."""
        overdue: list[str] = []
        for request_id, request in self._finished.items():  # in finishing order: oldest first
            assert request.finished_s is not None  # set by `finish`
            too_many = len(self._finished) - len(overdue) > self.max_finished
            if not too_many and now_s - request.finished_s < self.settle_within_s:
                break
            overdue.append(request_id)
        return overdue

    def _settle(self, request_id: str) -> RequestEnergy:
        """Final with what it has; its tokens in the open window (if any) are charged nothing."""
        request = self._finished.pop(request_id)
        del self._open[request_id]
        if self._window.pop(request_id, None) is not None:
            self._window_tokens -= request.window_tokens
        final = _energy(request_id, request, final=True)
        self._final[request_id] = final
        if len(self._final) > self.max_finished:
            self._final.popitem(last=False)
        return final


def _energy(request_id: str, request: _Open, *, final: bool) -> RequestEnergy:
    return RequestEnergy(request_id, request.energy_j, request.tokens, final, request.model, request.tenant)


def label_value(text: str | None) -> str:
    """A client-supplied model or tenant as a label value: cut to `MAX_LABEL_CHARS`; "" for none."""
    return "" if text is None else text[:MAX_LABEL_CHARS]


class LabelCap:
    """At most `max_values` distinct values of one label; later new values become `OVERFLOW_LABEL`.

    A hostile client choosing label values (a tenant header, a model name) would otherwise
    create a time series per value: memory in the sidecar, cardinality in Prometheus.
    """

    def __init__(self, max_values: int) -> None:
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        self.max_values = max_values
        self._seen: set[str] = set()

    def label(self, value: str) -> str:
        """`value` if it is one of the first `max_values` seen, else `OVERFLOW_LABEL`."""
        if value in self._seen:
            return value
        if len(self._seen) >= self.max_values:
            return OVERFLOW_LABEL
        self._seen.add(value)
        return value
