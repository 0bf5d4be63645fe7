"""DynamoLLM's instance-level rule: the feasible clock of least energy per token, every 5 s."""

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.control.admission import EngineLimits
from agent.control.peers.dynamollm import DynamoLlmPolicy
from agent.control.policies import ControlView
from agent.control.scoreboard import Scoreboard
from agent.control.slo import SloTargets
from agent.domain import Request
from agent.policy_registry import build_policy, check_live_policy
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace

CLOCKS = np.array([600.0, 900.0, 1200.0, 1410.0])
LIMITS = EngineLimits(kv_blocks=10_000, tokens_per_block=64, max_batch_size=64, max_num_tokens=4096)
GPU = gpu_spec("a100-sxm4-80gb")


class InverseClockModel:
    """Decode takes 20 ms at max clock and scales with 1/clock; batch and cache do not matter."""

    clocks_mhz = CLOCKS

    def decode_s(self, clock_index, batch, kv_blocks):
        return 0.020 * 1410.0 / CLOCKS[np.asarray(clock_index)] + 0 * np.asarray(batch, dtype=float)

    def prefill_s(self, batch, kv_blocks, prefill_tokens):
        return 0.050 * 1410.0 / CLOCKS


class UShapedPower:
    """Power such that energy per token is least at 900 MHz (static power dominates below it)."""

    watts = np.array([250.0, 190.0, 330.0, 400.0])  # x time: 11.75, 5.96, 7.76, 8.0 J per 1 s

    def decode_power_w(self, clock_index, batch, kv_blocks):
        return self.watts[np.asarray(clock_index)]


def view_of(now: float, running: int = 4, queued: int = 0, predicted: int = 50) -> ControlView:
    board = Scoreboard()
    for i in range(running):
        board.add_queued(Request(i, now - 1.0, 200, 512), predicted)
        board.admit(i)
        board.first_token(i, now - 0.01)
    for j in range(queued):
        board.add_queued(Request(100 + j, now - 0.01, 200, 512), predicted)
    return ControlView(now_s=now, gpu=GPU, stats=None, limits=LIMITS, scoreboard=board.view())


def policy(tpot_s: float = 0.1, period_s: float = 5.0) -> DynamoLlmPolicy:
    return DynamoLlmPolicy(InverseClockModel(), UShapedPower(), SloTargets(tpot_s=tpot_s), 1410, period_s)


def test_picks_the_least_energy_feasible_clock_not_the_lowest():
    assert policy().decide(view_of(10.0)).sm_clock_mhz == 900


def test_a_tighter_tpot_leaves_only_faster_clocks():
    # 600 MHz: 47 ms, 900: 31 ms, 1200: 23.5 ms per token; a 30 ms target (28.5 with the margin).
    assert policy(tpot_s=0.030).decide(view_of(10.0)).sm_clock_mhz == 1200


def test_no_feasible_clock_means_max():
    assert policy(tpot_s=0.010).decide(view_of(10.0)).sm_clock_mhz is None


def test_admits_every_arrival_at_once():
    decision = policy().decide(view_of(10.0, running=2, queued=3))
    assert decision.admit_request_ids == (100, 101, 102)


def test_the_clock_holds_between_re_evaluations():
    rule = policy(tpot_s=0.1)
    assert rule.decide(view_of(10.0)).sm_clock_mhz == 900
    rule.targets = SloTargets(tpot_s=0.030)  # what it would now choose: 1200
    assert rule.decide(view_of(14.9)).sm_clock_mhz == 900
    assert rule.decide(view_of(15.0)).sm_clock_mhz == 1200


def test_a_request_that_would_overrun_its_tpot_budget_forbids_slow_clocks():
    # A first token 4.5 s ago and one token since: 49 more within its 4.66 s TPOT budget
    # (49 x 0.1 x 0.95) leaves 0.16 s, less than 49 iterations take even at max clock.
    now = 10.0
    board = Scoreboard()
    board.add_queued(Request(1, now - 5.0, 200, 512), 50)
    board.admit(1)
    board.first_token(1, now - 4.5)
    view = ControlView(now_s=now, gpu=GPU, stats=None, limits=LIMITS, scoreboard=board.view())
    assert policy().decide(view).sm_clock_mhz is None  # even max clock is too slow: max


def test_live_sidecar_refuses_it_and_the_simulator_runs_it():
    setup = TwinSetup(GPU, model_spec("llama3-8b"))
    context = policy_context(setup, SloTargets(tpot_s=0.1, ttft_s=2.0), SHIPPED_MODELS_DIR)
    with pytest.raises(ValueError, match="energy profile"):
        check_live_policy("dynamollm", context.engine)
    built = build_policy("dynamollm", context)
    requests = load_trace("azure-conv").window(600, 20).requests(max_tokens=2048)
    result = simulate(setup, built.policy, requests, length_predictor=built.lengths)
    assert result.completed == len(requests)
    clocks = set(result.clock_mhz)
    assert min(clocks) < GPU.max_clock_mhz  # it found clocks below max to save energy at
