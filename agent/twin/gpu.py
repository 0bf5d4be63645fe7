"""The emulated GPUs of one engine: SM clock state as NVML exposes it, and energy counters.

An engine of TP N is N GPUs. Tensor parallelism splits every layer evenly, so each GPU runs the
same kernels for the same time and draws the power the model gives for one board; the engine's
energy is the sum over its GPUs. One lock sets every GPU to the same clock, as one sidecar does.

Clock semantics follow NVML: `lock_sm_clock_mhz(f)` is `nvmlDeviceSetGpuLockedClocks(f, f)`
and `reset_sm_clock()` is `nvmlDeviceResetGpuLockedClocks`. A change takes effect after
`clock_change_delay_s` (NVML SetGpuLockedClocks measured at ~4.5 ms p50 on A800, see
reference/throttllem.md §3.6). Unlocked ("stock"), the GPU boosts to its max clock whenever it
has work and idles down otherwise. A change that takes effect while an iteration runs applies
from that moment (`change_within`; `agent.twin.step` runs the rest of the iteration at it).

A board power limit follows `nvmlDeviceSetPowerManagementLimit`, per GPU, bounded by
`power_limit_constraints_w()` (`nvmlDeviceGetPowerManagementLimitConstraints`); the GPU's power
controller may then run an iteration below the requested clock (`agent.twin.power_limit`). The
default limit is the TDP, which the twin's busy power never exceeds, so only a lower limit is
kept (`power_cap_w`) and only then does an iteration pay for the search.

Time is given by the caller (virtual or wall clock); this class never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.domain import GpuSpec
from agent.twin.latency import IterationCost
from agent.twin.power import PowerModel

DEFAULT_CLOCK_CHANGE_DELAY_S = 0.005


class UnsupportedClockError(ValueError):
    """A clock the GPU does not list among its supported SM clocks."""


class PowerLimitError(ValueError):
    """A power limit outside the GPU's constraints (NVML answers NVML_ERROR_INVALID_ARGUMENT)."""


@dataclass(slots=True)
class _PendingChange:
    effective_s: float
    locked_mhz: int | None


class EngineGpus:
    """SM clock control, power and cumulative energy of the `count` GPUs of one engine."""

    def __init__(
        self, spec: GpuSpec, count: int = 1, clock_change_delay_s: float = DEFAULT_CLOCK_CHANGE_DELAY_S
    ) -> None:
        if clock_change_delay_s < 0:
            raise ValueError("clock_change_delay_s must be >= 0")
        if count < 1:
            raise ValueError("an engine has at least one GPU")
        self.spec = spec
        self.count = count  # GPUs, one per TP rank
        self.power = PowerModel(spec)  # one board
        self.clock_change_delay_s = clock_change_delay_s
        self._supported = frozenset(spec.sm_clocks_mhz)
        self._locked_mhz: int | None = None
        self._pending: _PendingChange | None = None
        self.energy_j = 0.0  # all GPUs together
        self.clock_changes = 0  # locks/resets that changed the effective state
        # Board power limit below the default, per GPU (W); None: the default limit (TDP).
        self.power_cap_w: float | None = None

    def supported_clocks_mhz(self) -> tuple[int, ...]:
        """Supported SM clocks, highest first (as nvmlDeviceGetSupportedGraphicsClocks)."""
        return self.spec.sm_clocks_mhz

    def lock_sm_clock_mhz(self, clock_mhz: int, now_s: float) -> None:
        """Lock the SM clock at `clock_mhz` from `now_s + delay` on."""
        if clock_mhz not in self._supported:
            raise UnsupportedClockError(
                f"{clock_mhz} MHz is not a supported SM clock of {self.spec.name} "
                f"({self.spec.min_clock_mhz}..{self.spec.max_clock_mhz} MHz in 15 MHz steps)"
            )
        self._request(clock_mhz, now_s)

    def reset_sm_clock(self, now_s: float) -> None:
        """Return to stock behaviour (boost when busy, idle down when not)."""
        self._request(None, now_s)

    def _request(self, locked_mhz: int | None, now_s: float) -> None:
        self._settle(now_s)
        target = self._pending.locked_mhz if self._pending else self._locked_mhz
        if target == locked_mhz:
            return
        self._pending = _PendingChange(now_s + self.clock_change_delay_s, locked_mhz)

    def _settle(self, now_s: float) -> None:
        if self._pending is not None and self._pending.effective_s <= now_s:
            if self._pending.locked_mhz != self._locked_mhz:
                self.clock_changes += 1
            self._locked_mhz = self._pending.locked_mhz
            self._pending = None

    def locked_clock_mhz(self, now_s: float) -> int | None:
        """The lock in force at `now_s` (None: stock)."""
        self._settle(now_s)
        return self._locked_mhz

    def busy_clock_mhz(self, now_s: float) -> int:
        """The SM clock work starting at `now_s` runs at."""
        locked = self.locked_clock_mhz(now_s)
        return self.spec.max_clock_mhz if locked is None else locked

    def change_within(self, start_s: float, end_s: float) -> tuple[float, int] | None:
        """A clock change taking effect strictly inside (start, end): when, and the busy clock after it."""
        pending = self._pending
        if pending is None or not start_s < pending.effective_s < end_s:
            return None
        after = self.spec.max_clock_mhz if pending.locked_mhz is None else pending.locked_mhz
        return pending.effective_s, after

    def power_limit_constraints_w(self) -> tuple[float, float]:
        """(min, max) board power limit per GPU (W), as nvmlDeviceGetPowerManagementLimitConstraints."""
        return self.spec.min_power_limit_w, self.spec.tdp_w

    def power_limit_w(self) -> float:
        """The board power limit in force per GPU (W), as nvmlDeviceGetPowerManagementLimit."""
        return self.spec.tdp_w if self.power_cap_w is None else self.power_cap_w

    def set_power_limit_w(self, watts: float | None) -> None:
        """Set every GPU's board power limit (W per GPU); None restores the default (TDP).

        Takes effect from the next iteration. A value outside the constraints is refused, as
        NVML refuses it, and changes nothing.
        """
        if watts is None:
            self.power_cap_w = None
            return
        low, high = self.power_limit_constraints_w()
        if not low <= watts <= high:  # also refuses NaN
            raise PowerLimitError(
                f"{watts:g} W is not a valid power limit for {self.spec.name}: "
                f"it must lie within {low:g}..{high:g} W (nvmlDeviceGetPowerManagementLimitConstraints)"
            )
        self.power_cap_w = None if watts == high else float(watts)

    def idle_w(self, now_s: float) -> float:
        """The engine's power with no work, at the lock in force at `now_s` (all GPUs, W)."""
        return self.count * self.power.idle_w(self.locked_clock_mhz(now_s))

    def run_busy(self, clock_mhz: int, duration_s: float, cost: IterationCost) -> float:
        """Account an iteration of `duration_s` at `clock_mhz`; returns the engine's mean power (W)."""
        power_w = self.count * self.power.busy_w(clock_mhz, cost)
        self.energy_j += power_w * duration_s
        return power_w

    def run_idle(self, start_s: float, end_s: float) -> float:
        """Account an idle gap; a pending clock change inside it applies from its effective time."""
        if end_s < start_s:
            raise ValueError("time must not move backwards")
        pending = self._pending
        if pending is not None and start_s < pending.effective_s < end_s:
            self.run_idle(start_s, pending.effective_s)
            start_s = pending.effective_s
        power_w = self.idle_w(start_s)
        self.energy_j += power_w * (end_s - start_s)
        return power_w
