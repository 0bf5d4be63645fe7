"""Predictive policies on the twin: they serve every request, and they throttle when there is slack."""

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.control.slo import SloTargets
from agent.policy_registry import build_policy
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.twin.setup import TwinSetup
from agent.workloads import synthetic_from_spec

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"), noise=0.02, seed=3)
TARGETS = SloTargets(tpot_s=0.1, ttft_s=2.0)
REQUESTS = synthetic_from_spec("synthetic:poisson:1.5", seed=5, duration_s=40).requests(max_tokens=2048)


def run(spec: str):
    built = build_policy(spec, policy_context(SETUP, TARGETS, SHIPPED_MODELS_DIR))
    return simulate(SETUP, built.policy, REQUESTS, length_predictor=built.lengths)


@pytest.fixture(scope="module")
def stock():
    return run("max")


@pytest.mark.parametrize("spec", ["throttllem", "throttllem-exact", "reactive", "throttllem:noisy:30"])
def test_policy_serves_everything_and_saves_energy(spec, stock):
    result = run(spec)
    summary = result.summary()
    assert summary["completed"] == len(REQUESTS) and summary["rejected"] == 0
    assert summary["tokens_out"] == stock.summary()["tokens_out"]
    assert summary["energy_j"] < 0.9 * stock.energy_j
    assert summary["mean_clock_mhz"] < 1300


@pytest.mark.parametrize("spec", ["throttllem", "throttllem-exact"])
def test_predictive_policies_keep_the_tpot_target_at_light_load(spec):
    tpot = np.array(run(spec).tpot_s)
    tpot = tpot[~np.isnan(tpot)]
    assert np.mean(tpot <= TARGETS.tpot_s) >= 0.97


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match="throttllem"):
        build_policy("fastest", policy_context(SETUP, TARGETS, SHIPPED_MODELS_DIR))


def test_an_optimistic_ips_model_predicts_shorter_iterations_and_says_so():
    honest = build_policy("throttllem", policy_context(SETUP, TARGETS, SHIPPED_MODELS_DIR)).policy
    optimistic = build_policy(
        "throttllem", policy_context(SETUP, TARGETS, SHIPPED_MODELS_DIR, ips_optimism_pct=15)
    ).policy
    clocks, batch, kv = np.arange(3), np.array([8, 64, 200]), np.array([100.0, 900.0, 2000.0])
    assert np.allclose(
        optimistic.model.decode_s(clocks, batch, kv) * 1.15, honest.model.decode_s(clocks, batch, kv)
    )
    assert np.allclose(
        optimistic.model.prefill_s(16, 300.0, 512) * 1.15, honest.model.prefill_s(16, 300.0, 512)
    )
    assert optimistic.name == "throttllem (IPS +15%)"
    with pytest.raises(ValueError, match="percentage"):
        build_policy("throttllem", policy_context(SETUP, TARGETS, SHIPPED_MODELS_DIR, ips_optimism_pct=-5))


def test_the_guard_correction_holds_the_tpot_target_when_the_model_is_optimistic():
    # A tight target (25 ms), where a 30%-optimistic model picks clocks that are too low.
    tight = SloTargets(tpot_s=0.025, ttft_s=2.0)

    def attainment(correct: bool) -> float:
        built = build_policy(
            "throttllem", policy_context(SETUP, tight, SHIPPED_MODELS_DIR, ips_optimism_pct=30)
        )
        built.policy.correct = correct
        tpot = np.array(simulate(SETUP, built.policy, REQUESTS, length_predictor=built.lengths).tpot_s)
        return float(np.mean(tpot[~np.isnan(tpot)] <= tight.tpot_s))

    corrected, uncorrected = attainment(correct=True), attainment(correct=False)
    assert corrected >= 0.98 and corrected > uncorrected
