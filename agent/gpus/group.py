"""Every GPU of one engine as one actuator and one meter: a TP-N engine is steered on all N GPUs.

Tensor parallelism runs every layer split across the engine's GPUs in lock step, so the slowest
GPU sets the pace and one clock must hold on all of them. `ActuatorGroup` therefore:

- lists the clocks every GPU supports (the intersection, highest first);
- issues each call to every GPU at once (`asyncio.gather`): each NVML device has its own worker
  thread, so N locks take about as long as one, not N times as long;
- on any GPU's error while locking, sends every GPU back to stock and raises that error, so the
  GPUs never run at different clocks; a reset is tried on every GPU even when one fails, and the
  first failure is raised after all were tried.

`MeterGroup` sums energy and power over the GPUs. A group of one is never built: one GPU is used
as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from agent.gpus.base import Actuator, Meter, check_supported_clock

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _on_every(items: Sequence[T], call: Callable[[T], Awaitable[object]]) -> list[BaseException]:
    """Call `call` on every item at once; the exceptions raised, in item order."""
    results = await asyncio.gather(*(call(item) for item in items), return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


def _raise_first(errors: list[BaseException]) -> None:
    if errors:
        raise errors[0]


class ActuatorGroup:
    """The actuators of an engine's GPUs, driven as one."""

    def __init__(self, actuators: Sequence[Actuator], clocks_mhz: tuple[int, ...]) -> None:
        if len(actuators) < 2:
            raise ValueError("a group needs at least two GPUs; use the one actuator as it is")
        if not clocks_mhz:
            raise ValueError("the GPUs of the group share no supported SM clock")
        self.actuators = tuple(actuators)
        self._clocks_mhz = clocks_mhz

    @classmethod
    async def of(cls, actuators: Sequence[Actuator]) -> ActuatorGroup:
        """Group `actuators`; the clocks are those every one supports."""
        lists = await asyncio.gather(*(a.supported_clocks_mhz() for a in actuators))
        common = set(lists[0]).intersection(*lists[1:])
        return cls(actuators, tuple(sorted(common, reverse=True)))

    @property
    def name(self) -> str:
        """Every GPU's backend and device, comma-separated."""
        return ",".join(a.name for a in self.actuators)

    @property
    def actuates(self) -> bool:
        """Whether the GPUs' clocks really change (dry-run: no)."""
        return all(a.actuates for a in self.actuators)

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks every GPU of the engine accepts, highest first."""
        return self._clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        """Lock every GPU at `mhz`; if any GPU fails, all go back to stock and the error is raised."""
        check_supported_clock(mhz, self._clocks_mhz, self.name)
        errors = await _on_every(self.actuators, lambda a: a.set_clock_mhz(mhz))
        if not errors:
            return
        log.error("locking %d MHz failed on a GPU of %s: every GPU goes back to stock", mhz, self.name)
        reset_errors = await _on_every(self.actuators, lambda a: a.reset())
        for err in reset_errors:
            log.error("could not reset a GPU of %s after a failed lock: %s", self.name, err)
        raise errors[0]

    async def reset(self) -> None:
        """Reset every GPU (all are tried); raises the first failure."""
        _raise_first(await _on_every(self.actuators, lambda a: a.reset()))

    async def clock_mhz(self) -> int:
        """The slowest GPU's SM clock: it sets the engine's pace."""
        return min(await asyncio.gather(*(a.clock_mhz() for a in self.actuators)))

    async def close(self) -> None:
        """Close every GPU's actuator (each resets the lock it left); raises the first failure."""
        _raise_first(await _on_every(self.actuators, lambda a: a.close()))


class MeterGroup:
    """The meters of an engine's GPUs, summed."""

    def __init__(self, meters: Sequence[Meter]) -> None:
        if len(meters) < 2:
            raise ValueError("a group needs at least two GPUs; use the one meter as it is")
        self.meters = tuple(meters)

    @property
    def name(self) -> str:
        """Every GPU's backend and device, comma-separated."""
        return ",".join(m.name for m in self.meters)

    async def energy_j(self) -> float:
        """Joules since open, summed over the GPUs."""
        return float(sum(await asyncio.gather(*(m.energy_j() for m in self.meters))))

    async def power_w(self) -> float:
        """Board power summed over the GPUs."""
        return float(sum(await asyncio.gather(*(m.power_w() for m in self.meters))))

    async def close(self) -> None:
        """Close every meter; raises the first failure."""
        _raise_first(await _on_every(self.meters, lambda m: m.close()))


async def open_all(
    openers: Sequence[Callable[[], Awaitable[T]]], close: Callable[[T], Awaitable[object]]
) -> list[T]:
    """Open one device per opener at once; if any fails, close those that opened and raise."""
    results = await asyncio.gather(*(opener() for opener in openers), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for err in await _on_every(opened, close):
            log.error("closing a GPU after another failed to open: %s", err)
        raise failed[0]
    return opened
