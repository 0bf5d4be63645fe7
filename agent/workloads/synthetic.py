"""Synthetic workloads: renewal arrivals (Poisson or gamma) with log-normal prompt and output lengths.

Gamma inter-arrivals keep the mean rate while a coefficient of variation (CV) above 1 adds the
burstiness real traces show (the Azure code trace has CV ≈ 13; CV = 1 is as bursty as Poisson).
Log-normal lengths match the long right tail of real prompt and output lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.workloads.workload import Workload


@dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Exponential inter-arrivals: many independent clients, the textbook open-loop load."""

    rate_rps: float

    def __post_init__(self) -> None:
        _check_positive("rate_rps", self.rate_rps)

    def gaps_s(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` independent inter-arrival times."""
        return rng.exponential(1.0 / self.rate_rps, n)


@dataclass(frozen=True, slots=True)
class GammaArrivals:
    """Gamma inter-arrivals with mean 1/rate_rps and coefficient of variation `cv`."""

    rate_rps: float
    cv: float

    def __post_init__(self) -> None:
        _check_positive("rate_rps", self.rate_rps)
        _check_positive("cv", self.cv)

    def gaps_s(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` independent inter-arrival times (gamma shape 1/cv², scale cv²/rate)."""
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (shape * self.rate_rps), n)


ArrivalProcess = PoissonArrivals | GammaArrivals


@dataclass(frozen=True, slots=True)
class LogNormalLengths:
    """Token lengths with log-normal distribution (median, sigma of the log), rounded, clipped to [1, max]."""

    median: float
    sigma: float
    max_tokens: int

    def __post_init__(self) -> None:
        _check_positive("median", self.median)
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be finite and >= 0, got {self.sigma}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` independent lengths."""
        lengths = np.rint(rng.lognormal(math.log(self.median), self.sigma, n))
        return np.clip(lengths, 1, self.max_tokens).astype(np.int64)


def synthetic_workload(
    arrivals: ArrivalProcess,
    prompts: LogNormalLengths,
    outputs: LogNormalLengths,
    *,
    seed: int,
    n_requests: int | None = None,
    duration_s: float | None = None,
    name: str = "synthetic",
) -> Workload:
    """Generate `n_requests` requests, or every arrival in [0, duration_s): give exactly one.

    The same seed gives the same workload. Arrivals, prompts and outputs draw from independent
    streams of that seed, so changing the arrival process keeps the request lengths the same.
    """
    arrival_rng, prompt_rng, output_rng = np.random.default_rng(seed).spawn(3)
    if n_requests is not None and duration_s is None:
        if n_requests < 0:
            raise ValueError(f"n_requests must be >= 0, got {n_requests}")
        arrival_s = np.cumsum(arrivals.gaps_s(n_requests, arrival_rng))
        period_s = float(arrival_s[-1]) if n_requests else 0.0
    elif duration_s is not None and n_requests is None:
        _check_positive("duration_s", duration_s)
        arrival_s = _arrivals_before(arrivals, duration_s, arrival_rng)
        period_s = duration_s
    else:
        raise ValueError("give exactly one of n_requests and duration_s")
    n = len(arrival_s)
    return Workload(name, arrival_s, prompts.sample(n, prompt_rng), outputs.sample(n, output_rng), period_s)


def _arrivals_before(process: ArrivalProcess, end_s: float, rng: np.random.Generator) -> np.ndarray:
    """Every arrival of the process in [0, end_s), drawn in blocks of about the expected count."""
    block = math.ceil(process.rate_rps * end_s * 1.1) + 16
    blocks: list[np.ndarray] = []
    last_s = 0.0
    while last_s < end_s:
        times = last_s + np.cumsum(process.gaps_s(block, rng))
        blocks.append(times)
        last_s = float(times[-1])
    arrival_s = np.concatenate(blocks)
    return arrival_s[arrival_s < end_s]


def _check_positive(name: str, value: float) -> None:
    """Reject zero, negative, infinite and NaN parameters with a message naming them."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


# Log-normal fits to the Azure 2023 conv trace (p50 and p90 of ContextTokens / GeneratedTokens):
# prompt p50 1020, p90 2735 -> sigma 0.77; output p50 129, p90 424 -> sigma 0.93.
CONV_LIKE_PROMPTS = LogNormalLengths(median=1020, sigma=0.77, max_tokens=8192)
CONV_LIKE_OUTPUTS = LogNormalLengths(median=129, sigma=0.93, max_tokens=2048)
SYNTHETIC_SPEC_HELP = "synthetic:poisson:<rate rps> or synthetic:gamma:<rate rps>:<cv>"


def synthetic_from_spec(spec: str, *, seed: int, duration_s: float) -> Workload:
    """Build a conv-like synthetic workload from its command-line spelling (SYNTHETIC_SPEC_HELP)."""
    kind, *numbers = spec.removeprefix("synthetic:").split(":")
    try:
        values = [float(x) for x in numbers]
    except ValueError:
        raise ValueError(f"bad synthetic workload {spec!r}: expected {SYNTHETIC_SPEC_HELP}") from None
    arrivals: ArrivalProcess
    if kind == "poisson" and len(values) == 1:
        arrivals = PoissonArrivals(values[0])
    elif kind == "gamma" and len(values) == 2:
        arrivals = GammaArrivals(values[0], values[1])
    else:
        raise ValueError(f"bad synthetic workload {spec!r}: expected {SYNTHETIC_SPEC_HELP}")
    return synthetic_workload(
        arrivals, CONV_LIKE_PROMPTS, CONV_LIKE_OUTPUTS, seed=seed, duration_s=duration_s, name=spec
    )
