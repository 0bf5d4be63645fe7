"""An engine's load as its sidecar reports it on /metrics, and the arrival rate between two reads.

The coordinator needs four figures from the sidecar of every engine: requests arrived at its
gateway (a counter), held for admission, in flight, and whether the page could be read at all.
The rate is the counter's increase over the time between two reads, as Prometheus `rate()` takes
it: a counter that went down (the sidecar restarted) counts from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.engines.prometheus_text import parse_samples, value

ARRIVED = "throttllem_requests_arrived_total"
HELD = "throttllem_requests_held"
IN_FLIGHT = "throttllem_requests_in_flight"


class LoadUnreadableError(ValueError):
    """A sidecar's page lacks the figures a sizing decision needs."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One read of an engine's sidecar."""

    arrived_total: float  # requests that reached its gateway since the sidecar started
    held: int  # waiting for admission
    in_flight: int  # admitted and not finished

    @property
    def busy(self) -> bool:
        """Whether the engine still has requests of its own to finish."""
        return self.held + self.in_flight > 0


def parse_load(exposition: str) -> EngineLoad:
    """The load figures of a sidecar's /metrics page; LoadUnreadableError names what is missing."""
    samples = parse_samples(exposition)
    figures = {name: value(samples, name, {}) for name in (ARRIVED, HELD, IN_FLIGHT)}
    missing = sorted(name for name, figure in figures.items() if figure is None)
    if missing:
        raise LoadUnreadableError(f"the sidecar's metrics lack {', '.join(missing)}")
    return EngineLoad(float(figures[ARRIVED] or 0.0), int(figures[HELD] or 0), int(figures[IN_FLIGHT] or 0))


class ArrivalRate:
    """Requests per second between successive reads of one engine's arrival counter."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None  # (time, counter)

    def reset(self) -> None:
        """Forget the last read: the next one starts a new interval (another engine's counter)."""
        self._last = None

    def update(self, now_s: float, arrived_total: float) -> float | None:
        """The rate since the previous read; None for the first read or no time elapsed."""
        last, self._last = self._last, (now_s, arrived_total)
        if last is None or now_s <= last[0]:
            return None
        increase = arrived_total - last[1] if arrived_total >= last[1] else arrived_total
        return increase / (now_s - last[0])
