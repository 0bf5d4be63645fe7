"""`powercap:<W>`: one static board power limit per GPU, the knob of NVIDIA Dynamo's power-aware planner.

What Dynamo does (ai-dynamo/dynamo):

- The planner, with `enable_power_awareness`, holds one power limit per GPU for each kind of
  worker, `prefill_engine_gpu_power_limit` and `decode_engine_gpu_power_limit` (watts, static
  configuration), and writes it on every worker pod as the annotation
  `dynamo.nvidia.com/gpu-power-limit` (`NativePlannerBase._run_power_annotation_sweep` in
  `components/src/dynamo/planner/core/base.py`; the stored version read carries no commit id).
  `total_gpu_power_limit` is a budget; in that version the planner only reports the projected
  draw (replicas x GPUs x limit) against it, as gauges that do not gate scaling.
- The node-local Power Agent (`components/power_agent/power_agent.py@ce81d89`) reconciles every
  15 s: it maps each GPU's processes to pods through their cgroups and calls
  `nvmlDeviceSetPowerManagementLimit(handle, watts * 1000)` for an annotated pod, and restores
  `nvmlDeviceGetPowerManagementDefaultLimit` when the pod is gone (and on shutdown). It never
  touches the clocks.

Reconstruction (ours, not Dynamo's code): one engine, one limit for all its GPUs, set from the
first decision and held for the run; the SM clock is left unlocked, so the GPU boosts and its
own power controller lowers the clock when an iteration would draw more than the limit (the twin
models that controller in `agent.twin.power_limit`). No replica scaling, no budget, no
prefill/decode split: an aggregated engine has one kind of worker. It admits every arrival, as
a stock server does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from agent.control.policies import ControlView
from agent.domain import Decision


@dataclass(frozen=True, slots=True)
class PowerCapPolicy:
    """Hold every GPU of the engine under one board power limit; leave the clock to the GPU."""

    watts: float  # board power limit per GPU, W (within the GPU's NVML constraints)
    gates_admission: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.watts) and self.watts > 0):
            raise ValueError(f"powercap needs a positive power limit in watts, got {self.watts!r}")

    @property
    def name(self) -> str:
        """Label with the limit, e.g. ``powercap:250``."""
        return f"powercap:{self.watts:g}"

    def decide(self, view: ControlView) -> Decision:
        """Always the same limit, the clock unlocked."""
        return Decision(sm_clock_mhz=None, power_limit_w=self.watts)
