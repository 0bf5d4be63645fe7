"""Pool replays: engine sizing and clock policies on a node's pool, same arrivals (the paper's ablation).

Each planned run is `<mode>:<policy>`: `fixed` serves everything with one engine of the size an
operator provisions; `autoscale` lets the sizing state machine move between the sizes. The
policy is any clock policy spec (`max`, `throttllem`, `throttllem-exact`, …), run per engine.

- **Rate.** The trace window is rate-scaled to `peak_load` × its peak on the largest size: the
  highest rate at which `fixed:max` on the largest engine still meets the SLO over the whole
  window (the replay's peak search, `agent.bench.replay.find_peak`), or to a given rate scale. At
  that rate the baseline meets the SLO by construction, and the busiest minutes need the largest
  engine whenever a smaller one's capacity falls short of them.
- **The provisioned size** (`fixed`): the smallest size whose profiled capacity covers the
  busiest minute, confirmed by running `fixed:max` and moving up a size while it misses the SLO.
  It is also the size autoscaled runs start from (warm at time 0).
- **Capacities** come from `capacity.json` beside each size's IPS model (`agent.bench.capacities`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.capacities import CapacityProfile, load_capacities
from agent.bench.replay import (
    MEASURED_E2E,
    PeakSearch,
    ProgressBars,
    ReplaySlo,
    capacity_rate_scale,
    find_peak,
    plan_runs,
    replay_slo,
    saturated_p99_e2e_s,
)
from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.policy_registry import BuiltPolicy, build_policy
from agent.sim.policies import policy_context
from agent.sim.pool import PoolConfig, PoolResult, SizingKnobs, simulate_pool
from agent.slo_presets import SloPreset
from agent.twin.setup import TwinSetup
from agent.workloads import Workload

MODES = ("fixed", "autoscale")
BASELINE = "fixed:max"
MINUTE_S = 60.0


@dataclass(frozen=True, slots=True)
class PoolRun:
    """One planned run: a sizing mode and the clock policy every engine runs."""

    mode: str  # "fixed" or "autoscale"
    spec: str  # clock policy spec
    length_error: float | None  # p95 length-prediction error in %; None: the policy's own lengths

    @property
    def label(self) -> str:
        """How tables and plots call the run."""
        return f"{self.mode}:{self.spec}"


def plan_pool_runs(policies: Sequence[str], length_errors: Sequence[float]) -> tuple[PoolRun, ...]:
    """`<mode>:<policy>` runs; plain `throttllem` runs once per length error, as in `replay`."""
    runs: list[PoolRun] = []
    for text in policies:
        mode, _, spec = text.partition(":")
        if mode not in MODES or not spec:
            raise ValueError(
                f"pool policy {text!r} must be <mode>:<policy> with mode one of {', '.join(MODES)}"
            )
        runs += [
            PoolRun(mode, planned.spec, planned.length_error) for planned in plan_runs([spec], length_errors)
        ]
    labels = [run.label for run in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"pool policies given more than once: {', '.join(repeated)}")
    if BASELINE not in labels:
        raise ValueError(f"the pool replay compares every run with {BASELINE}: list it")
    return tuple(runs)


@dataclass(frozen=True, slots=True)
class PoolReplayConfig:
    """Everything one pool replay needs besides where progress goes."""

    setups: dict[int, TwinSetup]  # every size of the pool, by TP degree
    workload: Workload  # the trace window at its own rate
    trace: str
    preset: SloPreset
    plan: tuple[PoolRun, ...]
    peak_load: float  # run at this fraction of the largest size's peak rate scale
    rate_scale: float | None  # instead of peak_load
    max_tokens: int
    models_dir: Path
    seed: int
    knobs: SizingKnobs = field(default_factory=SizingKnobs)
    ips_optimism_pct: float = 0.0
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ


@dataclass(frozen=True, slots=True)
class PoolRecord:
    """One run as the report needs it."""

    run: PoolRun
    size: int  # the engine size it started with (fixed: throughout)
    summary: dict[str, Any]  # PoolResult.summary() plus slo_attainment
    pool: PoolResult


@dataclass(frozen=True, slots=True)
class PoolOutcome:
    """The runs and what they were scaled and judged by."""

    records: tuple[PoolRecord, ...]
    slo: ReplaySlo
    capacities: dict[int, CapacityProfile]
    rate_scale: float
    peak: PeakSearch | None  # None: the rate scale was given
    busiest_minute_rps: float  # at the replayed rate
    provisioned_size: int
    provisioning: list[dict[str, Any]]  # fixed:max at each size tried

    def meta(self) -> dict[str, Any]:
        """What the report records about the replay's measurements."""
        return {
            "slo": self.slo.describe(),
            "capacities_rps": {
                f"tp{size}": {"slo_rps": cap.slo_rps, "saturated_rps": cap.saturated_rps}
                for size, cap in sorted(self.capacities.items())
            },
            "rate_scale": self.rate_scale,
            "peak_rate_scale": None if self.peak is None else self.peak.rate_scale,
            "peak_search": None
            if self.peak is None
            else [{"rate_scale": p.rate_scale, "attainment": p.attainment} for p in self.peak.probes],
            "busiest_minute_rps": self.busiest_minute_rps,
            "provisioned_size": self.provisioned_size,
            "provisioning": self.provisioning,
        }


def busiest_minute_rps(workload: Workload) -> float:
    """Arrivals in the window's busiest whole minute, per second."""
    if len(workload) == 0:
        raise ValueError("an empty window has no busiest minute")
    minutes = max(1, math.ceil(workload.duration_s / MINUTE_S))
    counts = np.bincount(
        np.minimum((workload.arrival_s // MINUTE_S).astype(int), minutes - 1), minlength=minutes
    )
    return float(counts.max()) / MINUTE_S


def provisioned_size(capacities: dict[int, CapacityProfile], busiest_rps: float) -> int:
    """The smallest size whose capacity covers the busiest minute; the largest when none does."""
    for size in sorted(capacities):
        if capacities[size].slo_rps >= busiest_rps:
            return size
    return max(capacities)


def _policies(config: PoolReplayConfig, slo: ReplaySlo, spec: str) -> Callable[[int], BuiltPolicy]:
    contexts = {
        size: policy_context(
            setup, slo.targets, config.models_dir, config.seed, config.ips_optimism_pct, config.min_clock_mhz
        )
        for size, setup in config.setups.items()
    }
    return lambda size: build_policy(spec, contexts[size])


def _pool_config(
    config: PoolReplayConfig, run: PoolRun, size: int, caps: dict[int, CapacityProfile]
) -> PoolConfig:
    capacities = [(s, cap.slo_rps) for s, cap in caps.items()]
    scaling = config.knobs.scaling(capacities) if run.mode == "autoscale" else None
    return PoolConfig(config.setups, size, scaling, config.knobs)


def _record(run: PoolRun, size: int, pool: PoolResult, slo: ReplaySlo, rate_scale: float) -> PoolRecord:
    summary = pool.summary()
    summary["rate_scale"] = rate_scale
    summary["slo_attainment"] = pool.result.slo_attainment(slo.target)
    return PoolRecord(run, size, summary, pool)


def _meets(record: PoolRecord, slo: ReplaySlo) -> bool:
    attainment = record.summary["slo_attainment"]
    return attainment is not None and attainment >= slo.preset.percentile / 100.0


def pool_replay(config: PoolReplayConfig, bars: ProgressBars) -> PoolOutcome:
    """Scale the window, find the provisioned size, then run every planned run on the same arrivals."""
    largest = max(config.setups)
    caps = load_capacities(config.models_dir, config.setups, config.trace, config.preset, config.max_tokens)
    busiest = busiest_minute_rps(config.workload)
    slo = _slo(config, largest)
    peak: PeakSearch | None = None
    if config.rate_scale is None:
        with bars(f"peak search: fixed:max on tp{largest}") as progress:
            setup = config.setups[largest]
            start = capacity_rate_scale(setup, config.workload, config.max_tokens)
            peak = find_peak(setup, config.workload, slo, start, config.max_tokens, progress)
    scale = config.rate_scale if peak is None else config.peak_load * peak.rate_scale
    requests = config.workload.scale_rate(scale).requests(max_tokens=config.max_tokens)
    # Build every run's policy for every size before any long run: a bad spec or a missing model fails fast.
    factories = {run.label: _policies(config, slo, run.spec) for run in config.plan}
    for factory in factories.values():
        for size in config.setups:
            factory(size)
    size = provisioned_size(caps, busiest * scale)
    baseline_run = next(run for run in config.plan if run.label == BASELINE)
    provisioning: list[dict[str, Any]] = []
    records: list[PoolRecord] = []
    with bars(f"provisioning: {BASELINE}") as progress:
        while True:
            pool = simulate_pool(
                _pool_config(config, baseline_run, size, caps), factories[BASELINE], requests
            )
            baseline = _record(baseline_run, size, pool, slo, scale)
            provisioning.append({"size": size, "slo_attainment": baseline.summary["slo_attainment"]})
            if _meets(baseline, slo) or size == largest:
                break
            size = min(s for s in config.setups if s > size)
        progress(1.0)
    others = [run for run in config.plan if run.label != BASELINE]
    with bars(f"pool replay: {len(others)} runs") as progress:
        for i, run in enumerate(others):
            pool = simulate_pool(
                _pool_config(config, run, size, caps),
                factories[run.label],
                requests,
                lambda f, i=i: progress((i + f) / len(others)),
            )
            records.append(_record(run, size, pool, slo, scale))
    ordered = [baseline, *records]
    return PoolOutcome(tuple(ordered), slo, caps, scale, peak, busiest * scale, size, provisioning)


def _slo(config: PoolReplayConfig, largest: int) -> ReplaySlo:
    """The SLO; a measured E2E target is the largest engine's (the paper holds all to the TP4 p99)."""
    if config.preset.e2e_rule != MEASURED_E2E:
        return replay_slo(config.preset)
    setup = config.setups[largest]
    saturation = capacity_rate_scale(setup, config.workload, config.max_tokens)
    p99 = saturated_p99_e2e_s(setup, config.workload, saturation, config.max_tokens)
    return replay_slo(config.preset, p99)


def pool_setups(setup: TwinSetup, sizes: Sequence[int]) -> dict[int, TwinSetup]:
    """`setup` at every size; refuses sizes the model does not fit."""
    if not sizes or any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be distinct positive TP degrees, got {list(sizes)}")
    setups = {size: replace(setup, tp=size) for size in sorted(sizes)}
    for built in setups.values():
        built.kv_blocks()
    return setups
