import math
from collections.abc import Callable

import numpy as np
import pytest

from agent.workloads import GammaArrivals, LogNormalLengths, PoissonArrivals, synthetic_workload

PROMPTS = LogNormalLengths(median=1000, sigma=1.0, max_tokens=8192)
OUTPUTS = LogNormalLengths(median=128, sigma=0.8, max_tokens=1024)


def interarrival_cv(arrival_s: np.ndarray) -> float:
    gaps = np.diff(arrival_s)
    return float(gaps.std() / gaps.mean())


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    def make(seed: int) -> tuple[list[float], list[int], list[int]]:
        w = synthetic_workload(GammaArrivals(5.0, 2.0), PROMPTS, OUTPUTS, seed=seed, n_requests=500)
        return w.arrival_s.tolist(), w.prompt_tokens.tolist(), w.output_tokens.tolist()

    assert make(7) == make(7)
    other = make(8)
    assert all(a != b for a, b in zip(make(7), other, strict=True))


def test_lengths_do_not_depend_on_the_arrival_process() -> None:
    poisson = synthetic_workload(PoissonArrivals(1.0), PROMPTS, OUTPUTS, seed=3, n_requests=300)
    bursty = synthetic_workload(GammaArrivals(9.0, 4.0), PROMPTS, OUTPUTS, seed=3, n_requests=300)
    assert poisson.prompt_tokens.tolist() == bursty.prompt_tokens.tolist()
    assert poisson.output_tokens.tolist() == bursty.output_tokens.tolist()
    assert poisson.arrival_s.tolist() != bursty.arrival_s.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_rate_over_a_long_run(seed: int) -> None:
    # ~100k arrivals: the count's relative standard deviation is 0.3%, the tolerance 3%.
    workload = synthetic_workload(PoissonArrivals(50.0), PROMPTS, OUTPUTS, seed=seed, duration_s=2_000)
    assert workload.duration_s == 2_000
    assert workload.arrival_s[-1] < 2_000
    assert workload.mean_rate_rps == pytest.approx(50.0, rel=0.03)
    assert interarrival_cv(workload.arrival_s) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize(("cv", "seed"), [(0.5, 0), (1.0, 1), (3.0, 2), (3.0, 3)])
def test_gamma_rate_and_cv(cv: float, seed: int) -> None:
    # 200k gaps: the sample CV's relative standard deviation is at most ~1.5% here, the tolerance 10%.
    workload = synthetic_workload(GammaArrivals(20.0, cv), PROMPTS, OUTPUTS, seed=seed, n_requests=200_000)
    assert len(workload) == 200_000
    assert workload.duration_s == workload.arrival_s[-1]
    assert workload.mean_rate_rps == pytest.approx(20.0, rel=0.05)
    assert interarrival_cv(workload.arrival_s) == pytest.approx(cv, rel=0.10)


def test_lognormal_median_sigma_and_clipping() -> None:
    lengths = LogNormalLengths(median=500, sigma=0.5, max_tokens=100_000)
    drawn = lengths.sample(100_000, np.random.default_rng(0))
    assert drawn.dtype == np.int64
    assert np.median(drawn) == pytest.approx(500, rel=0.03)
    assert np.log(drawn).std() == pytest.approx(0.5, rel=0.03)

    clipped = LogNormalLengths(median=2, sigma=3.0, max_tokens=64).sample(20_000, np.random.default_rng(1))
    assert (clipped.min(), clipped.max()) == (1, 64)
    assert 0.1 < (clipped == 64).mean() < 0.5  # a real share sits on the cap: values are clipped, not redrawn


def test_duration_mode_can_be_empty_and_count_mode_can_be_zero() -> None:
    sparse = synthetic_workload(PoissonArrivals(1e-6), PROMPTS, OUTPUTS, seed=0, duration_s=1.0)
    assert (len(sparse), sparse.duration_s) == (0, 1.0)
    none = synthetic_workload(PoissonArrivals(1.0), PROMPTS, OUTPUTS, seed=0, n_requests=0)
    assert (len(none), none.duration_s) == (0, 0.0)


@pytest.mark.parametrize(
    ("n_requests", "duration_s", "complaint"),
    [
        (None, None, "exactly one"),
        (10, 5.0, "exactly one"),
        (-1, None, "n_requests"),
        (None, 0.0, "duration_s"),
    ],
)
def test_size_arguments(n_requests: int | None, duration_s: float | None, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        synthetic_workload(
            PoissonArrivals(1.0), PROMPTS, OUTPUTS, seed=0, n_requests=n_requests, duration_s=duration_s
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoissonArrivals(0.0),
        lambda: PoissonArrivals(math.inf),
        lambda: GammaArrivals(1.0, 0.0),
        lambda: GammaArrivals(-1.0, 1.0),
        lambda: LogNormalLengths(0.0, 1.0, 10),
        lambda: LogNormalLengths(10.0, -1.0, 10),
        lambda: LogNormalLengths(10.0, 1.0, 0),
    ],
)
def test_rejects_invalid_parameters(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()
