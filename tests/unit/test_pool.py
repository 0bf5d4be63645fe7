"""A node's pool of engines in virtual time: the router, the sizing state machine, shadows and draining."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog import gpu_spec, model_spec
from agent.control.policies import MaxPolicy
from agent.control.scaling import ScalingConfig
from agent.control.slo import SloTargets
from agent.domain import Request
from agent.policy_registry import BuiltPolicy, build_policy
from agent.sim.engine_run import DrainingError, EngineRun
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.sim.pool import HOLDS_GPUS, PoolConfig, PoolSimulation, Role, SizingKnobs, simulate_pool
from agent.sim.results import SimulationResult
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup

BASE = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
SETUPS = {tp: replace(BASE, tp=tp) for tp in (1, 2, 4)}
TARGETS = SloTargets(tpot_s=0.1, ttft_s=2.0)


def requests_at(rates: list[tuple[float, float]], seed: int = 0) -> list[Request]:
    """Poisson arrivals at `rate` req/s for `seconds`, phase after phase."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    start = 0.0
    for rate, seconds in rates:
        t = start
        while True:
            t += rng.exponential(1 / rate)
            if t > start + seconds:
                break
            prompt, gen = int(rng.integers(50, 1200)), int(rng.integers(5, 200))
            out.append(Request(len(out), t, prompt, gen, gen))
        start += seconds
    return out


def max_policies(_size: int) -> BuiltPolicy:
    return BuiltPolicy(MaxPolicy(), None)


def exact_policies(size: int) -> BuiltPolicy:
    return build_policy("throttllem-exact", policy_context(SETUPS[size], TARGETS, models_dir=None))  # type: ignore[arg-type]


SCALING = ScalingConfig(((1, 3.0), (2, 6.0), (4, 12.0)), headroom=0.8, grace_s=20.0, shadow_timeout_s=60.0)
KNOBS = SizingKnobs(node_gpus=8, period_s=5.0, cold_start_s=10.0)
# Busy, quiet, busy again: up, down after the grace period, and up again.
BURSTY = [(2.0, 30.0), (9.0, 60.0), (0.5, 90.0), (9.0, 40.0)]


def autoscaled(policies=max_policies, requests=None, knobs=KNOBS, scaling=SCALING, initial=1):
    config = PoolConfig(SETUPS, initial, scaling, knobs)
    sim = PoolSimulation(config, policies, requests if requests is not None else requests_at(BURSTY))
    return sim, sim.run()


@pytest.mark.parametrize("policies", [max_policies, exact_policies], ids=["max", "throttllem-exact"])
def test_a_fixed_pool_of_one_engine_is_the_single_engine_simulation(policies):
    requests = requests_at([(3.0, 40.0)])
    single = simulate(SETUPS[2], policies(2).policy, requests, length_predictor=policies(2).lengths).summary()
    pooled = simulate_pool(PoolConfig(SETUPS, 2, None, KNOBS), policies, requests)
    summary = pooled.summary()
    for key in ("completed", "tokens_out", "iterations", "sim_seconds", "ttft_p99_s", "e2e_p99_s"):
        assert summary[key] == single[key], key
    assert summary["energy_engine_gpus_j"] == pytest.approx(single["energy_j"], rel=1e-12)
    assert summary["gpu_seconds_held"] == pytest.approx(2 * single["sim_seconds"])
    free_w = PowerModel(BASE.gpu).idle_w(None)
    assert pooled.node_energy_j == pytest.approx(single["energy_j"] + 6 * free_w * single["sim_seconds"])


def test_load_moves_the_pool_up_and_down_and_every_request_finishes_once():
    sim, pool = autoscaled()
    actions = [(e.action, e.size) for e in pool.events]
    assert ("start_shadow", 4) in actions and ("switch_to", 4) in actions
    assert any(a == "switch_to" and s < 4 for a, s in actions[actions.index(("switch_to", 4)) :])
    ids = pool.result.finished_ids
    assert sorted(ids) == list(range(len(sim.requests))), "a request was lost or served twice"
    assert pool.result.rejected == 0
    assert len({e["size"] for e in pool.engines if e["served"]}) >= 2


def test_gpus_held_never_exceed_the_node_and_a_shadow_waits_for_free_gpus():
    # 6 GPUs: a TP4 shadow cannot start while a TP4 engine drains beside a TP2 one.
    knobs = SizingKnobs(node_gpus=6, period_s=5.0, cold_start_s=10.0)
    scaling = ScalingConfig(((2, 6.0), (4, 12.0)), headroom=0.8, grace_s=15.0, shadow_timeout_s=60.0)
    setups = {tp: SETUPS[tp] for tp in (2, 4)}
    phases = [(9.0, 40.0), (1.0, 40.0), (9.0, 40.0), (1.0, 40.0), (9.0, 30.0)]
    sim = PoolSimulation(PoolConfig(setups, 4, scaling, knobs), max_policies, requests_at(phases, seed=3))
    pool = sim.run()
    assert max(held for _, held, _ in pool.held_timeline) <= 6
    assert sorted(pool.result.finished_ids) == list(range(len(sim.requests)))
    for engine in pool.engines:
        if engine["acquired_s"] is not None:
            assert engine["acquired_s"] >= engine["requested_s"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    phases=st.lists(
        st.tuples(st.sampled_from([0.3, 2.0, 5.0, 10.0]), st.sampled_from([10.0, 25.0, 40.0])),
        min_size=2,
        max_size=5,
    ),
    node_gpus=st.sampled_from([4, 5, 8]),
    cold_start=st.sampled_from([0.0, 7.0, 30.0]),
    seed=st.integers(0, 5),
)
def test_pool_invariants_hold_on_any_load(phases, node_gpus, cold_start, seed):
    knobs = SizingKnobs(node_gpus=node_gpus, period_s=5.0, cold_start_s=cold_start)
    sim = PoolSimulation(PoolConfig(SETUPS, 1, SCALING, knobs), max_policies, requests_at(phases, seed))
    pool = sim.run()
    assert sorted(pool.result.finished_ids) == list(range(len(sim.requests)))
    assert max(held for _, held, _ in pool.held_timeline) <= node_gpus
    assert sim.gpus_held() <= node_gpus
    assert all(e.role in HOLDS_GPUS or e.acquired_s is None or e.released_s is not None for e in sim.engines)
    assert pool.node_energy_j >= pool.result.energy_j > 0
    assert pool.gpu_seconds_held <= node_gpus * pool.result.sim_seconds + 1e-6


def test_a_draining_engine_admits_nothing_new():
    engine = EngineRun(SETUPS[1], MaxPolicy(), SimulationResult("max", 0))
    engine.draining = True
    with pytest.raises(DrainingError, match="draining tp1"):
        engine.arrive(Request(0, 0.0, 10, 5, 5), 5)


def test_held_requests_move_with_the_switch_and_the_old_engine_only_drains():
    sim, pool = autoscaled(exact_policies, requests_at([(2.0, 20.0), (9.0, 40.0), (3.0, 20.0)], seed=2))
    assert sorted(pool.result.finished_ids) == list(range(len(sim.requests)))
    switches = [e.time_s for e in pool.events if e.action == "switch_to"]
    assert switches, "the burst must switch engines"
    first_engine = sim.engines[0]
    assert first_engine.role is Role.RELEASED
    assert first_engine.run.take_held() == []
    # Every request the first engine finished arrived before traffic left it.
    arrivals = {r.request_id: r.arrival_s for r in sim.requests}
    assert all(arrivals[i] <= switches[0] for i in first_engine.run.result.finished_ids)


def test_a_shadow_that_never_becomes_ready_is_abandoned_and_serving_goes_on():
    knobs = SizingKnobs(node_gpus=8, period_s=5.0, cold_start_s=1000.0)  # longer than the 60 s timeout
    sim, pool = autoscaled(knobs=knobs)
    actions = [e.action for e in pool.events]
    assert "start_shadow" in actions and "stop" in actions and "switch_to" not in actions
    assert [e["size"] for e in pool.engines if e["served"]] == [1]
    assert sorted(pool.result.finished_ids) == list(range(len(sim.requests)))
    assert all(e.role is Role.RELEASED for e in sim.engines[1:])


def test_a_shadow_draws_idle_power_while_it_starts_and_counts_in_gpu_seconds():
    requests = requests_at([(9.0, 30.0)])
    knobs = SizingKnobs(node_gpus=8, period_s=5.0, cold_start_s=10.0)
    _, pool = autoscaled(requests=requests, knobs=knobs)
    shadow = next(e for e in pool.engines if e["size"] == 4)
    assert shadow["ready_s"] - shadow["acquired_s"] == pytest.approx(10.0)
    assert shadow["energy_j"] >= 4 * PowerModel(BASE.gpu).idle_w(None) * 10.0
    held = sum(
        e["size"] * ((e["released_s"] or pool.result.sim_seconds) - e["acquired_s"]) for e in pool.engines
    )
    assert pool.gpu_seconds_held == pytest.approx(held)


def test_pool_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="does not fit a node of 2 GPUs"):
        PoolConfig(SETUPS, 1, None, SizingKnobs(node_gpus=2))
    with pytest.raises(ValueError, match="initial size tp8"):
        PoolConfig(SETUPS, 8, None)
    with pytest.raises(ValueError, match="listed as tp2 is tp1"):
        PoolConfig({1: SETUPS[1], 2: SETUPS[1]}, 1, None)
    with pytest.raises(ValueError, match="cold start"):
        SizingKnobs(cold_start_s=-1.0)
    with pytest.raises(ValueError, match="knows sizes \\[8\\]"):
        PoolConfig(SETUPS, 1, ScalingConfig(((1, 1.0), (8, 9.0))))


def test_a_pool_with_no_requests_ends_at_time_zero():
    pool = simulate_pool(PoolConfig(SETUPS, 2, SCALING, KNOBS), max_policies, [])
    assert pool.result.completed == 0 and pool.result.sim_seconds == 0.0 and pool.events == []
