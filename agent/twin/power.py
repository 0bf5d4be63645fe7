"""Board power of the emulated GPU as a function of SM clock and what the kernels are doing.

    P_busy(f) = P_floor(f) + (P_compute(f) - P_floor(f)) * busy * (k + (1 - k) * compute_share)

- ``P_compute(f) = TDP * p_rel(f)``: dense compute-bound work, Perseus' measured power curve
  (voltage falls with the clock, so power falls faster than the clock).
- ``k`` (`MEMORY_BOUND_ACTIVITY`) is how much of that dynamic power a memory-bound kernel
  draws. 0.3 reproduces throttLL'eM's characterisation on an A100 (Llama2-13B, batch 32:
  +37.4% tokens/J for -6.25% throughput at 1050 MHz; secondary source) and keeps decode well
  below TDP, as measured on H200 (137-300 W of 700 W, arXiv 2605.11999).
- ``P_floor(f)``: idle with a CUDA context. A stock GPU drops its clock when idle and draws
  `idle_w`; a GPU whose clock is locked holds the clock and draws up to
  `LOCKED_IDLE_EXTRA_W_PER_TDP * TDP` more at max clock (an assumption: no public measurement).
"""

from __future__ import annotations

from agent.domain import GpuSpec
from agent.twin.frequency import frequency_response
from agent.twin.latency import IterationCost

MEMORY_BOUND_ACTIVITY = 0.3
LOCKED_IDLE_EXTRA_W_PER_TDP = 0.05


class PowerModel:
    """Instantaneous board power for busy iterations and idle gaps."""

    def __init__(self, gpu: GpuSpec) -> None:
        self.gpu = gpu
        self._response = frequency_response(gpu.max_clock_mhz, gpu.min_clock_mhz)
        floor_rel = self._response.power_rel_at(gpu.min_clock_mhz)
        self._floor_rel = floor_rel
        self._cache: dict[int, tuple[float, float]] = {}

    def _levels(self, clock_mhz: int) -> tuple[float, float]:
        """(floor, compute-bound) power at a held clock."""
        levels = self._cache.get(clock_mhz)
        if levels is None:
            rel = self._response.power_rel_at(clock_mhz)
            held = (rel - self._floor_rel) / (1.0 - self._floor_rel)
            floor = self.gpu.idle_w + LOCKED_IDLE_EXTRA_W_PER_TDP * self.gpu.tdp_w * held
            levels = self._cache[clock_mhz] = (floor, max(self.gpu.tdp_w * rel, floor))
        return levels

    def idle_w(self, locked_clock_mhz: int | None) -> float:
        """Power with no work queued: stock GPUs idle down, locked ones hold their clock."""
        if locked_clock_mhz is None:
            return self.gpu.idle_w
        return self._levels(locked_clock_mhz)[0]

    def busy_w(self, clock_mhz: int, cost: IterationCost) -> float:
        """Mean power over one iteration that ran at `clock_mhz`."""
        floor, compute = self._levels(clock_mhz)
        activity = MEMORY_BOUND_ACTIVITY + (1.0 - MEMORY_BOUND_ACTIVITY) * cost.compute_share
        return floor + (compute - floor) * cost.busy_fraction * activity
