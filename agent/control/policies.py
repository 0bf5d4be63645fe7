"""Clock policies: given what the controller sees, decide the SM clock (and, later, admission).

`max` is stock behaviour, the baseline every saving is measured against: the GPU is left
unlocked, so it boosts to its max clock when busy and idles down when not. `static:<MHz>` locks
one clock for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.domain import Decision, EngineStats, GpuSpec


@dataclass(frozen=True, slots=True)
class ControlView:
    """Everything a policy may look at for one decision."""

    now_s: float  # time of the decision (virtual or wall clock), seconds
    gpu: GpuSpec
    stats: EngineStats | None  # latest engine snapshot; None before the first one


class Policy(Protocol):
    """Decides the clock for the next control period; pure: no I/O, no clock reads."""

    @property
    def name(self) -> str:
        """Stable label used in reports."""
        ...

    def decide(self, view: ControlView) -> Decision:
        """The clock (None = stock) and the queued requests to admit."""
        ...


@dataclass(frozen=True, slots=True)
class MaxPolicy:
    """Stock GPU behaviour: never lock the clock."""

    name: str = "max"

    def decide(self, view: ControlView) -> Decision:
        """Leave the GPU unlocked."""
        return Decision(sm_clock_mhz=None)


@dataclass(frozen=True, slots=True)
class StaticPolicy:
    """Lock one SM clock for the whole run."""

    clock_mhz: int

    @property
    def name(self) -> str:
        """Label with the clock, e.g. ``static:1050``."""
        return f"static:{self.clock_mhz}"

    def decide(self, view: ControlView) -> Decision:
        """Always the same clock."""
        return Decision(sm_clock_mhz=self.clock_mhz)


POLICY_NAMES = ("max", "static:<MHz>")


def parse_policy(spec: str, gpu: GpuSpec) -> Policy:
    """Build a policy from its CLI/env spelling; errors name what is allowed."""
    name, _, arg = spec.partition(":")
    if name == "max" and not arg:
        return MaxPolicy()
    if name == "static":
        try:
            clock = int(arg)
        except ValueError:
            raise ValueError(f"policy {spec!r}: static needs a clock in MHz, e.g. static:1050") from None
        if clock not in gpu.sm_clocks_mhz:
            raise ValueError(
                f"policy {spec!r}: {clock} MHz is not a supported clock of {gpu.name} "
                f"({gpu.min_clock_mhz}..{gpu.max_clock_mhz} MHz in 15 MHz steps)"
            )
        return StaticPolicy(clock)
    raise ValueError(f"unknown policy {spec!r}; known: {', '.join(POLICY_NAMES)}")
