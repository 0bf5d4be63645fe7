"""Engine sizing: smallest sufficient size, shadow start → switch, no scale-down within the grace."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control import scaling
from agent.control.scaling import (
    LoadObserved,
    ScalingAction,
    ScalingConfig,
    ScalingMode,
    ShadowReady,
)

CFG = ScalingConfig(capacities_rps=((4, 12.0), (1, 3.0), (2, 6.5)), headroom=0.8, grace_s=60.0)


def brute_target(cfg, rps):
    sufficient = [size for size, cap in cfg.capacities_rps if cap * cfg.headroom >= rps]
    return min(sufficient) if sufficient else max(size for size, _ in cfg.capacities_rps)


def run(state, events):
    decisions = []
    for event in events:
        state, decision = scaling.transition(state, event)
        decisions.append(decision)
    return state, decisions


def test_sizes_are_sorted_and_validated():
    assert CFG.capacities_rps == ((1, 3.0), (2, 6.5), (4, 12.0))
    assert CFG.capacity_rps(2) == 6.5
    with pytest.raises(ValueError, match="twice"):
        ScalingConfig(capacities_rps=((1, 3.0), (1, 4.0)))
    with pytest.raises(ValueError, match="positive"):
        ScalingConfig(capacities_rps=((1, 0.0),))
    with pytest.raises(ValueError, match="headroom"):
        ScalingConfig(capacities_rps=((1, 3.0),), headroom=1.5)
    with pytest.raises(ValueError, match="unknown engine size tp8"):
        scaling.initial_state(CFG, 8, 0.0)


def test_target_is_the_smallest_size_with_headroom():
    assert scaling.target_size(CFG, 0.0) == 1
    assert scaling.target_size(CFG, 2.4) == 1  # 0.8 × 3.0
    assert scaling.target_size(CFG, 2.41) == 2
    assert scaling.target_size(CFG, 9.6) == 4
    assert scaling.target_size(CFG, 50.0) == 4  # nothing suffices: the largest


@given(
    capacities=st.dictionaries(
        st.sampled_from((1, 2, 4, 8)), st.floats(min_value=0.1, max_value=100.0), min_size=1
    ),
    headroom=st.floats(min_value=0.1, max_value=1.0),
    rps=st.floats(min_value=0.0, max_value=200.0),
)
def test_target_matches_brute_force(capacities, headroom, rps):
    cfg = ScalingConfig(capacities_rps=tuple(capacities.items()), headroom=headroom)
    assert scaling.target_size(cfg, rps) == brute_target(cfg, rps)


def test_scale_up_starts_a_shadow_at_once_and_switches_when_it_is_ready():
    state = scaling.initial_state(CFG, 1, 0.0)
    state, decision = scaling.transition(state, LoadObserved(10.0, 5.0))  # within the grace: fine
    assert (decision.action, decision.size) == (ScalingAction.START_SHADOW, 2)
    assert "5.00 rps is above 0.8 × 3 rps of tp1" in decision.reason
    assert (state.mode, state.size, state.shadow_size) == (ScalingMode.STARTING, 1, 2)

    state, decision = scaling.transition(state, LoadObserved(20.0, 1.0))  # spike over: still switch
    assert decision.action is ScalingAction.KEEP and state.mode is ScalingMode.STARTING
    state, decision = scaling.transition(state, ShadowReady(25.0, 4))  # not the shadow we started
    assert decision.action is ScalingAction.KEEP and "ignored" in decision.reason
    state, decision = scaling.transition(state, ShadowReady(26.0, 2))
    assert (decision.action, decision.size) == (ScalingAction.SWITCH_TO, 2)
    assert (state.mode, state.size, state.last_switch_s, state.shadow_size) == (
        ScalingMode.SERVING,
        2,
        26.0,
        None,
    )


def test_scale_down_waits_for_the_grace_and_a_whole_window_of_low_load():
    state = scaling.initial_state(CFG, 4, 0.0)
    ticks = [LoadObserved(t, 1.0) for t in range(10, 80, 10)]  # tp1 suffices from t = 10
    state, decisions = run(state, ticks)
    assert [d.action for d in decisions] == [ScalingAction.KEEP] * 6 + [ScalingAction.START_SHADOW]
    assert decisions[-1].size == 1 and ticks[-1].now_s == 70
    state, decision = scaling.transition(state, ShadowReady(95.0, 1))
    assert (decision.action, state.size) == (ScalingAction.SWITCH_TO, 1)


def test_scale_down_goes_to_the_size_that_sufficed_throughout():
    state = scaling.initial_state(CFG, 4, 0.0)
    loads = [1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # tp2 needed once, at t = 10
    _, decisions = run(state, [LoadObserved(t, r) for t, r in zip(range(0, 70, 10), loads, strict=True)])
    assert (decisions[-1].action, decisions[-1].size) == (ScalingAction.START_SHADOW, 2)


def test_one_busy_tick_restarts_the_grace_window():
    state = scaling.initial_state(CFG, 2, 0.0)
    loads = [1.0] * 5 + [5.0] + [1.0] * 6
    _, decisions = run(state, [LoadObserved(10.0 * (i + 1), r) for i, r in enumerate(loads)])
    assert all(d.action is ScalingAction.KEEP for d in decisions)


def test_a_scale_down_shadow_is_abandoned_when_load_returns():
    state = scaling.initial_state(CFG, 4, 0.0)
    state, decisions = run(state, [LoadObserved(t, 1.0) for t in range(0, 70, 10)])
    assert decisions[-1].action is ScalingAction.START_SHADOW
    state, decision = scaling.transition(state, LoadObserved(70.0, 4.0))
    assert (decision.action, decision.size) == (ScalingAction.STOP, 1)
    assert (state.mode, state.size) == (ScalingMode.SERVING, 4)


def test_a_shadow_that_never_becomes_ready_is_stopped():
    state = scaling.initial_state(CFG, 1, 0.0)
    state, _ = scaling.transition(state, LoadObserved(0.0, 9.0))
    state, decision = scaling.transition(state, LoadObserved(110.0, 9.0))
    assert decision.action is ScalingAction.KEEP
    state, decision = scaling.transition(state, LoadObserved(120.0, 9.0))
    assert (decision.action, decision.size) == (ScalingAction.STOP, 4)
    _, decision = scaling.transition(state, LoadObserved(130.0, 9.0))
    assert (decision.action, decision.size) == (ScalingAction.START_SHADOW, 4)  # try again


def test_transition_refuses_foreign_events():
    with pytest.raises(TypeError, match="not a scaling event"):
        scaling.transition(scaling.initial_state(CFG, 1, 0.0), "tick")


events_strategy = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=30),  # seconds since the previous event
        st.floats(min_value=0.0, max_value=12.0),  # measured rps
        st.sampled_from(("tick", "tick", "tick", "ready", "stale")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events=events_strategy, start=st.sampled_from((1, 2, 4)))
def test_never_scales_down_within_the_grace_and_only_after_a_sufficient_window(events, start):
    cfg = CFG
    state = scaling.initial_state(cfg, start, 0.0)
    last_switch = 0.0
    ticks = []  # (time, brute-force target) of every load observation since the last switch
    shadow = None
    now = 0.0
    for dt, rps, kind in events:
        now += dt
        if kind == "tick":
            event = LoadObserved(now, rps)
            ticks.append((now, brute_target(cfg, rps)))
        else:
            size = shadow if kind == "ready" and shadow is not None else 8
            event = ShadowReady(now, size)
        serving = state.size
        state, decision = scaling.transition(state, event)

        match decision.action:
            case ScalingAction.START_SHADOW:
                assert shadow is None, "a second shadow"
                shadow = decision.size
                if shadow > serving:
                    assert shadow == brute_target(cfg, rps)
                else:
                    assert shadow < serving
                    assert now - last_switch >= cfg.grace_s
                    # A run of ticks, all content with `shadow`, began at least grace_s ago.
                    run_start = None
                    for t, target in reversed(ticks):
                        if target > shadow:
                            break
                        run_start = t
                    assert run_start is not None and now - run_start >= cfg.grace_s
            case ScalingAction.SWITCH_TO:
                assert decision.size == shadow and kind == "ready"
                if shadow < serving:
                    assert now - last_switch >= cfg.grace_s
                last_switch, shadow, ticks = now, None, []
            case ScalingAction.STOP:
                assert decision.size == shadow
                shadow = None
            case ScalingAction.KEEP:
                assert decision.size is None
        assert state.shadow_size == shadow
        assert state.mode is (ScalingMode.SERVING if shadow is None else ScalingMode.STARTING)
        assert state.last_switch_s == last_switch
