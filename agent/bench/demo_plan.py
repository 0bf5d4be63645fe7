"""The demo's slice: which requests, at what rate, so the live run and its baseline replay the same list.

The engine's capacity is the completion rate of a saturated `max` run on the twin
(`agent.sim.capacity`) over the trace's mix from `start_s` on (CAPACITY_SAMPLE_S of it: a short
slice would let its single longest request set the figure). The slice is then the next
`load` × capacity × `duration_s` requests from `start_s`, with arrivals scaled so they last
`duration_s` on the wall clock: the engine sees `load` × its capacity for that long. `throttllem
load` rebuilds the same list from the flags `load_spec` gives it (window, then rate scale): its
`--duration` is the trace seconds those requests span (`DemoWorkload.window_s`), not
`duration_s` (which `demo --wall-s` sets).

The engine is the twin as Triton, vLLM or trtllm-serve (`engine`); the load generator speaks
the matching API (`agent.bench.processes.ENGINE_LOAD_APIS`). The capacity and the slice do not
depend on it: the twin runs the same engine model behind each API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from agent.bench.processes import ENGINE_LOAD_APIS, LoadSpec
from agent.domain import Request
from agent.sim.capacity import peak_rate_rps
from agent.slo_presets import SloPreset
from agent.twin.setup import TwinSetup
from agent.workloads import Workload, load_trace

DEMO_TRACE = "azure-conv"
DEMO_START_S = 600.0  # ten minutes in: past the trace's opening burst, a steady conversational mix
DEMO_WALL_S = 60.0  # wall seconds over which the slice's requests arrive
DEMO_ENGINE = "triton"
DEMO_LOAD = 0.5  # half the engine's capacity: busy, with slack for a lower clock
DEMO_MAX_TOKENS = 2048  # the client cap: a predictive policy must not read true lengths off max_tokens
CAPACITY_SAMPLE_S = 300.0  # trace seconds the capacity is measured on: no single long request sets it
WINDOW_END_S = 1e-3  # the window ends just after its last request (the end is exclusive)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What the demo runs."""

    setup: TwinSetup
    preset: SloPreset
    out_dir: Path
    models_dir: Path
    policy: str = "throttllem"
    engine: str = DEMO_ENGINE  # the API the twin serves and the sidecar reads: one of ENGINE_LOAD_APIS
    trace: str = DEMO_TRACE
    start_s: float = DEMO_START_S
    duration_s: float = DEMO_WALL_S  # wall seconds of arrivals (`--wall-s`; the trace seconds follow)
    load: float = DEMO_LOAD
    max_tokens: int = DEMO_MAX_TOKENS
    live_baseline: bool = False
    refresh_s: float = 0.5


@dataclass(frozen=True, slots=True)
class DemoWorkload:
    """The request list both runs replay, and the flags that rebuild it."""

    requests: list[Request]
    rate_scale: float
    window_s: float  # trace seconds replayed
    capacity_rps: float  # the engine's completion rate, saturated, on this part of the trace

    @property
    def load(self) -> float:
        """The arrival rate as a fraction of the capacity."""
        return len(self.requests) / self.requests[-1].arrival_s / self.capacity_rps

    def load_spec(self, config: DemoConfig) -> LoadSpec:
        """`throttllem load` flags that rebuild exactly these requests (the URL is the gateway's)."""
        return LoadSpec(
            url="",
            api=ENGINE_LOAD_APIS[config.engine].value,
            trace=config.trace,
            start_s=config.start_s,
            duration_s=self.window_s,
            rate_scale=self.rate_scale,
            max_tokens=config.max_tokens,
            slo=config.preset.name,
            model=config.setup.model.name,
        )


def capacity_rps(setup: TwinSetup, trace: Workload, start_s: float, max_tokens: int) -> float:
    """The engine's saturated completion rate on the trace's mix from `start_s` (CAPACITY_SAMPLE_S of it)."""
    sample = trace.window(start_s, CAPACITY_SAMPLE_S).requests(max_tokens=max_tokens)
    if not sample:
        raise ValueError(f"no requests in {trace.name} after {start_s:g} s: choose another slice")
    return peak_rate_rps(setup, sample)


def trace_slice(
    trace: Workload, start_s: float, count: int, wall_s: float, max_tokens: int
) -> tuple[list[Request], float, float]:
    """The `count` requests from `start_s`, arriving over `wall_s`: (requests, rate scale, window)."""
    tail = trace.window(start_s, trace.duration_s - start_s + 1.0)  # to the very end
    if len(tail) < count:
        raise ValueError(
            f"only {len(tail)} requests in {trace.name} after {start_s:g} s, and the slice needs "
            f"{count}: choose an earlier start or a shorter wall time"
        )
    last_s = float(tail.arrival_s[count - 1])
    if last_s <= 0:
        raise ValueError(f"the first {count} requests after {start_s:g} s arrive at once: no rate to scale")
    window_s = last_s + WINDOW_END_S
    scale = last_s / wall_s
    workload = trace.window(start_s, window_s).scale_rate(scale)  # as `workload_from_args` does
    return workload.requests(max_tokens=max_tokens), scale, window_s


def plan_workload(config: DemoConfig) -> DemoWorkload:
    """The slice at `load` × capacity, `duration_s` wall seconds long (see the module docstring)."""
    if config.engine not in ENGINE_LOAD_APIS:
        raise ValueError(
            f"the demo's engine must be one of {', '.join(ENGINE_LOAD_APIS)}, got {config.engine!r}"
        )
    if not (config.duration_s > 0 and math.isfinite(config.duration_s)):
        raise ValueError(f"the demo's wall time must be > 0 s, got {config.duration_s}")
    trace = load_trace(config.trace)
    capacity = capacity_rps(config.setup, trace, config.start_s, config.max_tokens)
    count = max(2, round(config.load * capacity * config.duration_s))
    requests, scale, window_s = trace_slice(
        trace, config.start_s, count, config.duration_s, config.max_tokens
    )
    return DemoWorkload(requests, scale, window_s, capacity)


def title_of(config: DemoConfig, workload: DemoWorkload) -> str:
    """What the demo replayed, in one line."""
    setup = config.setup
    return (
        f"{config.trace} {config.start_s:g}–{config.start_s + workload.window_s:.0f} s at "
        f"{config.load:.0%} of capacity (×{workload.rate_scale:.2f}) on {setup.gpu.name} / "
        f"{setup.model.name} / TP{setup.tp} served as {config.engine}, SLO {config.preset.name}"
    )


def plot_title(config: DemoConfig, workload: DemoWorkload) -> str:
    """What the demo replayed, short enough for a plot title."""
    end_s = config.start_s + workload.window_s
    return f"{config.trace} {config.start_s:g}–{end_s:.0f} s, {config.load:.0%} of capacity"
