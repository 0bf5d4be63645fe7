"""EcoFreq (VoltanaLLM) on throttllem's inputs, held to a brute-force search over a known latency model."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear

from agent.catalog import gpu_spec, model_spec
from agent.control.admission import EngineLimits
from agent.control.peers.ecofreq import EcoFreqPolicy, decode_segments, fit_nonnegative_slopes
from agent.control.policies import ControlView
from agent.control.scoreboard import ScoreboardView
from agent.control.slo import SloTargets
from agent.domain import EngineStats
from agent.policy_registry import build_policy, learned_time_model
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.twin.setup import TwinSetup
from agent.workloads import synthetic_from_spec

A100 = gpu_spec("a100-sxm4-80gb")
A100_CLOCKS = tuple(c for c in A100.sm_clocks_mhz if c >= 600)
H100_CLOCKS = tuple(c for c in gpu_spec("h100-sxm5-80gb").sm_clocks_mhz if c >= 600)
LIMITS = EngineLimits(kv_blocks=4000, tokens_per_block=64, max_batch_size=64, max_num_tokens=4096)
TARGETS = SloTargets(tpot_s=0.02)


class LinearTimeModel:
    """Iteration times exactly linear in batch, KV and prompt tokens at each clock, and ∝ 1/clock."""

    def __init__(self, clocks_mhz: tuple[int, ...]) -> None:
        self._clocks = np.array(sorted(clocks_mhz), dtype=float)
        self._top = self._clocks[-1]

    @property
    def clocks_mhz(self) -> np.ndarray:
        return self._clocks

    def decode_s(self, clock_index, batch, kv_blocks):
        slowdown = self._top / self._clocks[np.asarray(clock_index)]
        return (0.008 + 0.0001 * np.asarray(batch) + 0.000002 * np.asarray(kv_blocks)) * slowdown

    def prefill_s(self, batch, kv_blocks, prefill_tokens):
        return (0.02 + 0.00005 * prefill_tokens) * self._top / self._clocks


MODEL = LinearTimeModel(A100_CLOCKS)


def stats(batch=8, kv=500, *, prompt_tokens=0, queued=0, unscheduled=0, latency_s=0.015):
    scheduled = batch + (1 if prompt_tokens else 0)
    return EngineStats(
        timestamp_s=0.0,
        iteration=1,
        active_requests=scheduled + unscheduled,
        queued_requests=queued,
        scheduled_requests=scheduled,
        context_requests=1 if prompt_tokens else 0,
        generation_requests=batch,
        paused_requests=unscheduled,
        context_tokens=prompt_tokens,
        kv_blocks_used=kv,
        kv_blocks_max=LIMITS.kv_blocks,
        tokens_per_block=LIMITS.tokens_per_block,
        iteration_latency_s=latency_s,
    )


def view(snapshot, now_s=0.0, board=None):
    return ControlView(now_s=now_s, gpu=A100, stats=snapshot, limits=LIMITS, scoreboard=board)


def policy(candidates="full", targets=TARGETS, **kwargs):
    return EcoFreqPolicy(MODEL, targets, A100_CLOCKS, limits=LIMITS, candidates=candidates, **kwargs)


def brute_force(latency_at, budget_s, clocks=A100_CLOCKS):
    """The lowest clock below max whose true latency meets the budget; None (max) when none does."""
    model_clocks = [int(c) for c in MODEL.clocks_mhz]
    for clock in sorted(clocks)[:-1]:
        if latency_at(model_clocks.index(clock)) <= budget_s:
            return clock
    return None


def test_names_and_admission():
    assert policy("voltana").name == "ecofreq" and policy("full").name == "ecofreq:full"
    assert EcoFreqPolicy.gates_admission is False


def test_voltana_list_is_its_own_on_an_a100_and_keeps_its_share_of_max_elsewhere():
    assert policy("voltana").candidates_mhz == (1005, 1410)
    h100 = EcoFreqPolicy(LinearTimeModel(H100_CLOCKS), TARGETS, H100_CLOCKS, limits=LIMITS)
    # 1005 / 1410 of 1980 MHz is 1411.3 MHz: the nearest clock of the 15 MHz grid is 1410.
    assert h100.candidates_mhz == (1410, 1980)


def test_full_list_is_every_allowed_modelled_clock():
    assert policy("full").candidates_mhz == tuple(sorted(A100_CLOCKS))
    narrowed = EcoFreqPolicy(MODEL, TARGETS, tuple(c for c in A100_CLOCKS if c >= 900), limits=LIMITS)
    assert min(narrowed.candidates_mhz) >= 900


def test_tables_reproduce_a_linear_model():
    tables = policy("full").tables
    rng = np.random.default_rng(1)
    for _ in range(200):
        batch = int(rng.integers(1, LIMITS.max_batch_size + 1))
        kv = int(rng.integers(batch, LIMITS.kv_blocks))
        predicted = tables.decode_s(batch, kv * LIMITS.tokens_per_block)
        truth = MODEL.decode_s(np.arange(len(A100_CLOCKS) - 1), batch, kv)
        assert predicted == pytest.approx(truth, rel=1e-9)
    tokens = int(rng.integers(1, LIMITS.max_num_tokens))
    truth = MODEL.prefill_s(1, 0, tokens)[:-1]
    assert tables.prefill_s(tokens) == pytest.approx(truth, rel=1e-9)


def test_segments_follow_voltana_and_stop_at_the_largest_batch():
    firsts, lasts = decode_segments(300)
    assert list(firsts[:4]) == [1, 5, 9, 17] and list(lasts[:4]) == [4, 8, 16, 24]
    assert list(firsts[-3:]) == [121, 129, 257] and list(lasts[-3:]) == [128, 256, 300]


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, LIMITS.max_batch_size),
    kv_share=st.floats(0.0, 1.0),
    tpot_s=st.floats(0.008, 0.05),
    margin=st.sampled_from([0.0, 0.35]),
)
def test_picks_the_lowest_clock_meeting_the_loosened_slo(batch, kv_share, tpot_s, margin):
    kv = int(batch + kv_share * (LIMITS.kv_blocks - batch))
    budget_s = tpot_s * (1 + margin)
    latencies = MODEL.decode_s(np.arange(len(A100_CLOCKS)), batch, kv)
    assume(np.all(np.abs(latencies - budget_s) > 1e-9))  # no clock sits on the boundary
    choice = policy("full", SloTargets(tpot_s=tpot_s), slo_margin=margin).decide(view(stats(batch, kv)))
    expected = brute_force(lambda i: float(MODEL.decode_s(i, batch, kv)), budget_s)
    assert choice.sm_clock_mhz == expected


def test_voltana_list_drops_to_1005_only_when_1005_meets_the_slo():
    batch, kv = 16, 1000
    at_1005 = float(MODEL.decode_s([int(c) for c in MODEL.clocks_mhz].index(1005), batch, kv))
    loose = policy("voltana", SloTargets(tpot_s=at_1005 * 1.01), slo_margin=0.0)
    tight = policy("voltana", SloTargets(tpot_s=at_1005 * 0.99), slo_margin=0.0)
    assert loose.decide(view(stats(batch, kv))).sm_clock_mhz == 1005
    assert tight.decide(view(stats(batch, kv))).sm_clock_mhz is None


@pytest.mark.parametrize("waiting", [{"queued": 1}, {"unscheduled": 2}])
def test_waiting_requests_send_it_to_max_clock(waiting):
    eco = policy("full")
    assert eco.decide(view(stats(1, 10))).sm_clock_mhz == 600  # an easy batch: the lowest clock
    assert eco.decide(view(stats(1, 10, **waiting))).sm_clock_mhz is None


def test_a_batch_beyond_every_table_goes_to_max_clock():
    eco = policy("full", SloTargets(tpot_s=10.0))
    assert eco.decide(view(stats(LIMITS.max_batch_size + 1, 500))).sm_clock_mhz is None
    assert eco.decide(view(stats(0, 500))).sm_clock_mhz == 600  # nothing decoding predicts 0


def test_prefill_law_applies_only_when_ttft_is_a_target():
    tokens, budget_ttft = 4000, 0.3
    prefill_at = lambda i: float(MODEL.prefill_s(1, 0, tokens)[i])  # noqa: E731
    expected = brute_force(prefill_at, budget_ttft * 1.35)
    assert expected not in (None, 600)  # the prefill law matters here, the decode law alone gives 600
    with_ttft = policy("full", SloTargets(tpot_s=1.0, ttft_s=budget_ttft))
    without = policy("full", SloTargets(tpot_s=1.0))
    assert with_ttft.decide(view(stats(4, 200, prompt_tokens=tokens))).sm_clock_mhz == expected
    assert without.decide(view(stats(4, 200, prompt_tokens=tokens))).sm_clock_mhz == 600


def board(now_s, waited_s):
    """A scoreboard with one running request still waiting for its first token, `waited_s` old."""
    one = np.array([0])
    empty = np.zeros(0)
    return ScoreboardView(
        run_ids=one,
        run_arrival_s=np.array([now_s - waited_s]),
        run_prompt=np.array([4000]),
        run_generated=np.array([0]),
        run_predicted=np.array([100]),
        run_max_tokens=np.array([512]),
        run_first_token_s=np.array([np.nan]),
        queued_ids=empty.astype(int),
        queued_arrival_s=empty,
        queued_prompt=empty,
        queued_predicted=empty,
        queued_max_tokens=empty,
    )


def test_time_already_waited_comes_off_the_ttft_budget():
    tokens, ttft_s, waited_s = 4000, 0.3, 0.2
    eco = policy("full", SloTargets(tpot_s=1.0, ttft_s=ttft_s))
    chosen = eco.decide(view(stats(4, 200, prompt_tokens=tokens), 10.0, board(10.0, waited_s)))
    expected = brute_force(lambda i: float(MODEL.prefill_s(1, 0, tokens)[i]), ttft_s * 1.35 - waited_s)
    assert chosen.sm_clock_mhz == expected
    assert expected != brute_force(lambda i: float(MODEL.prefill_s(1, 0, tokens)[i]), ttft_s * 1.35)


def test_without_snapshots_it_starts_low_holds_then_idles_low():
    eco = policy("full")
    assert eco.decide(view(None, 0.0)).sm_clock_mhz == 600  # EcoFreq starts at its lowest clock
    busy = eco.decide(view(stats(64, 3900), 1.0)).sm_clock_mhz
    assert busy != 600
    assert eco.decide(view(None, 5.9)).sm_clock_mhz == busy  # no metrics for 4.9 s: hold
    assert eco.decide(view(None, 6.1)).sm_clock_mhz == 600  # over 5 s: back to the lowest


def test_nonnegative_fit_matches_a_bounded_least_squares_solver():
    rng = np.random.default_rng(7)
    features = rng.uniform(0, 10, size=(60, 2))
    # The second slope is truly negative: an unconstrained fit would use it, the bounded one may not.
    latency = np.column_stack(
        [
            1.0 + 0.5 * features[:, 0] - 0.3 * features[:, 1] + rng.normal(0, 0.1, 60),
            2.0 + 0.2 * features[:, 0] + 0.1 * features[:, 1] + rng.normal(0, 0.1, 60),
            -1.0 - 0.4 * features[:, 0] - 0.2 * features[:, 1] + rng.normal(0, 0.1, 60),
        ]
    )
    fitted = fit_nonnegative_slopes(features, latency)
    design = np.column_stack([features, np.ones(60)])
    for column in range(latency.shape[1]):
        reference = lsq_linear(design, latency[:, column], bounds=([0, 0, -np.inf], np.inf), method="bvls")
        assert fitted[column] == pytest.approx(reference.x, abs=1e-6)
    assert fitted[0, 1] == 0.0 and (fitted[2, :2] == 0.0).all()


def test_refuses_unknown_lists_and_clock_ranges_with_nothing_below_max():
    with pytest.raises(ValueError, match="voltana, full"):
        policy("every")
    with pytest.raises(ValueError, match="below the max"):
        EcoFreqPolicy(LinearTimeModel((1410,)), TARGETS, (1410,), limits=LIMITS)


def test_on_the_twin_it_serves_everything_below_max_energy():
    setup = TwinSetup(A100, model_spec("llama3-8b"), noise=0.02, seed=3)
    targets = SloTargets(tpot_s=0.05, ttft_s=2.0)
    requests = synthetic_from_spec("synthetic:poisson:2", seed=5, duration_s=20).requests(max_tokens=1024)
    context = policy_context(setup, targets, SHIPPED_MODELS_DIR)
    model = learned_time_model(context.engine, context.limits, context.clocks_mhz())
    eco = EcoFreqPolicy(model, targets, context.clocks_mhz(), limits=context.limits)
    run = simulate(setup, eco, requests)
    result = run.summary()
    stock = simulate(setup, build_policy("max", context).policy, requests).summary()
    assert result["completed"] == len(requests) and result["tokens_out"] == stock["tokens_out"]
    assert set(run.clock_mhz) <= {1005, 1410} and 1005 in run.clock_mhz  # only its own list
    assert result["energy_j"] < 0.95 * stock["energy_j"]
