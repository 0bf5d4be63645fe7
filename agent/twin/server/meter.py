"""Energy, power and utilisation of the twin's GPUs at any instant, as NVML and DCGM would read them.

Energy and power are the engine's (all its GPUs); a reader of one GPU divides by their count.

`EngineGpus` books an iteration's whole energy when the iteration starts and an idle gap when it
ends, which is all a virtual-time replay needs. A live server is read at arbitrary moments, so
this meter keeps a short history of constant-power segments and answers for any instant:

    energy(t) = booked energy - what the running iteration has not yet spent by t
    power over [t - w, t] = sum(segment power x overlap) / w

Idle time is booked on the GPU lazily, up to the moment someone looks (or a lock changes), so an
idle GPU's counter still rises while nothing runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.twin.gpu import EngineGpus

HISTORY_S = 2.0  # segments kept: enough for the longest averaging window asked for


@dataclass(frozen=True, slots=True)
class _Segment:
    start_s: float
    end_s: float
    power_w: float
    utilization: float  # share of the time kernels run (0 while idle)


class GpuMeter:
    """Reads the engine's energy, mean power and utilisation at any time the driver has reached."""

    def __init__(self, gpu: EngineGpus, start_s: float = 0.0) -> None:
        self.gpu = gpu
        self._segments: deque[_Segment] = deque()
        self._booked_until_s = start_s  # gpu.energy_j covers everything up to here
        self._idle = True  # no iteration running: time past _booked_until_s is idle

    @property
    def booked_until_s(self) -> float:
        """Time up to which the GPU's energy counter is booked."""
        return self._booked_until_s

    @property
    def idle(self) -> bool:
        """Whether the GPU has no iteration running."""
        return self._idle

    def busy(self, start_s: float, end_s: float, power_w: float, utilization: float) -> None:
        """An iteration from start_s to end_s whose energy `EngineGpus.run_busy` has just booked."""
        self.settle(start_s)
        self._idle = False
        self._append(_Segment(start_s, end_s, power_w, utilization))
        self._booked_until_s = end_s

    def go_idle(self) -> None:
        """The last iteration ended and nothing else runs."""
        self._idle = True

    def settle(self, now_s: float) -> None:
        """Book idle energy up to `now_s` (call before a clock change, so it applies from then on)."""
        if not self._idle or now_s <= self._booked_until_s:
            return
        start = self._booked_until_s
        before = self.gpu.energy_j
        self.gpu.run_idle(start, now_s)
        self._append(_Segment(start, now_s, (self.gpu.energy_j - before) / (now_s - start), 0.0))
        self._booked_until_s = now_s

    def energy_j(self, now_s: float) -> float:
        """Energy since the meter started, as of `now_s`."""
        self.settle(now_s)
        if self._segments and now_s < self._booked_until_s:
            last = self._segments[-1]
            return self.gpu.energy_j - last.power_w * (self._booked_until_s - max(now_s, last.start_s))
        return self.gpu.energy_j

    def power_w(self, now_s: float, window_s: float) -> float:
        """Mean board power over the `window_s` before `now_s` (idle power before any history)."""
        idle_w = self.gpu.idle_w(now_s)
        return self._mean(now_s, window_s, lambda seg: seg.power_w, idle_w)

    def utilization(self, now_s: float, window_s: float) -> float:
        """Share of the `window_s` before `now_s` during which kernels ran (DCGM's GPU_UTIL)."""
        return self._mean(now_s, window_s, lambda seg: seg.utilization, 0.0)

    def _mean(
        self, now_s: float, window_s: float, value: Callable[[_Segment], float], default: float
    ) -> float:
        self.settle(now_s)
        end = min(now_s, self._booked_until_s)
        start = max(end - window_s, self._segments[0].start_s if self._segments else end)
        if end <= start:
            return value(self._segments[-1]) if self._segments else default
        total = 0.0
        for seg in reversed(self._segments):
            if seg.end_s <= start:
                break
            overlap = min(seg.end_s, end) - max(seg.start_s, start)
            if overlap > 0:
                total += value(seg) * overlap
        return total / (end - start)

    def _append(self, segment: _Segment) -> None:
        self._segments.append(segment)
        horizon = segment.end_s - HISTORY_S
        while self._segments and self._segments[0].end_s < horizon:
            self._segments.popleft()
