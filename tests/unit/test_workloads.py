import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.domain import Request
from agent.workloads import Workload


def sample(duration_s: float = 10.0) -> Workload:
    return Workload(
        name="w",
        arrival_s=np.array([0.0, 1.0, 2.5, 3.0, 10.0]),
        prompt_tokens=np.array([10, 11, 12, 13, 14]),
        output_tokens=np.array([5, 50, 500, 7, 70]),
        duration_s=duration_s,
    )


def test_columns_are_read_only_copies() -> None:
    arrival = np.array([0.0, 1.0])
    workload = Workload("w", arrival, np.array([1, 2]), np.array([3, 4]), 1.0)
    arrival[0] = 0.5
    assert workload.arrival_s[0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        workload.prompt_tokens[0] = 9
    assert (workload.arrival_s.dtype, workload.prompt_tokens.dtype) == (np.float64, np.int64)


@pytest.mark.parametrize(
    ("arrival", "prompt", "output", "duration", "complaint"),
    [
        ([0.0, 2.0, 1.0], [1, 1, 1], [1, 1, 1], 3.0, "sorted"),
        ([0.0, np.nan], [1, 1], [1, 1], 3.0, "finite"),
        ([-1.0, 1.0], [1, 1], [1, 1], 3.0, r"\[0, duration_s"),
        ([0.0, 4.0], [1, 1], [1, 1], 3.0, r"\[0, duration_s"),
        ([0.0, 1.0], [1, 0], [1, 1], 3.0, ">= 1 token"),
        ([0.0, 1.0], [1, 1], [0, 1], 3.0, ">= 1 token"),
        ([0.0, 1.0], [1], [1, 1], 3.0, "lengths differ"),
        ([0.0], [1], [1], float("inf"), "duration_s must be finite"),
    ],
)
def test_rejects_inconsistent_columns(
    arrival: list[float], prompt: list[int], output: list[int], duration: float, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        Workload("w", np.array(arrival), np.array(prompt), np.array(output), duration)


def test_from_arrivals_sorts_stably_and_starts_at_zero() -> None:
    workload = Workload.from_arrivals(
        "w", np.array([105.0, 100.0, 105.0, 101.0]), np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])
    )
    assert workload.arrival_s.tolist() == [0.0, 1.0, 5.0, 5.0]
    assert workload.prompt_tokens.tolist() == [2, 4, 1, 3]
    assert workload.output_tokens.tolist() == [6, 8, 5, 7]
    assert workload.duration_s == 5.0


def test_from_arrivals_keeps_the_file_order_of_ties_in_long_columns() -> None:
    arrival = np.repeat([3.0, 1.0, 2.0], 50)
    workload = Workload.from_arrivals("w", arrival, np.arange(1, 151), np.ones(150, np.int64))
    assert workload.prompt_tokens.tolist() == [*range(51, 101), *range(101, 151), *range(1, 51)]


def test_window_keeps_the_window_start_as_time_zero() -> None:
    window = sample().window(1.0, 2.0)
    assert window.arrival_s.tolist() == [0.0, 1.5]  # 3.0 is the window's end: excluded
    assert window.prompt_tokens.tolist() == [11, 12]
    assert window.output_tokens.tolist() == [50, 500]
    assert window.duration_s == 2.0
    assert window.mean_rate_rps == 1.0
    assert window.name == "w[1s+2s]"


def test_window_starting_between_requests_is_not_rebased_to_its_first_request() -> None:
    window = sample().window(0.5, 3.0)
    assert window.arrival_s.tolist() == [0.5, 2.0, 2.5]


def test_window_past_the_end_is_cut_at_the_end() -> None:
    window = sample().window(8.0, 5.0)
    assert window.arrival_s.tolist() == [2.0]
    assert window.duration_s == 2.0


def test_empty_window_has_no_statistics() -> None:
    window = sample().window(4.0, 1.0)
    assert len(window) == 0
    stats = window.describe()
    assert stats["count"] == 0
    assert stats["mean_rate_rps"] == 0.0
    assert stats["prompt_p50"] is None
    assert stats["interarrival_cv"] is None
    assert window.requests() == []


@pytest.mark.parametrize(("start", "duration"), [(-1.0, 1.0), (10.5, 1.0), (0.0, 0.0), (0.0, -2.0)])
def test_window_rejects_bad_bounds(start: float, duration: float) -> None:
    with pytest.raises(ValueError, match="window"):
        sample().window(start, duration)


@given(
    start=st.floats(0, 10),
    duration=st.floats(0.01, 20),
)
def test_window_partitions_the_workload(start: float, duration: float) -> None:
    workload = sample()
    window = workload.window(start, duration)
    inside = (workload.arrival_s >= start) & (workload.arrival_s < start + duration)
    assert len(window) == int(inside.sum())
    np.testing.assert_allclose(window.arrival_s, workload.arrival_s[inside] - start)
    assert window.prompt_tokens.tolist() == workload.prompt_tokens[inside].tolist()
    assert window.duration_s == pytest.approx(min(duration, 10 - start))


def test_scale_rate_compresses_time() -> None:
    workload = sample()
    faster = workload.scale_rate(2.0)
    assert faster.arrival_s.tolist() == [0.0, 0.5, 1.25, 1.5, 5.0]
    assert faster.duration_s == 5.0
    assert faster.mean_rate_rps == pytest.approx(2 * workload.mean_rate_rps)
    assert faster.prompt_tokens.tolist() == workload.prompt_tokens.tolist()
    assert faster.name == "wx2"
    assert workload.scale_rate(0.5).arrival_s[-1] == 20.0


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_rate_rejects_non_positive_factors(factor: float) -> None:
    with pytest.raises(ValueError, match="rate factor"):
        sample().scale_rate(factor)


def test_requests_replay_the_true_output_length_by_default() -> None:
    requests = sample().requests()
    assert requests[2] == Request(
        request_id=2, arrival_s=2.5, prompt_tokens=12, max_tokens=500, output_tokens=500
    )
    assert [r.request_id for r in requests] == [0, 1, 2, 3, 4]
    assert all(r.max_tokens == r.output_tokens for r in requests)
    assert type(requests[0].prompt_tokens) is int
    assert type(requests[0].arrival_s) is float


def test_requests_with_a_cap_never_generate_past_it() -> None:
    requests = sample().requests(max_tokens=60)
    assert [r.max_tokens for r in requests] == [60] * 5
    assert [r.output_tokens for r in requests] == [5, 50, 60, 7, 60]
    assert type(requests[0].max_tokens) is int


def test_requests_reject_a_zero_cap() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        sample().requests(max_tokens=0)


def test_describe() -> None:
    stats = sample().describe()
    assert stats == {
        "name": "w",
        "count": 5,
        "duration_s": 10.0,
        "mean_rate_rps": 0.5,
        "interarrival_cv": pytest.approx(np.std([1, 1.5, 0.5, 7]) / 2.5),
        "prompt_p50": 12.0,
        "prompt_p99": pytest.approx(13.96),
        "output_p50": 50.0,
        "output_p99": pytest.approx(482.8),
    }
