"""Shadow mode: an actuator that checks and records every decision and never touches the GPU.

It is how the sidecar runs without clock privileges, and how a new policy is watched before it
is trusted. The clock list comes from the catalog's GpuSpec, or from another actuator it
observes read-only (NVML without CAP_SYS_ADMIN, or the twin); observing gives the real clock.
"""

from __future__ import annotations

import logging

from agent.domain import GpuSpec
from agent.gpus.base import Actuator, check_supported_clock

log = logging.getLogger(__name__)


class DryRunActuator:
    """Records what it would set; the GPU keeps its stock behaviour."""

    actuates = False

    def __init__(self, clocks_mhz: tuple[int, ...], source: str, observed: Actuator | None = None) -> None:
        if not clocks_mhz:
            raise ValueError("a dry-run actuator needs the GPU's supported clocks")
        self._clocks_mhz = tuple(sorted(clocks_mhz, reverse=True))
        self._source = source  # where the clock list comes from, for the name
        self._observed = observed  # read-only: only supported_clocks_mhz, clock_mhz, close
        self.last_decision_mhz: int | None = None  # clock last asked for; None: reset (stock)
        self.would_be_changes = 0  # lock changes a real actuator would have sent
        self.decisions = 0  # set_clock_mhz and reset calls

    @classmethod
    def from_spec(cls, spec: GpuSpec) -> DryRunActuator:
        """Clocks from the catalog: no GPU needed."""
        return cls(spec.sm_clocks_mhz, spec.name)

    @classmethod
    async def observing(cls, actuator: Actuator) -> DryRunActuator:
        """Clocks and current clock from `actuator`, which is never asked to set anything."""
        return cls(await actuator.supported_clocks_mhz(), actuator.name, observed=actuator)

    @property
    def name(self) -> str:
        """Backend and where the clocks come from."""
        return f"dryrun:{self._source}"

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """The clocks a real actuator would accept, highest first."""
        return self._clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        """Validate as a real actuator would, then only record."""
        check_supported_clock(mhz, self._clocks_mhz, self.name)
        self._record(mhz)

    async def reset(self) -> None:
        """Record a return to stock behaviour."""
        self._record(None)

    async def clock_mhz(self) -> int:
        """The observed GPU's clock; without one, the stock clock under load (the maximum)."""
        if self._observed is not None:
            return await self._observed.clock_mhz()
        return self._clocks_mhz[0]

    async def close(self) -> None:
        """Close the observed actuator (it never locked, so it resets nothing)."""
        if self._observed is not None:
            await self._observed.close()

    def _record(self, mhz: int | None) -> None:
        self.decisions += 1
        if mhz == self.last_decision_mhz:
            return
        self.would_be_changes += 1
        log.debug("%s would %s", self.name, "reset clocks" if mhz is None else f"lock {mhz} MHz")
        self.last_decision_mhz = mhz
