"""Peak request rate of an engine for a given request mix, to scale traces to a target load.

The paper scaled the Azure trace to each engine's maximum RPS. Here the maximum is measured on
the twin: a sample of the workload's requests all arrive at once at stock clocks, and the
completion rate of that saturated run is the peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from agent.control.policies import MaxPolicy
from agent.domain import Request
from agent.sim.loop import simulate
from agent.twin.setup import TwinSetup

PROFILE_START_S = 600.0  # the trace window whose request mix a capacity profile uses: minutes 10 to 20
PROFILE_DURATION_S = 600.0
PEAK_SAMPLE = 1500  # requests in the saturated run: enough to average over the length mix


def peak_rate_rps(setup: TwinSetup, requests: Sequence[Request], sample: int = PEAK_SAMPLE) -> float:
    """Requests per second the engine completes when it is never short of work."""
    if not requests:
        raise ValueError("need requests to measure a peak rate")
    step = max(1, len(requests) // sample)
    burst = [replace(r, arrival_s=0.0) for r in list(requests)[::step][:sample]]
    summary = simulate(setup, MaxPolicy(), burst).summary()
    return summary["completed"] / summary["sim_seconds"]


def rate_scale_for_load(setup: TwinSetup, requests: Sequence[Request], load: float) -> float:
    """The rate multiplier that makes `requests` arrive at `load` x the engine's peak rate."""
    if not load > 0.0:
        raise ValueError("load must be > 0 (a fraction of the engine's peak rate)")
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    if span <= 0:
        raise ValueError("the workload needs at least two distinct arrival times to have a rate")
    trace_rate = (len(requests) - 1) / span
    return load * peak_rate_rps(setup, requests) / trace_rate
