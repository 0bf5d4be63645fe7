"""GreenLLM's decode loop (reconstructed): steps on the tail TBT, holds in its band, max clock for prefill."""

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.control.peers.greenllm import GreenLlmPolicy
from agent.control.policies import ControlView
from agent.control.slo import SloTargets
from agent.domain import EngineStats
from agent.policy_registry import build_policy
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.twin.setup import TwinSetup
from agent.workloads import synthetic_from_spec

A100 = gpu_spec("a100-sxm4-80gb")
CLOCKS = tuple(c for c in A100.sm_clocks_mhz if c >= 600)  # 600..1410 MHz, 15 MHz apart
TOP = max(CLOCKS)
TPOT_S = 0.04
TARGETS = SloTargets(tpot_s=TPOT_S)


class Engine:
    """Feeds the policy one snapshot per iteration, at the clock it last chose."""

    def __init__(self, policy: GreenLlmPolicy) -> None:
        self.policy = policy
        self.iteration = 0
        self.clock_mhz: int | None = None  # None: unlocked, i.e. max clock

    def run(self, latency_s, *, prompt_tokens=0, queued=0, ran_at_mhz=None):
        """One iteration of that latency; returns the clock decided after it (None: max)."""
        self.iteration += 1
        snapshot = EngineStats(
            timestamp_s=self.iteration * 0.05,
            iteration=self.iteration,
            active_requests=8,
            queued_requests=queued,
            scheduled_requests=8,
            context_requests=1 if prompt_tokens else 0,
            generation_requests=7 if prompt_tokens else 8,
            paused_requests=0,
            context_tokens=prompt_tokens,
            kv_blocks_used=100,
            kv_blocks_max=1000,
            tokens_per_block=64,
            iteration_latency_s=latency_s,
        )
        ran_at = ran_at_mhz or self.clock_mhz or TOP
        self.view = ControlView(now_s=snapshot.timestamp_s, gpu=A100, stats=snapshot, last_clock_mhz=ran_at)
        return self.repeat()

    def repeat(self):
        """Decide again on the latest snapshot, as a shell does when no new one came."""
        self.clock_mhz = self.policy.decide(self.view).sm_clock_mhz
        return self.clock_mhz

    def run_many(self, ratios):
        """Iterations whose latencies are these shares of the TPOT target; the last decision."""
        clock = None
        for ratio in ratios:
            clock = self.run(ratio * TPOT_S)
        return clock


def lowered(steps=40, **kwargs):
    """A policy already brought `steps` clocks below max by a long comfortable stretch."""
    engine = Engine(GreenLlmPolicy(TARGETS, CLOCKS, **kwargs))
    while engine.policy.decode_clock_mhz > max(TOP - 15 * steps, min(CLOCKS)):
        engine.run_many([0.5] * engine.policy.min_samples)
    return engine


def test_name_and_admission():
    assert GreenLlmPolicy(TARGETS, CLOCKS).name == "greenllm"
    assert GreenLlmPolicy.gates_admission is False


def test_starts_at_max_and_waits_for_enough_samples():
    engine = Engine(GreenLlmPolicy(TARGETS, CLOCKS, min_samples=16))
    assert engine.run_many([0.5] * 15) is None  # 15 samples: not enough to judge a tail


def test_steps_down_one_clock_when_the_tail_is_comfortably_under_target():
    engine = Engine(GreenLlmPolicy(TARGETS, CLOCKS, min_samples=16))
    assert engine.run_many([0.5] * 16) == TOP - 15
    # The move emptied the window: the next lowering needs 16 samples at the new clock.
    assert engine.run_many([0.5] * 15) == TOP - 15
    assert engine.run(0.5 * TPOT_S) == TOP - 30


def test_steps_up_when_the_tail_is_close_to_target():
    engine = lowered()
    start = engine.policy.decode_clock_mhz
    assert engine.run_many([0.97] * engine.policy.min_samples) == start + 2 * 15


def test_jumps_to_max_when_the_tail_misses_the_target():
    engine = lowered()
    assert engine.run_many([1.1] * engine.policy.min_samples) is None
    assert engine.policy.decode_clock_mhz == TOP


@pytest.mark.parametrize("ratio", [0.81, 0.9, 0.94])
def test_holds_inside_the_hysteresis_band(ratio):
    engine = lowered()
    start = engine.policy.decode_clock_mhz
    assert engine.run_many([ratio] * 200) == start


def test_judges_the_tail_not_the_mean():
    # 14 fast iterations and 2 over target: the mean is comfortable (0.575), the 95th percentile is not.
    engine = lowered()
    ratios = [0.5] * 14 + [1.1] * 2
    assert np.mean(ratios) < engine.policy.lower
    assert engine.run_many(ratios) is None


def test_prefill_gets_max_clock_and_the_decode_loop_resumes_after():
    engine = lowered()
    decode_clock = engine.policy.decode_clock_mhz
    assert engine.run(0.3, prompt_tokens=2048) is None
    assert engine.run(0.5 * TPOT_S, queued=3) is None  # waiting requests will be prefilled next
    assert engine.run(0.5 * TPOT_S) == decode_clock


def test_iterations_run_faster_than_the_loops_clock_are_not_counted():
    engine = lowered()
    decode_clock = engine.policy.decode_clock_mhz
    for _ in range(3 * engine.policy.min_samples):  # all at max clock (e.g. after prefills): ignored
        engine.run(0.5 * TPOT_S, ran_at_mhz=TOP)
    assert engine.policy.decode_clock_mhz == decode_clock


def test_a_snapshot_seen_twice_is_one_sample():
    engine = Engine(GreenLlmPolicy(TARGETS, CLOCKS, min_samples=2))
    engine.run(0.5 * TPOT_S)
    assert engine.repeat() is None  # the same iteration again: still one sample, no move
    assert engine.run(0.5 * TPOT_S) == TOP - 15


def test_without_a_snapshot_it_holds():
    engine = lowered()
    held = engine.policy.decode_clock_mhz
    assert engine.policy.decide(ControlView(now_s=99.0, gpu=A100, stats=None)).sm_clock_mhz == held


def test_the_bottom_clock_is_a_floor():
    engine = lowered(steps=len(CLOCKS) + 5)
    assert engine.policy.decode_clock_mhz == min(CLOCKS)
    assert engine.run_many([0.1] * 100) == min(CLOCKS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_samples": 0},
        {"window": 8, "min_samples": 9},
        {"percentile": 0.0},
        {"lower": 0.95, "upper": 0.9},
        {"upper": 1.2},
        {"step_down": 0},
    ],
)
def test_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        GreenLlmPolicy(TARGETS, CLOCKS, **kwargs)


def test_on_the_twin_it_serves_everything_below_max_energy():
    setup = TwinSetup(A100, model_spec("llama3-8b"), noise=0.02, seed=3)
    targets = SloTargets(tpot_s=0.05)
    requests = synthetic_from_spec("synthetic:poisson:2", seed=5, duration_s=30).requests(max_tokens=1024)
    context = policy_context(setup, targets, SHIPPED_MODELS_DIR)
    run = simulate(setup, GreenLlmPolicy(targets, context.clocks_mhz()), requests)
    stock = simulate(setup, build_policy("max", context).policy, requests).summary()
    result = run.summary()
    assert result["completed"] == len(requests) and result["tokens_out"] == stock["tokens_out"]
    assert result["mean_clock_mhz"] < 1300 and result["energy_j"] < 0.9 * stock["energy_j"]
    decode_only = np.array(run.decode_tokens) == np.array(run.batch_size)
    lowered = np.array(run.clock_mhz) < max(context.clocks_mhz())
    held = np.array(run.iteration_s)[decode_only & lowered]
    assert len(held) > 100 and np.percentile(held, 95) <= targets.tpot_s  # the tail it tracks is held
