"""`bench sidecar`: what running the sidecar costs, measured on real processes on loopback.

(a) Gateway latency. Every request of a conv slice is sent twice at its arrival time: one copy
    straight to the twin, one through the gateway of a sidecar running the `max` policy (stock
    clocks, no admission holds), so both copies share the engine's iterations, the host's load
    and the client's event loop, and only the proxy differs. Each copy stream carries half the
    slice's load. On the client, per copy: TTFT, the gap between streamed tokens, and each
    token's delivery lag (the client's read time minus the engine's `last_token_time_ns`, both
    this host's wall clock). A constant per-token delay hardly moves the gaps, and the engine's
    own variability dominates TTFT, so the lag difference is the direct measure of what the
    gateway adds per token. On a busy host that includes waiting for a core; the sidecar's CPU
    time per relayed token is what it would add on an idle one. Per request, the request lag
    (client send to the engine's `arrival_time_ns`) is what the gateway adds before the engine
    sees a request. The TTFT difference overstates it: the gateway's copy reaches the engine
    second, so it sometimes misses the iteration the direct copy joins and waits a whole one.
(b) Footprint. A sidecar running the demo's configuration (policy throttllem, gateway on) serves
    the demo's load; psutil samples its pid. CPU is % of one core: the mean from CPU times over
    the run, and the p99 of the sampling intervals. RSS is the resident set, max over the run.
(c) Decision latency. The p99 estimated from the buckets of the sidecar's
    `throttllem_decision_seconds` histogram after (b) (an estimate: linear within the bucket that
    holds the rank, as Prometheus' histogram_quantile), and the in-process `bench decide` figure
    for reference.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from agent.bench.decide import benchmark_decide
from agent.bench.demo_plan import DemoConfig, capacity_rps, plan_workload, trace_slice
from agent.bench.live_run import DECISION_HISTOGRAM, warm_up
from agent.bench.processes import ProcessGroup, SidecarSpec, Twin, start_sidecar, start_twin
from agent.bench.scrape import get_page
from agent.control.policies import ThrottllemPolicy
from agent.domain import Request
from agent.policy_registry import build_policy
from agent.sim.policies import policy_context
from agent.slo_presets import SloPreset, control_targets
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace
from agent.workloads.loadgen import LoadReport, RequestResult, TokenRecording, generate_load

# What the sidecar may cost (the project's targets).
TARGET_ADDED_TOKEN_P99_MS = 1.0
TARGET_CPU_PCT_OF_CORE = 10.0
TARGET_RSS_MB = 200.0
MIB = 1024 * 1024
Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class SidecarBenchConfig:
    """What the benchmark replays, and where the process logs go."""

    setup: TwinSetup
    preset: SloPreset
    models_dir: Path
    log_dir: Path
    trace: str = "azure-conv"
    start_s: float = 600.0
    latency_requests: int = 300  # per pass: enough tokens for a stable p99 of the per-token figures
    latency_load: float = 0.3  # per copy stream, of the engine's capacity: 0.6 in all, busy, never saturated
    latency_max_tokens: int = 512  # caps the longest outputs, which only lengthen the pass
    footprint_duration_s: float = 60.0  # the demo's load, for as long as the demo runs it
    footprint_load: float = 0.5
    footprint_policy: str = "throttllem"
    sample_interval_s: float = 0.5
    idle_sample_s: float = 5.0  # how long the idle sidecar's CPU is measured before the latency pass
    decide_repeats: int = 200


def latency_slice(config: SidecarBenchConfig) -> list[Request]:
    """The first `latency_requests` requests from `start_s`, arriving at `latency_load` × capacity."""
    trace = load_trace(config.trace)
    cap = config.latency_max_tokens
    capacity = capacity_rps(config.setup, trace, config.start_s, cap)
    duration_s = config.latency_requests / (config.latency_load * capacity)
    return trace_slice(trace, config.start_s, config.latency_requests, duration_s, cap)[0]


def _pct_ms(values: np.ndarray, q: float) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q) * 1e3) if values.size else None


def client_figures(report: LoadReport) -> dict[str, Any]:
    """TTFT, token gaps and delivery lags one pass's clients saw (ms)."""
    answered = [r for r in report.results if r.answered]
    ttft = np.array([r.ttft_s for r in answered])
    gaps = report.token_gaps_s()
    lags = np.concatenate([np.asarray(r.token_lags_s) for r in answered]) if answered else np.empty(0)
    request_lags = np.array([r.request_lag_s for r in answered])
    return {
        "requests": len(report.results),
        "answered": len(answered),
        "tokens": int(sum(r.output_tokens for r in answered)),
        "ttft_p50_ms": _pct_ms(ttft, 50),
        "ttft_p99_ms": _pct_ms(ttft, 99),
        "gap_p50_ms": _pct_ms(gaps, 50),
        "gap_p99_ms": _pct_ms(gaps, 99),
        "token_lag_p50_ms": _pct_ms(lags, 50),
        "token_lag_p99_ms": _pct_ms(lags, 99),
        "lag_samples": int(lags.size),
        "request_lag_p50_ms": _pct_ms(request_lags, 50),
        "request_lag_p99_ms": _pct_ms(request_lags, 99),
    }


def added(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, float | None]:
    """Gateway minus direct, figure by figure."""
    keys = (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "gap_p50_ms",
        "gap_p99_ms",
        "token_lag_p50_ms",
        "token_lag_p99_ms",
        "request_lag_p50_ms",
        "request_lag_p99_ms",
    )
    return {
        key: None if direct[key] is None or gateway[key] is None else gateway[key] - direct[key]
        for key in keys
    }


class RequestProgress:
    """Requests done over every pass, as one progress fraction."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total = total
        self.done = 0
        self.progress = progress

    def __call__(self, _result: RequestResult) -> None:
        """Count one finished request."""
        self.done += 1
        self.progress(min(self.done / self.total, 1.0))


def cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds the process has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def gateway_latency(
    config: SidecarBenchConfig,
    group: ProcessGroup,
    twin: Twin,
    requests: Sequence[Request],
    count: RequestProgress,
) -> dict[str, Any]:
    """(a): every request twice at once, one copy straight to the twin, one through a `max` gateway.

    Also the sidecar's CPU time per relayed token: its CPU over the pass, less what it spends idle
    (polls, decisions) at the rate measured just before, over the tokens it relayed. Unlike the
    lag it does not depend on how busy the host is: it is what each token costs one core.
    """
    spec = SidecarSpec(policy="max", slo=config.preset.name, models_dir=config.models_dir, inherit_otel=False)
    sidecar = await start_sidecar(group, twin, config.setup, spec, name="sidecar-max")
    assert sidecar.gateway_url is not None
    process = psutil.Process(sidecar.child.pid)
    record = TokenRecording(times=True, lags=True)
    try:
        async with aiohttp.ClientSession() as session:
            await warm_up(session, sidecar)
        idle_cpu, idle_began = cpu_s(process), time.monotonic()
        await asyncio.sleep(config.idle_sample_s)
        idle_rate = (cpu_s(process) - idle_cpu) / (time.monotonic() - idle_began)
        busy_cpu, busy_began = cpu_s(process), time.monotonic()
        direct, through = await asyncio.gather(
            generate_load(twin.http_url, "ensemble", requests, on_result=count, record=record),
            generate_load(sidecar.gateway_url, "ensemble", requests, on_result=count, record=record),
        )
        busy_s = cpu_s(process) - busy_cpu - idle_rate * (time.monotonic() - busy_began)
    finally:
        await sidecar.child.stop()
    direct_figures, gateway_figures = client_figures(direct), client_figures(through)
    tokens = gateway_figures["tokens"]
    return {
        "requests": len(requests),
        "load": config.latency_load,
        "max_tokens": config.latency_max_tokens,
        "sidecar_policy": "max",
        "direct": direct_figures,
        "gateway": gateway_figures,
        "added": added(direct_figures, gateway_figures),
        "sidecar_idle_cpu_pct_of_core": 100.0 * idle_rate,
        "sidecar_cpu_ms_per_token": 1e3 * busy_s / tokens if tokens else None,
    }


@dataclass(slots=True)
class _Usage:
    """psutil samples of one process."""

    cpu_pct: list[float]
    rss_bytes: list[int]


async def _sample_usage(process: psutil.Process, usage: _Usage, interval_s: float) -> None:
    process.cpu_percent(None)  # the first call starts psutil's interval
    while True:
        await asyncio.sleep(interval_s)
        try:
            usage.cpu_pct.append(process.cpu_percent(None))
            usage.rss_bytes.append(process.memory_info().rss)
        except psutil.Error:
            return


def footprint_demo(config: SidecarBenchConfig) -> DemoConfig:
    """The demo whose load (b) replays."""
    return DemoConfig(
        setup=config.setup,
        preset=config.preset,
        out_dir=config.log_dir,
        models_dir=config.models_dir,
        policy=config.footprint_policy,
        start_s=config.start_s,
        duration_s=config.footprint_duration_s,
        load=config.footprint_load,
    )


async def sidecar_footprint(
    config: SidecarBenchConfig,
    group: ProcessGroup,
    twin: Twin,
    requests: Sequence[Request],
    count: RequestProgress,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(b) and the sidecar's side of (c): the demo's load through a throttllem sidecar."""
    spec = SidecarSpec(
        policy=config.footprint_policy,
        slo=config.preset.name,
        models_dir=config.models_dir,
        inherit_otel=False,
    )
    sidecar = await start_sidecar(group, twin, config.setup, spec, name="sidecar-footprint")
    assert sidecar.gateway_url is not None
    async with aiohttp.ClientSession() as session:
        await warm_up(session, sidecar)
    process = psutil.Process(sidecar.child.pid)
    usage = _Usage([], [])
    before, began = cpu_s(process), time.monotonic()
    sampler = asyncio.create_task(_sample_usage(process, usage, config.sample_interval_s))
    try:
        report = await generate_load(sidecar.gateway_url, "ensemble", requests, on_result=count)
        used_s, wall_s = cpu_s(process) - before, time.monotonic() - began
    finally:
        sampler.cancel()
        await asyncio.wait([sampler])
    async with aiohttp.ClientSession() as session:
        page = await get_page(session, sidecar.metrics_url)
    await sidecar.child.stop()
    summary = report.summary(config.preset)
    footprint = {
        "policy": config.footprint_policy,
        "requests": summary["requests"],
        "answered": summary["answered"],
        "slo_attainment": summary["slo_attainment"],
        "seconds": wall_s,
        "cpu_pct_of_core_mean": 100.0 * used_s / wall_s,
        "cpu_pct_of_core_p99": float(np.percentile(usage.cpu_pct, 99)) if usage.cpu_pct else None,
        "rss_mb_max": max(usage.rss_bytes) / MIB if usage.rss_bytes else None,
        "rss_mb_mean": float(np.mean(usage.rss_bytes)) / MIB if usage.rss_bytes else None,
    }
    decisions = {
        "policy": config.footprint_policy,
        "histogram_p99_ms": _ms(None if page is None else page.histogram_quantile(DECISION_HISTOGRAM, 0.99)),
        "histogram_p50_ms": _ms(None if page is None else page.histogram_quantile(DECISION_HISTOGRAM, 0.5)),
        "histogram_mean_ms": _mean_ms(page),
        "decisions": None if page is None else page.value(f"{DECISION_HISTOGRAM}_count"),
        "estimate": "from histogram buckets: linear within the bucket holding the rank (histogram_quantile)",
    }
    return footprint, decisions


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _mean_ms(page: Any) -> float | None:
    if page is None:
        return None
    total, count = page.value(f"{DECISION_HISTOGRAM}_sum"), page.value(f"{DECISION_HISTOGRAM}_count")
    return None if not count or total is None else total / count * 1e3


def decide_reference(config: SidecarBenchConfig) -> dict[str, Any]:
    """The in-process `bench decide` figure (256 running, 32 queued)."""
    built = build_policy(
        "throttllem", policy_context(config.setup, control_targets(config.preset), config.models_dir)
    )
    assert isinstance(built.policy, ThrottllemPolicy)
    return benchmark_decide(built.policy, config.setup, 256, 32, config.decide_repeats, config.setup.seed)


def verdicts(latency: dict[str, Any], footprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target next to what was measured."""
    rows = {
        "gateway_added_token_p99_ms": (TARGET_ADDED_TOKEN_P99_MS, latency["added"]["token_lag_p99_ms"]),
        "sidecar_cpu_pct_of_core": (TARGET_CPU_PCT_OF_CORE, footprint["cpu_pct_of_core_mean"]),
        "sidecar_rss_mb": (TARGET_RSS_MB, footprint["rss_mb_max"]),
    }
    return {
        name: {"target_max": target, "measured": value, "met": None if value is None else value <= target}
        for name, (target, value) in rows.items()
    }


async def run_sidecar_bench(config: SidecarBenchConfig, progress: Progress) -> dict[str, Any]:
    """(a), (b) and (c) on one twin; the figures `bench sidecar --json` prints."""
    load_before = os.getloadavg()[0]  # other work on the host shows up as latency: record it
    requests = latency_slice(config)
    footprint_requests = plan_workload(footprint_demo(config)).requests
    count = RequestProgress(2 * len(requests) + len(footprint_requests), progress)
    async with ProcessGroup(config.log_dir) as group:
        twin = await start_twin(group, config.setup)
        latency = await gateway_latency(config, group, twin, requests, count)
        footprint, decisions = await sidecar_footprint(config, group, twin, footprint_requests, count)
    decisions["bench_decide"] = decide_reference(config)
    setup = config.setup
    return {
        "gpu": setup.gpu.name,
        "model": setup.model.name,
        "tp": setup.tp,
        "trace": config.trace,
        "start_s": config.start_s,
        "gateway_latency": latency,
        "sidecar_footprint": footprint,
        "decision_latency": decisions,
        "targets": verdicts(latency, footprint),
        "cpu_count": psutil.cpu_count(),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "log_dir": str(config.log_dir),
    }
