"""The SLO guard: online correction, emergency boost, hysteresis and the switch budget.

Properties are checked against brute-force recomputations from the raw event history, not against
the guard's own bookkeeping.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control import guard
from agent.control.guard import GuardConfig, GuardMode, SlackObserved, TimePassed

MAX_MHZ = 1410
GRID = tuple(range(MAX_MHZ, 209, -15))


def observe_all(state, observations):
    for clock, predicted, measured in observations:
        state = guard.observe(state, clock, predicted, measured)
    return state


# --- online correction -------------------------------------------------------------------------


def expected_correction(cfg, observations, clock_mhz):
    """The documented rule, recomputed from the whole history with numpy."""
    n_bands = MAX_MHZ // cfg.band_width_mhz + 1
    ratios = [(c // cfg.band_width_mhz, m / p) for c, p, m in observations]

    def window(band):
        return [r for b, r in ratios if b == band][-cfg.window :]

    def q(values):
        return float(np.quantile(values, cfg.quantile))

    band = clock_mhz // cfg.band_width_mhz
    if len(window(band)) >= cfg.min_samples:
        return max(1.0, q(window(band)))
    neighbours = [
        q(window(b)) for b in (band - 1, band + 1) if 0 <= b < n_bands and len(window(b)) >= cfg.min_samples
    ]
    if neighbours:
        return max(1.0, *neighbours)
    if ratios:
        return max(1.0, q([r for _, r in ratios][-cfg.window :]))
    return 1.0


def test_no_data_means_no_correction():
    state = guard.initial_state(MAX_MHZ)
    assert guard.correction(state, 1050) == 1.0
    assert guard.summary(state)["samples"] == 0


def test_band_correction_is_the_quantile_of_its_window():
    cfg = GuardConfig(window=20, min_samples=5, quantile=0.9)
    ratios = [1.0 + 0.01 * i for i in range(30)]  # only the last 20 stay in the window
    state = observe_all(guard.initial_state(MAX_MHZ, cfg), [(1050, 0.02, 0.02 * r) for r in ratios])
    assert guard.correction(state, 1050) == pytest.approx(np.quantile(ratios[-20:], 0.9))
    assert guard.correction(state, 1099) == guard.correction(state, 1000)  # same 100 MHz band


def test_an_optimistic_model_is_never_corrected_downwards():
    state = observe_all(guard.initial_state(MAX_MHZ), [(1200, 0.02, 0.015)] * 40)
    assert guard.correction(state, 1200) == 1.0
    assert guard.summary(state)["ratio_quantile"] == pytest.approx(0.75)


def test_sparse_band_borrows_from_the_worse_neighbour_then_from_every_clock():
    cfg = GuardConfig(min_samples=4)
    obs = [(1050, 0.02, 0.022)] * 4 + [(1250, 0.02, 0.026)] * 4 + [(700, 0.02, 0.03)]
    state = observe_all(guard.initial_state(MAX_MHZ, cfg), obs)
    assert guard.correction(state, 1150) == pytest.approx(1.3)  # neighbours 1.1 and 1.3
    assert guard.correction(state, 1050) == pytest.approx(1.1)  # own band
    assert guard.correction(state, 300) == pytest.approx(np.quantile([m / p for _, p, m in obs], 0.9))


def test_observe_rejects_meaningless_times_and_clocks():
    state = guard.initial_state(MAX_MHZ)
    for predicted, measured in [(0.0, 0.02), (0.02, -1.0), (math.nan, 0.02), (0.02, math.inf)]:
        with pytest.raises(ValueError, match="positive and finite"):
            guard.observe(state, 1050, predicted, measured)
    with pytest.raises(ValueError, match="outside"):
        guard.observe(state, MAX_MHZ + 15, 0.02, 0.02)


observations_strategy = st.lists(
    st.tuples(
        st.sampled_from((210, 400, 990, 1005, 1095, 1110, 1200, 1305, 1410)),
        st.floats(min_value=1e-3, max_value=0.5),
        st.floats(min_value=1e-3, max_value=0.5),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    observations=observations_strategy,
    window=st.integers(min_value=1, max_value=24),
    min_samples=st.integers(min_value=1, max_value=12),
    quantile=st.sampled_from((0.5, 0.9, 0.99, 1.0)),
)
def test_correction_matches_numpy_on_the_history(observations, window, min_samples, quantile):
    cfg = GuardConfig(window=window, min_samples=min_samples, quantile=quantile)
    state = observe_all(guard.initial_state(MAX_MHZ, cfg), observations)
    for w in (*state.bands, state.overall):
        if w is not None:
            assert len(w.recent) == len(w.ordered) <= window
            assert list(w.ordered) == sorted(w.recent)
    for clock in (210, 305, 990, 1050, 1110, 1200, 1300, 1410):
        got = guard.correction(state, clock)
        assert got >= 1.0
        assert got == pytest.approx(expected_correction(cfg, observations, clock), rel=1e-12)


# --- emergency boost ---------------------------------------------------------------------------

CFG = GuardConfig(boost_margin_s=0.1, boost_exit_factor=2.0, boost_hold_s=0.5)


def test_needs_boost():
    assert guard.needs_boost(0.05, 0.1)
    assert not guard.needs_boost(0.1, 0.1)
    assert not guard.needs_boost(None, 0.1)  # nothing running: nothing to protect


def test_boost_is_entered_on_low_slack_and_left_only_after_the_hold():
    state = guard.initial_state(MAX_MHZ, CFG)
    state = guard.transition(state, SlackObserved(0.0, 0.5))
    assert state.boost.mode is GuardMode.STEADY
    state = guard.transition(state, SlackObserved(1.0, 0.05))
    assert state.boost.mode is GuardMode.BOOST
    state = guard.transition(state, SlackObserved(1.1, 0.15))  # above margin, below margin × k
    state = guard.transition(state, TimePassed(5.0))
    assert state.boost.mode is GuardMode.BOOST
    state = guard.transition(state, SlackObserved(5.1, 0.25))  # recovered from here on
    state = guard.transition(state, SlackObserved(5.5, 0.3))
    assert state.boost.mode is GuardMode.BOOST
    state = guard.transition(state, SlackObserved(5.55, 0.19))  # relapse: the hold restarts
    state = guard.transition(state, SlackObserved(5.6, 0.3))
    state = guard.transition(state, TimePassed(6.05))
    assert state.boost.mode is GuardMode.BOOST
    state = guard.transition(state, TimePassed(6.1))
    assert state.boost.mode is GuardMode.STEADY
    assert state.boost.recovered_since_s is None


def test_transition_refuses_foreign_events():
    with pytest.raises(TypeError, match="not a guard event"):
        guard.transition(guard.initial_state(MAX_MHZ), "tick")


slack_events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=300),  # ms since the previous event
        st.one_of(st.none(), st.sampled_from((-1.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 1.0))),
        st.booleans(),  # True: a slack observation; False: time passing
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events=slack_events)
def test_boost_modes_follow_the_rule(events):
    state = guard.initial_state(MAX_MHZ, CFG)
    history = []  # (time, slack) of every slack observation
    now_ms = 0
    for dt_ms, slack, is_observation in events:
        now_ms += dt_ms
        now = now_ms / 1000
        before = state.boost.mode
        if is_observation:
            history.append((now, slack))
            state = guard.transition(state, SlackObserved(now, slack))
        else:
            state = guard.transition(state, TimePassed(now))
        after = state.boost.mode
        low = is_observation and slack is not None and slack < CFG.boost_margin_s
        if low:
            assert after is GuardMode.BOOST
        if before is GuardMode.STEADY and after is GuardMode.BOOST:
            assert low
        if before is GuardMode.BOOST and after is GuardMode.STEADY:
            # The last observation below margin × k, then a run of good ones that began ≥ hold ago.
            exit_floor = CFG.boost_margin_s * CFG.boost_exit_factor
            last_bad = max(i for i, (_, s) in enumerate(history) if s is not None and s < exit_floor)
            first_good_t = history[last_bad + 1][0]
            assert now - first_good_t >= CFG.boost_hold_s


# --- hysteresis and the switch budget ----------------------------------------------------------

SETTLE = GuardConfig(dwell_s=0.05, max_switches_per_s=4, step_mhz=30, boost_margin_s=0.1)


def settle_run(state, steps):
    """Apply (time, proposal) pairs; return the settled clocks."""
    clocks = []
    for now, proposal in steps:
        clock, state = guard.settle_clock(state, proposal, now)
        clocks.append(clock)
    return clocks, state


def test_raises_at_once_and_lowers_only_after_the_dwell():
    state = guard.initial_state(MAX_MHZ, SETTLE)
    clocks, state = settle_run(state, [(0.0, 1050), (0.03, 1000), (0.049, 1050), (0.05, 1050), (0.06, 1200)])
    assert clocks == [1410, 1410, 1410, 1050, 1200]
    clocks, _ = settle_run(state, [(0.07, 900), (0.08, 1200), (0.1, 900), (0.149, 900), (0.151, 900)])
    assert clocks == [1200, 1200, 1200, 1200, 900]  # the raise proposal at 0.08 restarted the dwell


def test_lowering_goes_to_the_highest_clock_proposed_during_the_dwell():
    state = guard.initial_state(MAX_MHZ, SETTLE)
    clocks, _ = settle_run(state, [(0.0, 900), (0.02, 1200), (0.04, 1000), (0.06, 800)])
    assert clocks == [1410, 1410, 1410, 1200]


def test_small_lowerings_are_ignored_and_reset_the_dwell():
    state = guard.initial_state(MAX_MHZ, SETTLE)
    clocks, _ = settle_run(state, [(0.0, 1395), (1.0, 1395), (1.1, 1000), (1.12, 1395), (1.16, 1000)])
    assert clocks == [1410] * 5


def test_the_last_switch_of_the_budget_goes_to_max_clock():
    state = guard.initial_state(MAX_MHZ, SETTLE)  # budget 4 per second
    steps = [(0.0, 1000), (0.05, 1000), (0.06, 1100), (0.07, 900), (0.125, 900), (0.13, 1000), (0.2, 900)]
    clocks, state = settle_run(state, steps)
    # switches: 1000 @0.05, 1100 @0.06, 900 @0.125, then the 4th (a raise) must be max clock;
    # lowering is frozen until the window frees a slot.
    assert clocks == [1410, 1000, 1100, 1100, 900, 1410, 1410]
    clocks, _ = settle_run(state, [(1.04, 900), (1.05, 900), (1.06, 900)])
    # A lowering needs two free slots (one stays for a raise): 0.05 and 0.06 leave the window at
    # 1.05 and 1.06; the dwell has run since 0.2.
    assert clocks == [1410, 1410, 900]


def test_boost_overrides_every_proposal():
    state = guard.initial_state(MAX_MHZ, SETTLE)
    clocks, state = settle_run(state, [(0.0, 900), (0.1, 900)])
    assert clocks == [1410, 900]
    state = guard.transition(state, SlackObserved(0.11, 0.0))
    clocks, state = settle_run(state, [(0.11, 900), (0.2, 600)])
    assert clocks == [1410, 1410]
    assert guard.summary(state)["mode"] == "boost"


def test_time_cannot_run_backwards():
    state = guard.initial_state(MAX_MHZ, SETTLE)
    _, state = settle_run(state, [(1.0, 900), (1.1, 900)])
    with pytest.raises(ValueError, match="backwards"):
        guard.settle_clock(state, 900, 1.0)


settle_steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=80),  # ms since the previous step
        st.sampled_from((*GRID[::5], MAX_MHZ + 90, 1395, 1380)),  # includes over-max and sub-step
        st.sampled_from((None, None, None, 1.0, 0.05)),  # slack observation before settling
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(steps=settle_steps)
def test_settle_clock_keeps_its_promises(steps):
    cfg = SETTLE
    state = guard.initial_state(MAX_MHZ, cfg)
    times, proposals, clocks, modes = [], [], [], []
    now_ms = 0
    for dt_ms, proposal, slack in steps:
        now_ms += dt_ms
        now = now_ms / 1000
        if slack is not None:
            state = guard.transition(state, SlackObserved(now, slack))
        clock, state = guard.settle_clock(state, proposal, now)
        times.append(now)
        proposals.append(min(proposal, MAX_MHZ))
        clocks.append(clock)
        modes.append(state.boost.mode)

    previous = MAX_MHZ
    switch_times = []
    for i, (now, proposal, clock, mode) in enumerate(zip(times, proposals, clocks, modes, strict=True)):
        assert clock >= proposal  # SLO first: never below what the controller asked for
        assert clock == MAX_MHZ or clock in proposals[: i + 1]
        if mode is GuardMode.BOOST:
            assert clock == MAX_MHZ
        if clock != previous:
            switch_times.append(now)
        if clock < previous:
            assert previous - clock >= cfg.step_mhz
            start = i
            while start > 0 and proposals[start - 1] <= clock:
                start -= 1
            assert now - times[start] >= cfg.dwell_s, "lowered before the dwell"
        previous = clock

    for i, t in enumerate(switch_times):
        in_window = [u for u in switch_times[i:] if u - t < 1.0]
        assert len(in_window) <= cfg.max_switches_per_s


def test_summary_reports_bands_and_mode():
    state = observe_all(guard.initial_state(MAX_MHZ), [(1050, 0.02, 0.024)] * 20 + [(1410, 0.02, 0.02)])
    s = guard.summary(state)
    assert s["mode"] == "steady" and s["clock_mhz"] == MAX_MHZ and s["samples"] == 21
    assert s["bands"][1000] == {"samples": 20, "correction": pytest.approx(1.2)}
    assert s["bands"][1400]["samples"] == 1
    assert s["ratio_max"] == pytest.approx(1.2)


def test_config_is_validated():
    with pytest.raises(ValueError, match="quantile"):
        GuardConfig(quantile=1.5)
    with pytest.raises(ValueError, match="max_switches_per_s"):
        GuardConfig(max_switches_per_s=1)
    with pytest.raises(ValueError, match="boost_exit_factor"):
        GuardConfig(boost_exit_factor=0.5)
