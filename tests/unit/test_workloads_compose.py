"""Composed workloads reshape arrivals and never invent lengths; bad specs are one clear error."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.workloads.compose import WorkloadSpecError, bursts, mixed, regapped, shifted, workload_from_spec
from agent.workloads.workload import Workload


def spec(text: str, seed: int = 0) -> Workload:
    return workload_from_spec(text, seed=seed, synthetic_duration_s=600.0)


def lengths(workload: Workload) -> Counter:
    return Counter(zip(workload.prompt_tokens.tolist(), workload.output_tokens.tolist(), strict=True))


def distinct_arrivals(n: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload.from_arrivals(
        "w", np.cumsum(rng.uniform(0.01, 1.0, n)), rng.integers(1, 4000, n), rng.integers(1, 900, n)
    )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), size=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_bursts_keep_every_request_and_put_at_most_k_at_one_time(n, size, seed):
    original = distinct_arrivals(n, seed)
    burst = bursts(original, size, np.random.default_rng(seed))
    assert lengths(burst) == lengths(original) and burst.duration_s == original.duration_s
    _, together = np.unique(burst.arrival_s, return_counts=True)
    assert together.max() <= size
    assert np.all(burst.arrival_s <= original.arrival_s)  # a request joins the group before it, never later


def test_bursts_reach_their_size_and_one_is_the_identity():
    original = distinct_arrivals(2000, 1)
    _, together = np.unique(bursts(original, 9, np.random.default_rng(0)).arrival_s, return_counts=True)
    assert together.max() == 9
    assert np.array_equal(bursts(original, 1, np.random.default_rng(0)).arrival_s, original.arrival_s)


def test_gamma_gaps_have_the_cv_and_the_rate_asked_for():
    original = distinct_arrivals(20000, 2)
    burstier = regapped(original, 4.0, np.random.default_rng(3))
    gaps = np.diff(burstier.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(4.0, rel=0.15)
    assert burstier.mean_rate_rps == pytest.approx(original.mean_rate_rps, rel=0.1)
    assert burstier.prompt_tokens.tolist() == original.prompt_tokens.tolist()  # same requests, same order


def test_mix_puts_every_tenant_on_one_timeline():
    conv, code = spec("azure-conv"), spec("azure-code")
    both = spec("mix(azure-conv,azure-code)")
    assert len(both) == len(conv) + len(code)
    assert lengths(both) == lengths(conv) + lengths(code)
    assert both.duration_s == max(conv.duration_s, code.duration_s)


def test_shift_doubles_the_rate_within_the_same_period():
    conv = spec("azure-conv")
    twice = spec("shift(azure-conv,300)")
    assert len(twice) == 2 * len(conv) and twice.duration_s == conv.duration_s
    assert lengths(twice) == lengths(conv) + lengths(conv)
    w = distinct_arrivals(100, 4)
    w = Workload("w", w.arrival_s, w.prompt_tokens, w.output_tokens, w.duration_s + 1.0)
    assert np.array_equal(shifted(w, 0.0).arrival_s, np.repeat(w.arrival_s, 2))  # no shift: each twice
    late = shifted(w, 0.5).arrival_s
    assert late.min() >= 0 and late.max() <= w.duration_s
    assert late[0] == 0.0 and np.isclose(late, 0.5).sum() == 1  # the first request, and its copy 0.5 s on


def test_specs_nest_and_a_seed_is_one_workload():
    nested = "burst(gamma(azure-code,4),9)"
    assert np.array_equal(spec(nested, 5).arrival_s, spec(nested, 5).arrival_s)
    assert not np.array_equal(spec(nested, 5).arrival_s, spec(nested, 6).arrival_s)
    assert lengths(spec(nested)) == lengths(spec("azure-code"))
    assert len(spec("mix(synthetic:poisson:2,azure-conv)")) > len(spec("azure-conv"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bursty(azure-conv,9)", "unknown workload function 'bursty'"),
        ("burst(azure-conv)", "burst() takes 2 arguments, got 1"),
        ("burst(azure-conv,0)", "K must be > 0"),
        ("burst(azure-conv,2.5)", "K must be an integer"),
        ("gamma(azure-conv,-1)", "CV must be > 0"),
        ("gamma(azure-conv,nan)", "CV must be > 0"),
        ("shift(azure-conv,x)", "S must be a number"),
        ("mix(azure-conv)", "mix() takes two workloads or more"),
        ("mix(azure-conv,)", "an empty argument"),
        ("burst(gamma(azure-conv,4,9)", "unbalanced parentheses"),
    ],
)
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(WorkloadSpecError) as caught:
        spec(text)
    assert message in str(caught.value)


def test_mixed_keeps_arrivals_sorted_when_tenants_interleave():
    a, b = distinct_arrivals(50, 7), distinct_arrivals(70, 8)
    both = mixed([a, b])
    assert np.all(np.diff(both.arrival_s) >= 0) and len(both) == 120
