"""Board power of the emulated GPU as a function of SM clock and what the kernels are doing.

    P_busy(f) = P_floor(f) + (P_compute(f) - P_floor(f)) * busy * (k + (1 - k) * drive)
    drive = min(1, compute_share + a * attention_share)

- ``P_compute(f) = TDP * p_rel(f)``: dense compute-bound work, Perseus' measured power curve
  (voltage falls with the clock, so power falls faster than the clock).
- ``k`` is how much of that dynamic power a memory-bound kernel draws, ``a`` how hard decode
  attention drives the GPU relative to a compute-bound kernel; both per GPU family
  (`ACTIVITY`, with their sources). On an A100 decode power is nearly flat in batch; on an H100
  it climbs from about 490 W at batch 8 to about 690 W at batch 192 as attention grows.
- ``P_floor(f)``: idle with a CUDA context. A stock GPU drops its clock when idle and draws
  `idle_w`; a GPU whose clock is locked holds the clock and draws up to
  `LOCKED_IDLE_EXTRA_W_PER_TDP * TDP` more at max clock (an assumption: no public measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.domain import GpuSpec
from agent.twin.frequency import frequency_response
from agent.twin.latency import IterationCost, profile_family

LOCKED_IDLE_EXTRA_W_PER_TDP = 0.05


@dataclass(frozen=True, slots=True)
class ActivityCalibration:
    """How much of the dynamic power range each kind of kernel draws, per GPU family."""

    memory_bound: float  # a kernel streaming weights from HBM
    attention: float  # decode attention, as a fraction of a compute-bound kernel's draw


# A100: fitted so that decode of Llama-2-13B at batch 32 gains +37.4% tokens/J at 1050 MHz
# (throttLL'eM's characterisation, secondary source), with power flat in batch as it reports
# (and as ML.ENERGY v2 measured A100-40GB at 188-202 W for Llama-3.1-8B at batch 32-320).
# H100: fitted (least squares on log power) to ML.ENERGY leaderboard v3, ml-energy/leaderboard
# @0cd52da, Llama-3.1-8B on one H100 under vLLM: 486-688 W at batch 8-192, each point replayed at
# the context that gives the twin the measured median inter-token latency; within 3% at each.
ACTIVITY = {
    "a100": ActivityCalibration(memory_bound=0.238, attention=0.0),
    "h100": ActivityCalibration(memory_bound=0.586, attention=1.52),
}


class PowerModel:
    """Instantaneous board power for busy iterations and idle gaps."""

    def __init__(self, gpu: GpuSpec) -> None:
        self.gpu = gpu
        self.activity = ACTIVITY[profile_family(gpu)]
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
        k = self.activity.memory_bound
        drive = min(1.0, cost.compute_share + self.activity.attention * cost.attention_share)
        activity = k + (1.0 - k) * drive
        return floor + (compute - floor) * cost.busy_fraction * activity
