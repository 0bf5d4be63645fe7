"""Policy replays: clock policies side by side on the same arrivals, at loads relative to `max`'s peak.

Every policy sees the same requests: the trace window, scaled once per load, with one client
`max_tokens` for all (a predictive policy must not learn true lengths from it, and `max` must not
get a tighter KV reservation under `guaranteed_no_evict` than the policies it is compared with).

Loads come in two kinds. A load "of peak" is a fraction of the highest rate scale at which `max`
meets the SLO; on a bursty trace that peak can be a few percent of what the engine completes when
saturated, so such a window is mostly idle. A load "of capacity" (a utilisation) is a fraction of
the capacity rate: the window compressed to a saturated `max` engine's completion rate. Every
run reports its offered load as a share of capacity and its busy fraction, whichever kind it ran.

Peak load is the highest rate scale at which `max` still meets the SLO preset (attainment at least
the preset's `percentile`, 99% for the shipped presets). The search starts at the engine's capacity
(the window compressed to the completion rate of a saturated `max` run, `agent.sim.capacity`),
brackets by factors of 2, then bisects in log space. Attainment is not strictly monotone in the
rate, so the result is a boundary the search found, known to within the last bracket.

A preset whose E2E target is "the p99 E2E of `max` under saturating load" (the paper's) is made
concrete by running `max` with the window arriving at that capacity rate — a measurement that does
not depend on the peak, which itself needs the E2E target — and passing its p99 to `resolve_e2e`.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.report import CAPACITY, PEAK, RunRecord
from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.control.policies import MaxPolicy
from agent.control.slo import SloTargets
from agent.domain import Request, Slo
from agent.policy_registry import BuiltPolicy, PolicySpec, build_policy
from agent.sim.capacity import rate_scale_for_load
from agent.sim.energy_bound import energy_lower_bound, served_output_tokens, slo_deadlines_s
from agent.sim.hindsight import hindsight_reference, record_trajectory
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.sim.results import SimulationResult
from agent.slo_presets import SloPreset, control_targets, resolve_e2e
from agent.twin.setup import TwinSetup, fit_to_engine
from agent.workloads import Workload

Progress = Callable[[float], None]
ProgressBars = Callable[[str], AbstractContextManager[Progress]]  # a labelled bar per phase
LENGTH_PREDICTING = "throttllem"  # the policy whose length predictor a length error replaces
BRACKET_FACTOR = 2.0
BISECTIONS = 4  # narrows a factor-2 bracket to 2 ** (1 / 16), about 4.4%
MAX_BRACKET_PROBES = 10  # up to 2 ** 9 either side of the capacity rate
MEASURED_E2E = "max-p99-saturated"  # the E2E rule whose target is measured here


def _ignore(_fraction: float) -> None:
    """Progress sink for callers that show none."""


@dataclass(frozen=True, slots=True)
class ReplaySlo:
    """The SLO a replay holds every policy to, with any measured E2E target resolved."""

    preset: SloPreset
    target: SloPreset | Slo  # what attainment is measured against
    targets: SloTargets  # what the predictive policies aim for

    def describe(self) -> dict[str, Any]:
        """The resolved targets, for the report's meta."""
        return {
            "preset": self.preset.name,
            "source": self.preset.source,
            "percentile": self.preset.percentile,
            "e2e_rule": self.preset.e2e_rule,
            "ttft_s": self.targets.ttft_s,
            "tpot_s": self.targets.tpot_s,
            "e2e_s": self.targets.e2e_s,
        }


@dataclass(frozen=True, slots=True)
class Probe:
    """One `max` run of the peak search."""

    rate_scale: float
    attainment: float


@dataclass(frozen=True, slots=True)
class PeakSearch:
    """The highest rate scale found at which `max` meets the SLO, and how it was found."""

    rate_scale: float
    probes: tuple[Probe, ...]


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """One policy run per load: a policy spec and the length error it stands for."""

    spec: str
    length_error: float | None  # p95 length-prediction error in %; None: the policy's own lengths


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything one replay needs besides where progress goes."""

    setup: TwinSetup
    workload: Workload  # the trace window at its own rate
    trace: str  # the trace's name in the report
    preset: SloPreset
    plan: tuple[PlannedRun, ...]
    loads: tuple[float, ...]  # fractions of the peak rate scale; empty when rate_scale is set
    utilisations: tuple[float, ...]  # fractions of the capacity rate scale (no peak search needed)
    rate_scale: float | None  # run at this scale of the trace's rate instead of searching the peak
    max_tokens: int  # client max_tokens of every request
    models_dir: Path
    seed: int
    ips_optimism_pct: float = 0.0  # throttllem's IPS model this much too optimistic (guard experiment)
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ  # no policy locks below this clock
    limits: bool = True  # also compute the energy lower bound and the hindsight reference per load


@dataclass(frozen=True, slots=True)
class EnergyLimits:
    """What any schedule of one load's requests needs at least, and what hindsight achieves.

    `bound_j` is `agent.sim.energy_bound`'s theorem (no schedule meeting every deadline uses
    less); `hindsight_j` is `agent.sim.hindsight`'s achievable schedule: `max`'s own batching
    with the least-energy clock per iteration, replayed and checked against every deadline.
    """

    max_j: float  # `max` on the same requests: what every saving is measured from
    bound_j: float
    hindsight_j: float
    hindsight_lp_j: float  # the LP optimum on that trajectory (a bound for it, below hindsight_j)
    hindsight_feasible: bool
    hindsight_wall_s: float

    def describe(self) -> dict[str, Any]:
        """The figures, for every run's summary of this load."""
        return {
            "energy_bound_j": self.bound_j,
            "hindsight_energy_j": self.hindsight_j,
            "hindsight_lp_energy_j": self.hindsight_lp_j,
            "hindsight_feasible": self.hindsight_feasible,
            "hindsight_wall_s": self.hindsight_wall_s,
        }

    def judge(self, energy_j: float) -> dict[str, float | None]:
        """A run's share of the achievable saving, (E_max - E) / (E_max - E_bound); its gap to hindsight."""
        room = self.max_j - self.bound_j
        return {
            "saving_share": (self.max_j - energy_j) / room if room > 0 else None,
            "gap_to_hindsight_pct": 100.0 * (energy_j / self.hindsight_j - 1.0)
            if self.hindsight_j > 0
            else None,
        }


def energy_limits(
    setup: TwinSetup, requests: Sequence[Request], slo: ReplaySlo, min_clock_mhz: int
) -> EnergyLimits:
    """The lower bound and the hindsight reference for `requests` held to `slo` (noiseless twin only)."""
    fitted, _ = fit_to_engine(sorted(requests, key=lambda r: r.arrival_s), setup)
    outputs = served_output_tokens(fitted)
    deadlines = slo_deadlines_s(fitted, outputs, slo.target)
    bound = energy_lower_bound(setup, fitted, outputs, deadlines, min_clock_mhz)
    hindsight = hindsight_reference(record_trajectory(setup, fitted), slo.target, min_clock_mhz)
    return EnergyLimits(
        max_j=hindsight.max_energy_j,
        bound_j=bound.total_j,
        hindsight_j=hindsight.energy_j,
        hindsight_lp_j=hindsight.lp_energy_j,
        hindsight_feasible=hindsight.feasible,
        hindsight_wall_s=hindsight.wall_s,
    )


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """The runs and the measurements they were scaled and judged by."""

    runs: tuple[RunRecord, ...]
    slo: ReplaySlo
    capacity_rate_scale: float  # the window at a saturated max engine's completion rate
    peak: PeakSearch | None  # None: the rate scale was given

    def meta(self) -> dict[str, Any]:
        """What the report records about the replay's measurements."""
        return {
            "slo": self.slo.describe(),
            "capacity_rate_scale": self.capacity_rate_scale,
            "peak_rate_scale": None if self.peak is None else self.peak.rate_scale,
            "peak_search": None
            if self.peak is None
            else [{"rate_scale": p.rate_scale, "attainment": p.attainment} for p in self.peak.probes],
        }


def length_error_spec(error_pct: float) -> str:
    """The throttllem spec whose length predictor errs by `error_pct` (0: true lengths)."""
    return f"{LENGTH_PREDICTING}:oracle" if error_pct == 0 else f"{LENGTH_PREDICTING}:noisy:{error_pct:g}"


def plan_runs(policies: Sequence[str], length_errors: Sequence[float]) -> tuple[PlannedRun, ...]:
    """One run per policy, and one per length error for plain `throttllem`.

    Policies that predict no lengths run once and serve every length-error group of the report.
    """
    if not policies:
        raise ValueError("no policies to replay")
    for name, values in (("policies", policies), ("length errors", length_errors)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"{name} given more than once: {', '.join(repeated)}")
    bad = [e for e in length_errors if not (math.isfinite(e) and e >= 0)]
    if bad:
        raise ValueError(f"length errors must be percentages >= 0, got {bad}")
    plan: list[PlannedRun] = []
    for text in policies:
        spec = PolicySpec.parse(text)
        if spec.name != LENGTH_PREDICTING or not length_errors:
            plan.append(PlannedRun(text, None))
        elif spec.arg is not None:
            raise ValueError(
                f"policy {text!r} names its own length predictor, but length errors replace "
                f"throttllem's predictor: list plain {LENGTH_PREDICTING!r}"
            )
        else:
            plan += [PlannedRun(length_error_spec(e), e) for e in length_errors]
    return tuple(plan)


def capacity_rate_scale(setup: TwinSetup, workload: Workload, max_tokens: int) -> float:
    """The rate scale at which the window arrives as fast as a saturated `max` engine completes it."""
    return rate_scale_for_load(setup, workload.requests(max_tokens=max_tokens), 1.0)


def run_max(
    setup: TwinSetup, workload: Workload, rate_scale: float, max_tokens: int, progress: Progress = _ignore
) -> SimulationResult:
    """`max` (stock clocks) on the window at `rate_scale` times its rate."""
    requests = workload.scale_rate(rate_scale).requests(max_tokens=max_tokens)
    return simulate(setup, MaxPolicy(), requests, progress)


def saturated_p99_e2e_s(
    setup: TwinSetup,
    workload: Workload,
    saturation_scale: float,
    max_tokens: int,
    progress: Progress = _ignore,
) -> float:
    """p99 E2E of `max` with the window arriving at `saturation_scale` times its rate."""
    p99 = run_max(setup, workload, saturation_scale, max_tokens, progress).summary()["e2e_p99_s"]
    if p99 is None:
        raise ValueError("max completed no request under saturating load: no p99 E2E to set the target")
    return float(p99)


def replay_slo(preset: SloPreset, p99_e2e_s: float | None = None) -> ReplaySlo:
    """The preset made concrete; a measured E2E target takes `p99_e2e_s` (see `saturated_p99_e2e_s`)."""
    if preset.e2e_rule != MEASURED_E2E:
        return ReplaySlo(preset, preset, control_targets(preset))
    if p99_e2e_s is None:
        raise ValueError(f"SLO preset {preset.name!r} needs the p99 E2E of max under saturating load")
    slo = resolve_e2e(preset, p99_e2e_s)
    return ReplaySlo(preset, slo, control_targets(preset, slo))


def find_peak(
    setup: TwinSetup,
    workload: Workload,
    slo: ReplaySlo,
    start_scale: float,
    max_tokens: int,
    progress: Progress = _ignore,
) -> PeakSearch:
    """The highest rate scale at which `max` meets the SLO: bracket from `start_scale`, then bisect."""
    need = slo.preset.percentile / 100.0
    probes: list[Probe] = []

    def meets(scale: float, left: int) -> bool:
        """Run `max` at `scale`; `left` is how many probes are expected after this one."""
        done = len(probes)
        result = run_max(
            setup, workload, scale, max_tokens, lambda f: progress((done + f) / (done + 1 + left))
        )
        attainment = result.slo_attainment(slo.target)
        probes.append(Probe(scale, math.nan if attainment is None else attainment))
        return probes[-1].attainment >= need

    lo: float | None = None
    hi: float | None = None
    scale = start_scale
    for _ in range(MAX_BRACKET_PROBES):
        if meets(scale, BISECTIONS + (0 if probes else 1)):
            lo = scale
        else:
            hi = scale
        if lo is not None and hi is not None:
            break
        scale = scale * BRACKET_FACTOR if hi is None else scale / BRACKET_FACTOR
    if hi is None:
        raise ValueError(
            f"max meets the {slo.preset.name} SLO up to {lo:g}x the trace's rate: the window is too "
            "short to find a peak; widen it or give the rate scale"
        )
    if lo is None:
        raise ValueError(
            f"max misses the {slo.preset.name} SLO even at {hi:g}x the trace's rate: the targets are "
            "out of this engine's reach"
        )
    for i in range(BISECTIONS):
        mid = math.sqrt(lo * hi)
        if meets(mid, BISECTIONS - 1 - i):
            lo = mid
        else:
            hi = mid
    return PeakSearch(lo, tuple(probes))


def run_policy(
    built: BuiltPolicy,
    setup: TwinSetup,
    requests: Sequence[Request],
    slo: ReplaySlo,
    *,
    trace: str,
    load: float | None,
    load_basis: str,
    length_error: float | None,
    rate_scale: float,
    capacity_rate_scale: float,
    limits: EnergyLimits | None = None,
    progress: Progress = _ignore,
) -> RunRecord:
    """One policy on the requests, as the report's record of it."""
    result = simulate(setup, built.policy, requests, progress, length_predictor=built.lengths)
    summary = result.summary()
    if limits is not None:
        summary |= limits.describe() | limits.judge(result.energy_j)
    summary["rate_scale"] = rate_scale
    summary["offered_load_of_capacity"] = rate_scale / capacity_rate_scale
    summary["slo_attainment"] = result.slo_attainment(slo.target)
    return RunRecord(
        policy=result.policy,
        trace=trace,
        load=load,
        load_basis=load_basis,
        length_error=length_error,
        summary=summary,
        time_s=np.asarray(result.iteration_end_s),
        clock_mhz=np.asarray(result.clock_mhz),
        power_w=np.asarray(result.power_w),
        # An iteration is one token gap for each token it decodes; a resumed request's gap is its own.
        tbt_s=np.concatenate([np.asarray(result.iteration_s, float), np.asarray(result.extra_gaps_s, float)]),
        tbt_weight=np.concatenate(
            [np.asarray(result.decode_tokens, float), np.ones(len(result.extra_gaps_s))]
        ),
        tpot_s=np.asarray(result.tpot_s, float),
        tpot_target_s=slo.preset.tpot_s,
    )


def replay(config: ReplayConfig, bars: ProgressBars) -> ReplayOutcome:
    """Measure what the SLO and the loads need, then run every planned policy at every load."""
    setup, workload, cap, preset = config.setup, config.workload, config.max_tokens, config.preset
    with bars("capacity: max, saturated") as progress:
        capacity = capacity_rate_scale(setup, workload, cap)
        progress(1.0)
    p99: float | None = None
    if preset.e2e_rule == MEASURED_E2E:
        with bars("E2E target: max at capacity") as progress:
            p99 = saturated_p99_e2e_s(setup, workload, capacity, cap, progress)
    slo = replay_slo(preset, p99)

    context = policy_context(
        setup, slo.targets, config.models_dir, config.seed, config.ips_optimism_pct, config.min_clock_mhz
    )

    def build(run: PlannedRun) -> BuiltPolicy:
        return build_policy(run.spec, context)

    # Build the first load's policies before any long run, so a bad spec or a missing model fails
    # fast; later loads get fresh ones, since policies keep state.
    first = [build(run) for run in config.plan]
    peak: PeakSearch | None = None
    settings: list[tuple[float | None, str, float]] = []  # (load, its basis, rate scale)
    if config.rate_scale is not None:
        settings.append((None, PEAK, config.rate_scale))
    if config.loads:
        with bars("peak search: max") as progress:
            peak = find_peak(setup, workload, slo, capacity, cap, progress)
        settings += [(load, PEAK, load * peak.rate_scale) for load in config.loads]
    settings += [(u, CAPACITY, u * capacity) for u in config.utilisations]
    limits_by_setting: list[EnergyLimits | None] = [None] * len(settings)
    if config.limits and setup.noise == 0:
        with bars(f"energy bound and hindsight: {len(settings)} loads") as progress:
            for i, (_, _, scale) in enumerate(settings):
                requests = workload.scale_rate(scale).requests(max_tokens=cap)
                limits_by_setting[i] = energy_limits(setup, requests, slo, config.min_clock_mhz)
                progress((i + 1) / len(settings))
    total = len(settings) * len(config.plan)
    runs: list[RunRecord] = []
    with bars(f"replay: {total} runs") as progress:
        for i, (load, basis, scale) in enumerate(settings):
            requests = workload.scale_rate(scale).requests(max_tokens=cap)
            for run, built in zip(config.plan, first if i == 0 else map(build, config.plan), strict=True):
                done = len(runs)
                record = run_policy(
                    built,
                    setup,
                    requests,
                    slo,
                    trace=config.trace,
                    load=load,
                    load_basis=basis,
                    length_error=run.length_error,
                    rate_scale=scale,
                    capacity_rate_scale=capacity,
                    limits=limits_by_setting[i],
                    progress=lambda f, done=done: progress((done + f) / total),
                )
                runs.append(record)
    return ReplayOutcome(tuple(runs), slo, capacity, peak)


def versions() -> dict[str, str]:
    """Versions that decide the figures, for the report's meta."""
    return {
        "throttllem": version("throttllem"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": version("onnxruntime"),
    }
