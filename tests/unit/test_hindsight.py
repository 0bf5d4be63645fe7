"""The hindsight reference: feasible where `max` was, never worse than `max`, and optimal where
an independent answer is known (brute force with loose limits, `max` itself with its own times)."""

import functools
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ, gpu_spec, model_spec
from agent.domain import Request
from agent.sim.energy_bound import candidate_clocks_mhz, energy_lower_bound, slo_deadlines_s
from agent.sim.hindsight import (
    RequestLimits,
    Trajectory,
    _cost_points,
    achieved_limits,
    hindsight_reference,
    hindsight_schedule,
    record_trajectory,
)
from agent.slo_presets import SloPreset, load_slo_preset, meets_slo
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup

A100_8B = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
H100_8B_TP2 = TwinSetup(gpu_spec("h100-sxm5-80gb"), model_spec("llama3-8b"), tp=2)
MIN_CLOCK = DEFAULT_MIN_CLOCK_MHZ
RELATIVE_TOLERANCE = 1e-9


@functools.cache
def preset(model: str) -> SloPreset:
    return load_slo_preset("mlperf-server", model)


def requests_of(trace: list[tuple[float, int, int]]) -> list[Request]:
    return [Request(i, arrival, prompt, out, out) for i, (arrival, prompt, out) in enumerate(trace)]


def max_run_times(trajectory: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """(first token, finish) of every request in the `max` run."""
    ends = trajectory.end_s
    return ends[trajectory.first_token_iteration], ends[trajectory.finish_iteration]


def met(
    target: SloPreset, trajectory: Trajectory, first_token_s: np.ndarray, finish_s: np.ndarray
) -> np.ndarray:
    achieved = achieved_limits(trajectory, first_token_s, finish_s)
    return meets_slo(target, achieved.ttft_s, achieved.tpot_s, achieved.e2e_s, trajectory.output_tokens)


traces = st.lists(
    st.tuples(st.floats(0.0, 20.0, allow_nan=False), st.integers(1, 2000), st.integers(1, 300)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=20, deadline=None)
@given(setup=st.sampled_from((A100_8B, H100_8B_TP2)), trace=traces)
def test_the_schedule_keeps_what_max_met_for_no_more_energy_and_brackets_the_bound(
    setup: TwinSetup, trace: list[tuple[float, int, int]]
) -> None:
    target = preset(setup.model.name)
    trajectory = record_trajectory(setup, requests_of(trace))
    result = hindsight_reference(trajectory, target, MIN_CLOCK)
    assert result.feasible and result.violations == ()
    max_met = met(target, trajectory, *max_run_times(trajectory))
    assert set(result.relaxed) == set(trajectory.request_ids[~max_met].tolist())
    assert np.all(met(target, trajectory, result.first_token_s, result.finish_s)[max_met])
    assert result.energy_j <= result.max_energy_j * (1 + RELATIVE_TOLERANCE)
    assert result.lp_energy_j <= result.energy_j * (1 + RELATIVE_TOLERANCE)
    assert min(result.clock_mhz) >= MIN_CLOCK

    requests = list(trajectory.requests)
    _, max_finish = max_run_times(trajectory)
    deadlines = np.maximum(slo_deadlines_s(requests, trajectory.output_tokens, target), max_finish)
    bound = energy_lower_bound(setup, requests, trajectory.output_tokens, deadlines, MIN_CLOCK)
    assert result.lp_energy_j >= bound.total_j * (1 - RELATIVE_TOLERANCE)


def least_energy_per_iteration(trajectory: Trajectory) -> tuple[float, np.ndarray]:
    """Brute force over every clock: each iteration's least energy, idle power included."""
    setup = trajectory.setup
    latency, power = setup.latency_model(), PowerModel(setup.gpu)
    total, clocks = 0.0, []
    for index in range(trajectory.iterations):
        energies = {}
        for clock in candidate_clocks_mhz(setup, MIN_CLOCK):
            cost = latency.iteration(
                clock,
                int(trajectory.decode_seqs[index]),
                int(trajectory.decode_context_tokens[index]),
                trajectory.prefill_chunks[index],
            )
            energies[clock] = setup.tp * power.busy_w(clock, cost) * cost.time_s
        best = min(energies, key=energies.__getitem__)
        total += energies[best]
        clocks.append(best)
    return total, np.array(clocks)


@pytest.mark.parametrize("setup", (A100_8B, H100_8B_TP2), ids=("a100", "h100-tp2"))
def test_with_loose_limits_every_iteration_runs_at_its_least_energy_clock(setup: TwinSetup) -> None:
    """All requests at once: one busy period, so every second of it costs idle power too."""
    rng = np.random.default_rng(2)
    trace = [
        (0.0, int(p), int(o))
        for p, o in zip(rng.integers(1, 2000, 12), rng.integers(1, 120, 12), strict=True)
    ]
    trajectory = record_trajectory(setup, requests_of(trace))
    assert np.array_equal(trajectory.release_s[1:], trajectory.end_s[:-1])  # back to back from 0
    count = len(trajectory.request_ids)
    loose = RequestLimits(*(np.full(count, math.inf) for _ in range(3)))
    result = hindsight_schedule(trajectory, loose, MIN_CLOCK)
    brute_j, brute_clocks = least_energy_per_iteration(trajectory)
    assert result.energy_j == pytest.approx(brute_j, rel=RELATIVE_TOLERANCE)
    assert brute_j * (1 - 1e-3) <= result.lp_energy_j <= brute_j * (1 + RELATIVE_TOLERANCE)
    assert np.mean(result.clock_mhz == brute_clocks) > 0.95  # the rest tie to within rounding


def test_held_to_the_max_runs_own_times_it_keeps_the_max_clock() -> None:
    trace = [(2.0 * i + 0.3 * (i % 3), 100 + 97 * i, 20 + 13 * i) for i in range(8)]
    trajectory = record_trajectory(A100_8B, requests_of(trace))
    own = achieved_limits(trajectory, *max_run_times(trajectory))
    result = hindsight_schedule(trajectory, own, MIN_CLOCK)
    assert result.feasible and result.relaxed == ()
    assert np.all(result.clock_mhz == A100_8B.gpu.max_clock_mhz)
    assert result.energy_j == pytest.approx(result.max_energy_j, rel=RELATIVE_TOLERANCE)
    assert result.lp_energy_j <= result.max_energy_j * (1 + RELATIVE_TOLERANCE)
    assert result.lp_energy_j == pytest.approx(result.max_energy_j, rel=1e-6)


def test_the_vectorised_decode_costs_are_the_twins_own() -> None:
    trace = [(0.5 * i, 50 + 300 * i, 40 + 5 * i) for i in range(10)]
    trajectory = record_trajectory(H100_8B_TP2, requests_of(trace))
    clocks = candidate_clocks_mhz(H100_8B_TP2, MIN_CLOCK)
    points = _cost_points(trajectory, clocks)
    latency, power = H100_8B_TP2.latency_model(), PowerModel(H100_8B_TP2.gpu)
    decode_only = [i for i, chunks in enumerate(trajectory.prefill_chunks) if not chunks]
    assert len(decode_only) > 100
    for index, column in itertools.product(decode_only[::37], range(0, len(clocks), 11)):
        clock = clocks[column]
        cost = latency.iteration(
            clock, int(trajectory.decode_seqs[index]), int(trajectory.decode_context_tokens[index])
        )
        above_idle = H100_8B_TP2.tp * (power.busy_w(clock, cost) - H100_8B_TP2.gpu.idle_w) * cost.time_s
        assert points.time_s[index, column] == pytest.approx(cost.time_s, rel=1e-12)
        assert points.above_idle_j[index, column] == pytest.approx(above_idle, rel=1e-9)


def test_the_noisy_twin_is_refused() -> None:
    with pytest.raises(ValueError, match="noiseless"):
        record_trajectory(replace(A100_8B, noise=0.05), requests_of([(0.0, 10, 5)]))
