"""The sidecar benchmark's arithmetic: client figures, gateway-minus-direct, targets."""

import math

import pytest

from agent.bench.sidecar import added, client_figures, verdicts
from agent.workloads.loadgen import LoadReport, RequestResult


def result(request_id: int, times: tuple[float, ...], lag_s: float, answered: bool = True) -> RequestResult:
    return RequestResult(
        request_id,
        200 if answered else 0,
        times[0] if answered else math.nan,
        times[-1],
        len(times) if answered else 0,
        0,
        None if answered else "refused",
        times,
        tuple(lag_s for _ in times),
    )


def test_figures_are_per_token_and_skip_failed_requests():
    report = LoadReport(
        (result(0, (0.1, 0.2, 0.4), 0.002), result(1, (0.3, 0.31), 0.004), result(2, (1.0,), 9, False)), 1.0
    )
    figures = client_figures(report)
    assert (figures["requests"], figures["answered"], figures["tokens"], figures["lag_samples"]) == (
        3,
        2,
        5,
        5,
    )
    assert figures["gap_p50_ms"] == pytest.approx(100.0)  # gaps 100, 200 and 10 ms
    assert figures["token_lag_p50_ms"] == pytest.approx(2.0) and figures["token_lag_p99_ms"] == pytest.approx(
        4.0
    )
    assert figures["ttft_p50_ms"] == pytest.approx(200.0)


def test_added_is_gateway_minus_direct_and_targets_say_whether_they_are_met():
    direct = {
        "ttft_p50_ms": 100.0,
        "ttft_p99_ms": 900.0,
        "gap_p50_ms": 15.0,
        "gap_p99_ms": None,
        "token_lag_p50_ms": 1.0,
        "token_lag_p99_ms": 3.0,
        "request_lag_p50_ms": 0.5,
        "request_lag_p99_ms": 2.0,
    }
    gateway = {**direct, "ttft_p50_ms": 104.0, "gap_p99_ms": 50.0, "token_lag_p99_ms": 3.5}
    difference = added(direct, gateway)
    assert difference["ttft_p50_ms"] == pytest.approx(4.0) and difference["gap_p99_ms"] is None
    assert difference["token_lag_p99_ms"] == pytest.approx(0.5) and difference["request_lag_p99_ms"] == 0.0
    rows = verdicts({"added": difference}, {"cpu_pct_of_core_mean": 12.0, "rss_mb_max": None})
    assert rows["gateway_added_token_p99_ms"] == {
        "target_max": 1.0,
        "measured": pytest.approx(0.5),
        "met": True,
    }
    assert rows["sidecar_cpu_pct_of_core"]["met"] is False and rows["sidecar_rss_mb"]["met"] is None
