"""The SM clock an iteration runs at under a board power limit (NVML power management limit).

What NVIDIA documents:

- `nvmlDeviceSetPowerManagementLimit(device, limit_mW)` sets "the upper boundary for the card's
  power draw. If the card's total power draw reaches this limit the power management algorithm
  kicks in"; the value must lie within `nvmlDeviceGetPowerManagementLimitConstraints` (min, max),
  else NVML_ERROR_INVALID_ARGUMENT; it does not survive a reboot or a driver reload (NVML API
  reference, Device Commands and Device Queries; docs.nvidia.com/deploy/nvml-api). `nvidia-smi -pl
  W` sets the same limit; the default is `nvmlDeviceGetPowerManagementDefaultLimit`, the TDP.
- How the algorithm enforces it: by the clock. `nvmlClocksEventReasonSwPowerCap` (0x4): "The
  clocks have been optimized to ensure not to exceed currently set power limits" (NVML API
  reference, group nvmlClocksEventReasons); DCGM's DCGM_CLOCKS_THROTTLE_REASON_SW_POWER_CAP: "SW
  Power Scaling algorithm is reducing the clocks below requested clocks" (DCGM API reference,
  Field Constants). The clock it lowers is the one requested, a locked clock included.
- Which controller wins: "The GPU Performance Monitoring Unit (PMU) selects the most conservative
  policy" among the VBIOS, nvidia-smi and out-of-band (SMBPBI) limits (DGX H100 User Guide,
  "Managing Power Capping"). The twin models one in-band limit per GPU.

NVIDIA does not publish the controller's averaging window or its step response. The twin
assumes a steady state per iteration: the window is short against the seconds a serving
workload holds a batch shape, and long against one kernel, so the controller settles on one
clock for the iteration's whole mix of kernels (the iteration's mean power is what it holds
under the limit). The effective clock of an iteration is then the highest supported clock not
above the requested one (the lock, or the max clock when unlocked) whose board power for that
iteration's work is at or under the limit; the minimum clock when none is. The change takes
effect from the next iteration (nothing in NVML's documentation gives a delay).

Search: the twin's busy power rises with the clock except for dips of at most a fraction of a
watt where the compute-bound power curve is flat (on the A100 near 1065 and 945 MHz, where the
busy share still grows as the clock falls). With that bound (`MONOTONE_SLACK_W`, held to the
real setups by a test) a bisection finds a crossing in about ten cost evaluations instead of up
to 119 (the H100's clocks), and a short walk up from it makes the answer exactly the highest
qualifying clock: any clock above one that exceeds the limit by more than the slack exceeds it too.

Pure: given the clocks, a cost function and the power model; it remembers nothing between calls.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from agent.twin.latency import IterationCost
from agent.twin.power import PowerModel

# Largest rise of the twin's busy power as the clock falls, over any span of clocks (W).
# Measured 0.38 W (A100-SXM4-80GB, Llama-3-8B, 1065 -> 1050 MHz); tests/unit/test_power_limit.py
# holds every catalogued setup to it.
MONOTONE_SLACK_W = 1.0


def capped_clock_mhz(
    requested_mhz: int,
    clocks_mhz: Sequence[int],
    cost_at: Callable[[int], IterationCost],
    power: PowerModel,
    limit_w: float,
) -> tuple[int, IterationCost]:
    """The clock one iteration runs at under `limit_w` (one board, W), and its cost there.

    `clocks_mhz` are the supported clocks, highest first (as NVML lists them); `cost_at(f)` is
    the iteration's cost at clock f. The requested clock itself is tried first, so a limit that
    does not bind costs one evaluation.
    """
    n = len(clocks_mhz)
    # First index whose clock is not above the requested one (clocks are descending).
    top = min(bisect.bisect_left(clocks_mhz, -requested_mhz, key=lambda f: -f), n - 1)
    costs: dict[int, IterationCost] = {}  # this call's evaluations, by index

    def watts(i: int) -> float:
        cost = costs.get(i)
        if cost is None:
            cost = costs[i] = cost_at(clocks_mhz[i])
        return power.busy_w(clocks_mhz[i], cost)

    if watts(top) <= limit_w:
        return clocks_mhz[top], costs[top]
    # Bisection keeps watts(over) > limit >= watts(under); `under` = n: not even the minimum fits.
    over, under = top, n
    if watts(n - 1) <= limit_w:
        under = n - 1
        while under - over > 1:
            mid = (over + under) // 2
            if watts(mid) <= limit_w:
                under = mid
            else:
                over = mid
    # Walk up from the crossing: a clock above one that exceeds the limit by more than the slack
    # cannot fit, so the first such clock ends the walk.
    best = under
    for i in range(under - 1, top, -1):
        w = watts(i)
        if w <= limit_w:
            best = i
        elif w > limit_w + MONOTONE_SLACK_W:
            break
    if best == n:
        best = n - 1  # nothing fits: the controller holds the minimum clock
    return clocks_mhz[best], costs[best]
