"""What a simulation produced, and the summary figures `simulate --json` prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.domain import Slo
from agent.slo_presets import SloPreset, meets_slo
from agent.twin.engine import IterationOutcome


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    """The q-th percentile (0..100) of `values` repeated `weights` times; None when empty."""
    mask = weights > 0
    if not mask.any():
        return None
    order = np.argsort(values[mask])
    v, w = values[mask][order], weights[mask][order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, q / 100.0 * cum[-1], side="left")])


def _percentile(values: list[float], q: float) -> float | None:
    finite = np.asarray(values, dtype=float)
    finite = finite[~np.isnan(finite)]
    return float(np.percentile(finite, q)) if len(finite) else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


_RECORDS = (  # the per-iteration and per-request lists of a SimulationResult
    "iteration_end_s",
    "iteration_s",
    "decode_tokens",
    "clock_mhz",
    "power_w",
    "batch_size",
    "extra_gaps_s",
    "ttft_s",
    "e2e_s",
    "tpot_s",
    "output_tokens",
    "finished_ids",
)


@dataclass(slots=True)
class SimulationResult:
    """Per-iteration and per-request records of one run, summarised on demand."""

    policy: str
    requests: int
    gpus: int = 1  # GPUs the energy counts: every GPU of the engine (its TP degree)
    truncated: int = 0
    rejected: int = 0
    iteration_end_s: list[float] = field(default_factory=list)
    iteration_s: list[float] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    clock_mhz: list[int] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    extra_gaps_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)  # NaN for 1-token outputs (no TPOT)
    output_tokens: list[int] = field(default_factory=list)
    finished_ids: list[int] = field(default_factory=list)  # request ids, in the order they finished
    tokens_out: int = 0
    sim_seconds: float = 0.0
    energy_j: float = 0.0
    clock_changes: int = 0
    preemptions: int = 0
    wall_seconds: float = 0.0

    def record_iteration(self, outcome: IterationOutcome, clock_mhz: int, power_w: float) -> None:
        """Keep what the summary and plots need from one iteration."""
        self.iteration_end_s.append(outcome.end_s)
        self.iteration_s.append(outcome.end_s - outcome.start_s)
        self.decode_tokens.append(outcome.decode_tokens)
        self.clock_mhz.append(clock_mhz)
        self.power_w.append(power_w)
        self.batch_size.append(outcome.decode_requests + outcome.context_requests)
        self.tokens_out += outcome.decode_tokens + len(outcome.first_token_ids) + len(outcome.resumed_gaps_s)
        self.extra_gaps_s.extend(outcome.resumed_gaps_s)
        for done in outcome.finished:
            arrival = done.request.arrival_s
            self.ttft_s.append(done.first_token_s - arrival)
            self.e2e_s.append(done.finish_s - arrival)
            self.output_tokens.append(done.output_tokens)
            self.finished_ids.append(done.request.request_id)
            self.tpot_s.append(
                (done.finish_s - done.first_token_s) / (done.output_tokens - 1)
                if done.output_tokens > 1
                else float("nan")
            )

    @classmethod
    def merged(cls, policy: str, requests: int, parts: Sequence[SimulationResult]) -> SimulationResult:
        """One result of the records of several engines (run totals are set by `finish`)."""
        merged = cls(policy=policy, requests=requests)
        for part in parts:
            for name in _RECORDS:
                getattr(merged, name).extend(getattr(part, name))
            merged.rejected += part.rejected
            merged.tokens_out += part.tokens_out
        return merged

    def finish(self, **totals: float) -> None:
        """Set the run totals once the loop has ended."""
        for key, value in totals.items():
            setattr(self, key, value)

    @property
    def completed(self) -> int:
        """Requests that produced all their tokens."""
        return len(self.e2e_s)

    def slo_attainment(self, target: SloPreset | Slo) -> float | None:
        """Share of requests meeting every target of `target`; rejected requests count as misses."""
        served = self.completed + self.rejected
        if served == 0:
            return None
        met = meets_slo(
            target,
            np.asarray(self.ttft_s),
            np.asarray(self.tpot_s),
            np.asarray(self.e2e_s),
            np.asarray(self.output_tokens),
        )
        return float(met.sum() / served)

    def tbt_percentile_s(self, q: float) -> float | None:
        """Percentile of the gap between consecutive tokens of a request, over all tokens."""
        values = np.concatenate([np.asarray(self.iteration_s), np.asarray(self.extra_gaps_s)])
        weights = np.concatenate(
            [np.asarray(self.decode_tokens, dtype=float), np.ones(len(self.extra_gaps_s))]
        )
        return weighted_percentile(values, weights, q)

    def mean_clock_mhz(self) -> float | None:
        """SM clock averaged over busy time (what the kernels ran at)."""
        if not self.iteration_s:
            return None
        return float(np.average(self.clock_mhz, weights=self.iteration_s))

    def summary(self) -> dict[str, Any]:
        """The figures `throttllem simulate --json` prints."""
        busy_s = float(np.sum(self.iteration_s))
        tbt50, tbt99 = self.tbt_percentile_s(50), self.tbt_percentile_s(99)
        return {
            "policy": self.policy,
            "requests": self.requests,
            "gpus": self.gpus,
            "completed": self.completed,
            "rejected": self.rejected,
            "truncated": self.truncated,
            "energy_j": self.energy_j,
            "tokens_out": self.tokens_out,
            "tokens_per_joule": self.tokens_out / self.energy_j if self.energy_j else None,
            "mean_power_w": self.energy_j / self.sim_seconds if self.sim_seconds else None,
            "mean_power_per_gpu_w": self.energy_j / self.sim_seconds / self.gpus
            if self.sim_seconds
            else None,
            "ttft_p50_s": _percentile(self.ttft_s, 50),
            "ttft_p99_s": _percentile(self.ttft_s, 99),
            "tbt_p50_ms": _ms(tbt50),
            "tbt_p99_ms": _ms(tbt99),
            "tpot_p50_ms": _ms(_percentile(self.tpot_s, 50)),
            "tpot_p99_ms": _ms(_percentile(self.tpot_s, 99)),
            "e2e_p50_s": _percentile(self.e2e_s, 50),
            "e2e_p99_s": _percentile(self.e2e_s, 99),
            "mean_clock_mhz": self.mean_clock_mhz(),
            "clock_changes": self.clock_changes,
            "preemptions": self.preemptions,
            "iterations": len(self.iteration_s),
            "busy_fraction": busy_s / self.sim_seconds if self.sim_seconds else None,
            "sim_seconds": self.sim_seconds,
            "wall_seconds": self.wall_seconds,
            "speedup_vs_real_time": self.sim_seconds / self.wall_seconds if self.wall_seconds else None,
        }
