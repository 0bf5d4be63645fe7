"""An achievable hindsight reference: the least energy the `max` run's own batches need under the SLO.

A clock policy is judged against `max` and against what was possible. `agent.sim.energy_bound`
bounds every schedule from below; this builds one that runs: keep the `max` run's trajectory (the
same batches, in the same order, none starting before the `max` run started it, so every request
in a batch has arrived) and choose each iteration's clock knowing the whole future.

That is speed scaling with deadlines (Yao, Demers, Shenker, FOCS 1995) on discrete speeds, where
a mix of two adjacent levels suffices (Ishihara, Yasuura, ISLPED 1998). As an LP, with x[i, f] the
share of iteration i's work done at clock f and s_i its start:

    minimise   c * e_last + sum x[i, f] * A_i(f)               c: the engine's idle power
    subject to sum_f x[i, f] = 1,  x >= 0,  s_i >= release_i,  e_i = s_i + sum_f x[i, f] * t_i(f)
               s_i >= e_(i-1)                                  iterations in order
               e_(first token of r) <= a_r + TTFT_r            e_(finish of r) <= a_r + E2E_r
               e_(finish of r) - e_(first token of r) <= TPOT_r * (n_r - 1)

with A_i(f) the above-idle energy and t_i(f) the time of iteration i at f (the twin's own formulas;
idle power is counted once, in c * e_last). Its optimum bounds every clock schedule of that
trajectory from below. It is solved in a smaller, equivalent form:

- only clocks on the lower convex hull of an iteration's (t, A) points can help, and slowing it
  from one hull point to the next is a *segment*: time added at a fixed energy per second;
- between two iterations whose end a limit names, iterations run back to back whatever the clocks
  (no release inside a `max` busy period can bind), so only their total time matters: such a
  *block* costs least when its segments are taken steepest first, and the LP chooses each block's
  start and how much of its segments it takes (bounded variables, a few rows per block);
- segments of nearly equal slope in a block share a variable at the steepest slope (`_segments`),
  which only lowers the cost curve, so the optimum stays a lower bound.

A block's extra time then goes to its segments steepest first, so at most one iteration per
block ends between two hull points; it runs at the faster one (no iteration is slower than the
LP made it, so every limit stays met). That schedule is replayed with `LatencyModel.iteration` and
`PowerModel.busy_w`: the achieved energy.

A request the `max` run itself served late is held to what `max` achieved for it instead (its
limits relaxed to the `max` run's own TTFT, TPOT and E2E), so the `max` schedule is always
feasible. The solver works to a tolerance, so the replay checks every limit exactly; a request the
rounded schedule misses gets its iterations back at the fastest clock (from the last one that
started at its release up to its finish), which replays the `max` run's times for it exactly.

On an engine the `max` run keeps busy, a schedule that falls behind cannot catch up (the batches
stay as small as `max` made them and in its order), so the reference saves far less there than a
policy that lets the engine batch more: it is the optimum for that trajectory, not the workload's.

The replay assumes what the LP does: a clock set for an iteration is in force when it starts (a
controller that knows the schedule issues each change `clock_change_delay_s` ahead), and the GPUs
idle unlocked between iterations (`gpu.idle_w`, the least the twin draws). Noiseless twin only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from agent.control.policies import MaxPolicy
from agent.domain import Request, Slo
from agent.sim.energy_bound import (
    candidate_clocks_mhz,
    kv_read_s_per_token,
    max_decode_batch,
    power_levels_w,
)
from agent.sim.loop import Simulation
from agent.sim.results import SimulationResult
from agent.slo_presets import SloPreset, e2e_budget_s
from agent.twin.engine import Batch, IterationOutcome
from agent.twin.latency import IterationCost, LatencyModel
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup
from agent.twin.step import GpuIteration

SLOPE_GROUP_SHARE = 0.01  # slopes this close share an LP variable (see `_segments`)
# A segment the LP filled to within this (summing a block's times in another order) counts as
# taken; a limit that costs is caught by the exact check and repaired.
ROUNDING_SLACK_S = 1e-12


@dataclass(frozen=True, slots=True, eq=False)
class Trajectory:
    """The `max` run's iterations, in order, and the requests they served (rejected ones left out)."""

    setup: TwinSetup
    requests: tuple[Request, ...]  # as fitted to the engine, in arrival order
    request_ids: np.ndarray  # per request
    arrival_s: np.ndarray
    output_tokens: np.ndarray  # tokens generated
    first_token_iteration: np.ndarray  # index of the iteration that emitted its first token
    finish_iteration: np.ndarray  # index of the iteration that emitted its last token
    release_s: np.ndarray  # per iteration: its start in the `max` run, the earliest it may start
    end_s: np.ndarray  # per iteration: its end in the `max` run
    decode_seqs: np.ndarray  # per iteration
    decode_context_tokens: np.ndarray  # per iteration
    prefill_chunks: tuple[tuple[tuple[int, int], ...], ...]  # per iteration: (new, cached) tokens
    result: SimulationResult  # the `max` run

    @property
    def iterations(self) -> int:
        """Iterations of the trajectory."""
        return len(self.release_s)


@dataclass(frozen=True, slots=True, eq=False)
class RequestLimits:
    """What each request of a trajectory is held to (inf: no limit)."""

    ttft_s: np.ndarray  # arrival to the end of its first-token iteration
    tpot_s: np.ndarray  # (finish - first token) / (output tokens - 1); unused for 1-token outputs
    e2e_s: np.ndarray  # arrival to the end of its finishing iteration


@dataclass(frozen=True, slots=True, eq=False)
class HindsightResult:
    """The LP's lower bound for a trajectory, and the rounded schedule's replay."""

    lp_energy_j: float  # LP optimum: no clock schedule of this trajectory uses less
    energy_j: float  # the rounded schedule, replayed on the twin
    max_energy_j: float  # the `max` run on the same trajectory
    feasible: bool  # every request met its (relaxed) limits in the replay
    violations: tuple[int, ...]  # ids of requests that missed one (empty when feasible)
    relaxed: tuple[int, ...]  # ids of requests held to the `max` run's own times instead
    repaired: tuple[int, ...]  # ids of requests the rounded LP schedule missed (solver tolerance)
    clock_mhz: np.ndarray  # per iteration, the clock the schedule runs it at
    first_token_s: np.ndarray  # per request of the trajectory, in the replay
    finish_s: np.ndarray  # per request of the trajectory, in the replay
    iterations: int
    blocks: int  # runs of iterations only their last one's end constrains
    lp_variables: int  # slope groups plus block starts
    repaired_iterations: int  # put back to the fastest clock for `repaired`
    lp_wall_s: float  # building and solving the LP
    wall_s: float  # everything, from the costs to the last replay


class _Recorder:
    """Collects what `EngineRun.on_batch` reports for every iteration of one run."""

    def __init__(self) -> None:
        self.release_s: list[float] = []
        self.end_s: list[float] = []
        self.decode_seqs: list[int] = []
        self.decode_context_tokens: list[int] = []
        self.prefill_chunks: list[tuple[tuple[int, int], ...]] = []
        self.first_token_iteration: dict[int, int] = {}
        self.finish: dict[int, tuple[int, int]] = {}  # request id -> (iteration, output tokens)

    def record(self, batch: Batch, outcome: IterationOutcome, run: GpuIteration) -> None:
        """Keep one iteration's batch, times, first tokens and finishes."""
        index = len(self.release_s)
        self.release_s.append(run.start_s)
        self.end_s.append(outcome.end_s)
        self.decode_seqs.append(batch.decode_seqs)
        self.decode_context_tokens.append(batch.decode_context_tokens)
        self.prefill_chunks.append(batch.prefill_chunks)
        for request_id in outcome.first_token_ids:
            self.first_token_iteration[request_id] = index
        for done in outcome.finished:
            self.finish[done.request.request_id] = (index, done.output_tokens)


def record_trajectory(setup: TwinSetup, requests: Sequence[Request]) -> Trajectory:
    """Run `requests` under `max` and keep its iterations as a trajectory."""
    if setup.noise != 0:
        raise ValueError("a trajectory is replayed on the noiseless twin only (setup.noise must be 0)")
    simulation = Simulation(setup, MaxPolicy(), requests)
    recorder = _Recorder()
    simulation.engine.on_batch = recorder.record
    result = simulation.run()
    served = [r for r in simulation.requests if r.request_id in recorder.finish]
    finish = [recorder.finish[r.request_id] for r in served]
    return Trajectory(
        setup=setup,
        requests=tuple(served),
        request_ids=np.array([r.request_id for r in served], dtype=np.int64),
        arrival_s=np.array([r.arrival_s for r in served], dtype=float),
        output_tokens=np.array([tokens for _, tokens in finish], dtype=np.int64),
        first_token_iteration=np.array(
            [recorder.first_token_iteration[r.request_id] for r in served], dtype=np.int64
        ),
        finish_iteration=np.array([iteration for iteration, _ in finish], dtype=np.int64),
        release_s=np.array(recorder.release_s),
        end_s=np.array(recorder.end_s),
        decode_seqs=np.array(recorder.decode_seqs, dtype=np.int64),
        decode_context_tokens=np.array(recorder.decode_context_tokens, dtype=np.int64),
        prefill_chunks=tuple(recorder.prefill_chunks),
        result=result,
    )


def slo_limits(trajectory: Trajectory, target: SloPreset | Slo) -> RequestLimits:
    """The limits `target` sets each request of `trajectory` (as `meets_slo` judges them)."""
    ttft, tpot = (target.ttft_s, target.tbt_s) if isinstance(target, Slo) else (target.ttft_s, target.tpot_s)
    count = len(trajectory.request_ids)
    return RequestLimits(
        ttft_s=np.full(count, math.inf if ttft is None else ttft),
        tpot_s=np.full(count, tpot),
        e2e_s=e2e_budget_s(target, trajectory.output_tokens),
    )


def achieved_limits(trajectory: Trajectory, first_token_s: np.ndarray, finish_s: np.ndarray) -> RequestLimits:
    """What a schedule with these first-token and finish times achieved, per request."""
    decode_steps = np.maximum(trajectory.output_tokens - 1, 1)
    return RequestLimits(
        ttft_s=first_token_s - trajectory.arrival_s,
        tpot_s=np.where(trajectory.output_tokens > 1, (finish_s - first_token_s) / decode_steps, 0.0),
        e2e_s=finish_s - trajectory.arrival_s,
    )


def _max_run_limits(trajectory: Trajectory) -> RequestLimits:
    """What the `max` run achieved for each request."""
    return achieved_limits(
        trajectory,
        trajectory.end_s[trajectory.first_token_iteration],
        trajectory.end_s[trajectory.finish_iteration],
    )


def _misses(trajectory: Trajectory, achieved: RequestLimits, limits: RequestLimits) -> np.ndarray:
    """Per request, whether `achieved` breaks a limit (TPOT only for outputs of 2+ tokens)."""
    late_tpot = (trajectory.output_tokens > 1) & (achieved.tpot_s > limits.tpot_s)
    return (achieved.ttft_s > limits.ttft_s) | late_tpot | (achieved.e2e_s > limits.e2e_s)


@dataclass(frozen=True, slots=True, eq=False)
class _Points:
    """Every iteration's time and above-idle energy at every clock of F (clocks descending)."""

    time_s: np.ndarray  # [iteration, clock]
    above_idle_j: np.ndarray  # [iteration, clock]


def _cost_points(trajectory: Trajectory, clocks: tuple[int, ...]) -> _Points:
    """The twin's cost of every iteration at every clock.

    Prefill iterations call `LatencyModel.iteration` per clock. A decode-only iteration's busy and
    attention time grow by the same amount per cached token read (decode attention streams the
    KV cache, a memory-bound read that adds nothing compute-bound), so its costs at every clock
    follow from tables over (clock, batch) at no context, one probe of that per-token amount per
    clock, and `LatencyModel.decode_time_s`; a test holds them to `iteration`.
    """
    setup = trajectory.setup
    latency, power = setup.latency_model(), PowerModel(setup.gpu)
    count, idle_w = setup.tp, setup.gpu.idle_w
    clock_array = np.array(clocks, dtype=float)
    time_s = np.empty((trajectory.iterations, len(clocks)))
    above_idle = np.empty_like(time_s)

    decode_only = np.array([not chunks for chunks in trajectory.prefill_chunks], dtype=bool)
    batch = trajectory.decode_seqs[decode_only]
    context = trajectory.decode_context_tokens[decode_only].astype(float)
    if len(batch):
        parts = _DecodeParts.tabulate(latency, power, clocks, max_decode_batch(setup))
        duration = latency.decode_time_s(clock_array[:, None], batch[None, :], context[None, :])
        kv = parts.kv_s_per_token[:, None] * context[None, :]
        busy = parts.busy_s[:, batch - 1] + kv
        driving = parts.compute_s[:, batch - 1] + power.activity.attention * (
            parts.attention_s[:, batch - 1] + kv
        )
        k = power.activity.memory_bound
        above = count * (
            parts.floor_above_idle_w[:, None] * duration
            + parts.dynamic_w[:, None] * (k * busy + (1.0 - k) * np.minimum(busy, driving))
        )
        time_s[decode_only], above_idle[decode_only] = duration.T, above.T
    for index in np.flatnonzero(~decode_only).tolist():
        for column, clock in enumerate(clocks):
            cost = _iteration_cost(latency, trajectory, index, clock)
            time_s[index, column] = cost.time_s
            above_idle[index, column] = count * (power.busy_w(clock, cost) - idle_w) * cost.time_s
    return _Points(time_s, above_idle)


@dataclass(frozen=True, slots=True, eq=False)
class _DecodeParts:
    """Decode-only iterations with no context at every (clock, batch), and the power per clock."""

    busy_s: np.ndarray  # [clock, batch - 1]
    compute_s: np.ndarray  # [clock, batch - 1]: compute-bound busy time
    attention_s: np.ndarray  # [clock, batch - 1]: decode-attention busy time
    kv_s_per_token: np.ndarray  # [clock]: busy (and attention) time one cached token adds
    floor_above_idle_w: np.ndarray  # [clock]: locked floor power minus idle power, per GPU
    dynamic_w: np.ndarray  # [clock]: compute-bound power minus the floor, per GPU

    @classmethod
    def tabulate(
        cls, latency: LatencyModel, power: PowerModel, clocks: tuple[int, ...], max_batch: int
    ) -> _DecodeParts:
        """One `iteration` call per (clock, batch), and the KV slope and power levels per clock."""
        parts = np.empty((3, len(clocks), max_batch))
        for row, clock in enumerate(clocks):
            for col in range(max_batch):
                cost = latency.iteration(clock, col + 1, 0)
                busy = cost.busy_fraction * cost.time_s
                parts[:, row, col] = busy, cost.compute_share * busy, cost.attention_share * busy
        levels = np.array([power_levels_w(power, clock) for clock in clocks])
        slope = np.array([kv_read_s_per_token(latency, clock) for clock in clocks])
        return cls(parts[0], parts[1], parts[2], slope, levels[:, 0], levels[:, 1])


def _iteration_cost(
    latency: LatencyModel, trajectory: Trajectory, index: int, clock_mhz: int
) -> IterationCost:
    return latency.iteration(
        clock_mhz,
        int(trajectory.decode_seqs[index]),
        int(trajectory.decode_context_tokens[index]),
        trajectory.prefill_chunks[index],
    )


@dataclass(frozen=True, slots=True, eq=False)
class _Hull:
    """The lower convex hull of each iteration's (t, A) points, flattened iteration by iteration."""

    iteration: np.ndarray  # [point]
    clock_index: np.ndarray  # [point]: into F
    time_s: np.ndarray  # [point]
    above_idle_j: np.ndarray  # [point]
    first_point: np.ndarray  # [iteration]: its fastest point; its points follow, slowest last


def _lower_hulls(points: _Points) -> _Hull:
    """Per iteration, the points from the fastest to the least energy that are on the lower hull.

    A point slower and no cheaper than another, or on or above the chord between two others, is
    never needed: a mix of others does its work as fast for no more energy.
    """
    time_s, energy = points.time_s, points.above_idle_j
    rows, width = time_s.shape
    order = np.lexsort((energy, time_s), axis=1)
    time_s = np.take_along_axis(time_s, order, axis=1)
    energy = np.take_along_axis(energy, order, axis=1)
    cheapest_before = np.minimum.accumulate(np.column_stack([np.full(rows, np.inf), energy[:, :-1]]), axis=1)
    keep = energy < cheapest_before
    columns = np.arange(width)
    row = np.arange(rows)[:, None]
    while True:
        before = np.maximum.accumulate(np.where(keep, columns, -1), axis=1)
        after = np.minimum.accumulate(np.where(keep, columns, width)[:, ::-1], axis=1)[:, ::-1]
        previous = np.column_stack([np.full(rows, -1), before[:, :-1]])
        following = np.column_stack([after[:, 1:], np.full(rows, width)])
        inner = keep & (previous >= 0) & (following < width)
        p, q = np.clip(previous, 0, width - 1), np.clip(following, 0, width - 1)
        t_p, t_q, e_p, e_q = time_s[row, p], time_s[row, q], energy[row, p], energy[row, q]
        drop = inner & ((energy - e_p) * (t_q - t_p) >= (e_q - e_p) * (time_s - t_p))
        if not drop.any():
            break
        keep &= ~drop
    iteration, position = np.nonzero(keep)
    return _Hull(
        iteration=iteration,
        clock_index=order[iteration, position],
        time_s=time_s[iteration, position],
        above_idle_j=energy[iteration, position],
        first_point=np.concatenate([[0], np.cumsum(keep.sum(axis=1))[:-1]]),
    )


def _blocks(trajectory: Trajectory) -> np.ndarray:
    """Per iteration, its block: a run of iterations that only its last one's end constrains.

    A block ends at every first-token or finishing iteration, and before every iteration the `max`
    run started after an idle gap (its release may bind). Inside a block each iteration starts
    when the one before ends in any schedule: its release, the `max` run's end of that one, is
    never later, since no iteration is faster than at the max clock.
    """
    last = np.zeros(trajectory.iterations, dtype=bool)
    last[trajectory.first_token_iteration] = True
    last[trajectory.finish_iteration] = True
    last[-1] = True
    last[:-1] |= trajectory.release_s[1:] > trajectory.end_s[:-1]
    return np.concatenate([[0], np.cumsum(last)[:-1]])


@dataclass(frozen=True, slots=True, eq=False)
class _Segments:
    """Every hull segment (one iteration slowed from one hull point to the next), by block and slope."""

    block: np.ndarray
    iteration: np.ndarray
    length_s: np.ndarray  # time it adds
    slope_w: np.ndarray  # energy it adds per second it adds (< 0: slowing saves energy)
    group: np.ndarray  # LP variable it belongs to
    group_start: np.ndarray  # [group]: its first segment


def _segments(hull: _Hull, block_of: np.ndarray, idle_power_w: float) -> _Segments:
    """Every block's segments sorted by slope (the cheapest way to give the block extra time).

    Segments of nearly equal slope share an LP variable at the steepest slope among them, which
    only lowers each block's cost curve, so the LP optimum stays a lower bound. Groups are binned
    on their distance to -c, the price of time at the end of the run (`arcsinh`: within
    SLOPE_GROUP_SHARE of c near it, within that share of the slope far from it), so no group
    straddles it: when nothing else binds, the LP slows exactly the segments worth their idle time.
    """
    follows = np.flatnonzero(hull.iteration[1:] == hull.iteration[:-1])
    iteration = hull.iteration[follows]
    length = hull.time_s[follows + 1] - hull.time_s[follows]
    slope = (hull.above_idle_j[follows + 1] - hull.above_idle_j[follows]) / length
    block = block_of[iteration]
    order = np.lexsort((slope, block))
    iteration, length, slope, block = iteration[order], length[order], slope[order], block[order]
    key = np.floor(np.arcsinh(-(slope + idle_power_w) / idle_power_w) / SLOPE_GROUP_SHARE)
    new_group = np.concatenate([[True], (block[1:] != block[:-1]) | (key[1:] != key[:-1])])
    return _Segments(
        block=block,
        iteration=iteration,
        length_s=length,
        slope_w=slope,
        group=np.cumsum(new_group) - 1,
        group_start=np.flatnonzero(new_group),
    )


@dataclass(frozen=True, slots=True, eq=False)
class _Lp:
    """The LP's optimum and the extra time (beyond all its iterations at their fastest) per block."""

    energy_j: float
    extra_s: np.ndarray  # [block]
    variables: int


def _solve(
    trajectory: Trajectory,
    hull: _Hull,
    block_of: np.ndarray,
    segments: _Segments,
    limits: RequestLimits,
    idle_power_w: float,
) -> _Lp:
    """The LP over blocks: each block's start and how much of each slope group it uses.

    A block's end is its start, plus its iterations at their fastest, plus the groups' time.
    """
    blocks = int(block_of[-1]) + 1
    groups = len(segments.group_start)
    fastest_s = hull.time_s[hull.first_point]
    base_s = np.bincount(block_of, weights=fastest_s, minlength=blocks)
    group_block = segments.block[segments.group_start]
    ends = sparse.hstack(
        [
            sparse.csr_array((np.ones(groups), (group_block, np.arange(groups))), shape=(blocks, groups)),
            sparse.identity(blocks, format="csr"),
        ]
    ).tocsr()  # e_B - base_B
    starts = sparse.hstack(
        [sparse.csr_array((blocks, groups)), sparse.identity(blocks, format="csr")]
    ).tocsr()

    deadline = np.full(trajectory.iterations, math.inf)
    np.minimum.at(deadline, trajectory.first_token_iteration, trajectory.arrival_s + limits.ttft_s)
    np.minimum.at(deadline, trajectory.finish_iteration, trajectory.arrival_s + limits.e2e_s)
    due = block_of[np.flatnonzero(np.isfinite(deadline))]
    spans = (trajectory.output_tokens > 1) & np.isfinite(limits.tpot_s)
    first = block_of[trajectory.first_token_iteration[spans]]
    finish = block_of[trajectory.finish_iteration[spans]]
    upper = sparse.vstack([ends[:-1] - starts[1:], ends[due], ends[finish] - ends[first]]).tocsr()
    upper_limits = np.concatenate(
        [
            -base_s[:-1],  # e_(B-1) <= s_B
            deadline[np.isfinite(deadline)] - base_s[due],
            limits.tpot_s[spans] * (trajectory.output_tokens[spans] - 1) - base_s[finish] + base_s[first],
        ]
    )
    objective = np.concatenate([segments.slope_w[segments.group_start], np.zeros(blocks)])
    objective[:groups][group_block == blocks - 1] += idle_power_w  # c * e_last
    objective[-1] += idle_power_w
    first_iteration = np.flatnonzero(np.diff(block_of, prepend=-1))
    bounds = np.column_stack(
        [
            np.concatenate([np.zeros(groups), trajectory.release_s[first_iteration]]),
            np.concatenate(
                [np.add.reduceat(segments.length_s, segments.group_start), np.full(blocks, np.inf)]
            ),
        ]
    )
    solution = linprog(objective, A_ub=upper, b_ub=upper_limits, bounds=bounds, method="highs")
    if solution.status != 0:
        raise RuntimeError(f"the hindsight LP failed: {solution.message}")
    constant_j = float(hull.above_idle_j[hull.first_point].sum()) + idle_power_w * base_s[-1]
    extra_s = np.bincount(group_block, weights=solution.x[:groups], minlength=blocks)
    return _Lp(float(solution.fun) + constant_j, extra_s, groups + blocks)


def _round(hull: _Hull, segments: _Segments, extra_s: np.ndarray, iterations: int) -> np.ndarray:
    """Per iteration, a hull point (into the hull's arrays) whose time is at most the LP's.

    A block's extra time goes to its segments steepest first, so an iteration is slowed along its
    own hull and at most one per block ends between two hull points; that one takes the faster.
    """
    before = np.cumsum(segments.length_s) - segments.length_s
    block_first = np.searchsorted(segments.block, segments.block, side="left")
    filled = np.clip(extra_s[segments.block] - (before - before[block_first]), 0.0, segments.length_s)
    full = filled >= segments.length_s - ROUNDING_SLACK_S
    return hull.first_point + np.bincount(segments.iteration[full], minlength=iterations)


@dataclass(slots=True)
class _Replay:
    """A clock schedule run on the trajectory with the twin's own costs."""

    start_s: np.ndarray
    end_s: np.ndarray
    energy_j: float


def _replay(
    trajectory: Trajectory,
    clocks_mhz: np.ndarray,
    costs: dict[tuple[int, int], IterationCost],
    latency: LatencyModel,
    power: PowerModel,
) -> _Replay:
    """Each iteration at its clock, as early as its release and its predecessor allow."""
    count = trajectory.setup.tp
    start, end = np.empty(trajectory.iterations), np.empty(trajectory.iterations)
    busy_j = busy_s = previous_end = 0.0
    for index, (clock, release) in enumerate(
        zip(clocks_mhz.tolist(), trajectory.release_s.tolist(), strict=True)
    ):
        cost = costs.get((index, clock))
        if cost is None:
            cost = costs[index, clock] = _iteration_cost(latency, trajectory, index, clock)
        start[index] = begin = max(previous_end, release)
        end[index] = previous_end = begin + cost.time_s
        busy_j += count * power.busy_w(clock, cost) * cost.time_s
        busy_s += cost.time_s
    idle_j = count * trajectory.setup.gpu.idle_w * (previous_end - busy_s)
    return _Replay(start, end, busy_j + idle_j)


def _achieved(trajectory: Trajectory, replay: _Replay) -> RequestLimits:
    return achieved_limits(
        trajectory, replay.end_s[trajectory.first_token_iteration], replay.end_s[trajectory.finish_iteration]
    )


def hindsight_schedule(trajectory: Trajectory, limits: RequestLimits, min_clock_mhz: int) -> HindsightResult:
    """The least-energy clocks for `trajectory` under `limits` (relaxed where `max` missed them)."""
    wall_start = time.perf_counter()
    setup = trajectory.setup
    if setup.noise != 0:
        raise ValueError("hindsight replays the noiseless twin only (setup.noise must be 0)")
    if trajectory.iterations == 0:
        raise ValueError("the trajectory has no iterations")
    clocks = candidate_clocks_mhz(setup, min_clock_mhz)
    own = _max_run_limits(trajectory)
    relaxed = _misses(trajectory, own, limits)
    held_to = RequestLimits(
        ttft_s=np.maximum(limits.ttft_s, own.ttft_s),
        tpot_s=np.maximum(limits.tpot_s, own.tpot_s),
        e2e_s=np.maximum(limits.e2e_s, own.e2e_s),
    )
    idle_power_w = setup.tp * setup.gpu.idle_w
    hull = _lower_hulls(_cost_points(trajectory, clocks))
    block_of = _blocks(trajectory)
    segments = _segments(hull, block_of, idle_power_w)
    lp_start = time.perf_counter()
    lp = _solve(trajectory, hull, block_of, segments, held_to, idle_power_w)
    lp_wall_s = time.perf_counter() - lp_start

    clock_of_point = np.array(clocks)[hull.clock_index]
    chosen = clock_of_point[_round(hull, segments, lp.extra_s, trajectory.iterations)]
    fastest = clock_of_point[hull.first_point]
    latency, power = setup.latency_model(), PowerModel(setup.gpu)
    costs: dict[tuple[int, int], IterationCost] = {}
    replay = _replay(trajectory, chosen, costs, latency, power)
    repaired = np.zeros(trajectory.iterations, dtype=bool)
    missed = np.zeros(len(trajectory.request_ids), dtype=bool)
    while (late := _misses(trajectory, _achieved(trajectory, replay), held_to)).any():
        missed |= late
        at_release = np.flatnonzero(replay.start_s == trajectory.release_s)
        for first, finish in zip(
            trajectory.first_token_iteration[late].tolist(),
            trajectory.finish_iteration[late].tolist(),
            strict=True,
        ):
            begin = at_release[np.searchsorted(at_release, first, side="right") - 1]
            span = slice(begin, finish + 1)
            repaired[span] |= chosen[span] != fastest[span]
            chosen[span] = fastest[span]
        replay = _replay(trajectory, chosen, costs, latency, power)

    violations = trajectory.request_ids[_misses(trajectory, _achieved(trajectory, replay), held_to)]
    return HindsightResult(
        lp_energy_j=lp.energy_j,
        energy_j=replay.energy_j,
        max_energy_j=trajectory.result.energy_j,
        feasible=len(violations) == 0,
        violations=tuple(violations.tolist()),
        relaxed=tuple(trajectory.request_ids[relaxed].tolist()),
        repaired=tuple(trajectory.request_ids[missed].tolist()),
        clock_mhz=chosen,
        first_token_s=replay.end_s[trajectory.first_token_iteration],
        finish_s=replay.end_s[trajectory.finish_iteration],
        iterations=trajectory.iterations,
        blocks=int(block_of[-1]) + 1,
        lp_variables=lp.variables,
        repaired_iterations=int(repaired.sum()),
        lp_wall_s=lp_wall_s,
        wall_s=time.perf_counter() - wall_start,
    )


def hindsight_reference(
    trajectory: Trajectory, target: SloPreset | Slo, min_clock_mhz: int
) -> HindsightResult:
    """The least-energy clocks for the `max` run's trajectory under the SLO `target`."""
    return hindsight_schedule(trajectory, slo_limits(trajectory, target), min_clock_mhz)
