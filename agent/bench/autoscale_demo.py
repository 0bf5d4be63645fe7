"""The live sizing demo: a burst moves a pool of real engines from TP1 to TP2 and back.

Everything is a real process on loopback, as `throttllem coordinator` runs it on the local
backend: a `twin serve` + `throttllem run` pair per size, a router in front, and the coordinator's
own state machine (`agent.coordinator.service`) ticking every period. The clients replay
requests of a conversation trace (their prompt and answer lengths) at three paced rates: quiet,
a burst past what TP1 serves within the SLO, quiet again; even pacing makes each period's
measured rate the planned one, so the demo shows one clean cycle rather than Poisson noise.

The burst and the quiet rates come from the sizes' capacity profiles (`capacity.json`): quiet at
`QUIET_SHARE` of what the coordinator plans for TP1, the burst at `BURST_SHARE` of what it plans
for the largest size.

Energy is what every twin GPU counted (all GPUs of each engine, shadows starting and engines
draining included) from the first request's start to the last answer. The baseline is the
`max` policy on a pool fixed at the size the burst needs, on the same requests, in the
virtual-time pool simulator (simulated, not measured live: the report says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from agent.bench.capacities import load_capacities
from agent.bench.local_backend import LocalBackend, LocalEngine
from agent.bench.processes import ProcessGroup, SidecarSpec
from agent.bench.replay import replay_slo
from agent.bench.report import jsonable
from agent.bench.router import Router
from agent.bench.scrape import get_json
from agent.control.scaling import ScalingConfig
from agent.coordinator.service import Coordinator, wait_period
from agent.domain import Request
from agent.policy_registry import build_policy
from agent.sidecar.app import listen
from agent.sim.policies import policy_context
from agent.sim.pool import PoolConfig, SizingKnobs, simulate_pool
from agent.slo_presets import SloPreset
from agent.twin.setup import TwinSetup, fit_to_engine
from agent.workloads import load_trace
from agent.workloads.loadgen import LoadReport, RequestResult, generate_load

AUTOSCALE_TRACE = "azure-conv"
AUTOSCALE_START_S = 600.0  # ten minutes into the trace: its conversational mix, past the opening burst
QUIET_SHARE = 0.4  # quiet arrivals: this share of TP1's planned rate (headroom × capacity)
BURST_SHARE = 0.5  # the burst: this share of the largest size's planned rate
BASELINE_POLICY = "max"
PERIOD_S = 10.0  # the coordinator's period (the paper's)
GRACE_S = 30.0  # a smaller size must suffice this long: shorter than production's 60 s, for a short demo
MIN_DRAIN_S = 10.0
DRAIN_TIMEOUT_S = 120.0
SHADOW_TIMEOUT_S = 90.0
FIRST_ENGINE_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 120.0  # after the last answer: time to finish a resize still under way
POLL_S = 0.5
READY_POLL_S = 1.0  # while a shadow starts: the coordinator's default


class AutoscaleDemoError(RuntimeError):
    """The sizing demo could not run; the message says why."""


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """What the sizing demo runs."""

    setup: TwinSetup  # the engine at every size (its own tp is ignored)
    preset: SloPreset
    models_dir: Path
    out_dir: Path
    sizes: tuple[int, ...] = (1, 2)
    policy: str = "throttllem"  # every sidecar's clock policy
    trace: str = AUTOSCALE_TRACE
    start_s: float = AUTOSCALE_START_S
    quiet_s: float = 30.0  # wall seconds of quiet before the burst
    burst_s: float = 60.0
    tail_s: float = 80.0  # quiet after it: the grace, a shadow's start and a drain fit in it
    max_tokens: int = 2048
    headroom: float = 0.8
    period_s: float = PERIOD_S
    grace_s: float = GRACE_S

    def setups(self) -> dict[int, TwinSetup]:
        """The engine at each size."""
        return {size: replace(self.setup, tp=size) for size in self.sizes}


@dataclass(frozen=True, slots=True)
class AutoscalePlan:
    """The requests, their three rates, and the fixed size the baseline needs."""

    requests: list[Request]
    capacities_rps: dict[int, float]
    quiet_rps: float
    burst_rps: float
    baseline_size: int  # the smallest size whose planned rate covers the burst


def paced(rate_rps: float, start_s: float, seconds: float) -> list[float]:
    """Arrival times evenly `1 / rate_rps` apart over [start_s, start_s + seconds)."""
    gap = 1.0 / rate_rps
    return [start_s + gap * (i + 0.5) for i in range(math.floor(seconds * rate_rps))]


def plan_autoscale(config: AutoscaleConfig) -> AutoscalePlan:
    """Rates from the capacity profiles, lengths from the trace, arrivals paced phase by phase."""
    if len(config.sizes) < 2:
        raise AutoscaleDemoError("the sizing demo needs two engine sizes at least")
    profiles = load_capacities(
        config.models_dir, config.setups(), config.trace, config.preset, config.max_tokens
    )
    capacities = {size: profile.slo_rps for size, profile in profiles.items()}
    smallest, largest = min(capacities), max(capacities)
    quiet = QUIET_SHARE * config.headroom * capacities[smallest]
    burst = BURST_SHARE * config.headroom * capacities[largest]
    if burst <= config.headroom * capacities[smallest]:
        raise AutoscaleDemoError(
            f"tp{largest} serves too little more than tp{smallest} ({capacities}) for a burst between them"
        )
    # Quiet periods must read as quiet: at most one arrival per period, below TP1's planned rate.
    if math.ceil(quiet * config.period_s) / config.period_s > config.headroom * capacities[smallest]:
        raise AutoscaleDemoError(f"a {config.period_s:g} s period is too short to tell the quiet rate apart")
    arrivals = [
        *paced(quiet, 0.0, config.quiet_s),
        *paced(burst, config.quiet_s, config.burst_s),
        *paced(quiet, config.quiet_s + config.burst_s, config.tail_s),
    ]
    whole = load_trace(config.trace)
    trace = whole.window(config.start_s, whole.duration_s - config.start_s)
    shapes = trace.requests(max_tokens=config.max_tokens)
    if len(shapes) < len(arrivals):
        raise AutoscaleDemoError(f"{config.trace} has {len(shapes)} requests from {config.start_s:g} s")
    # Prompts cut to the model's window as a client cuts them (the simulator does the same).
    requests, _ = fit_to_engine(
        [
            Request(i, t, shape.prompt_tokens, shape.max_tokens, shape.output_tokens)
            for i, (t, shape) in enumerate(zip(arrivals, shapes, strict=False))
        ],
        config.setup,
    )
    baseline = next((s for s in sorted(capacities) if config.headroom * capacities[s] >= burst), largest)
    return AutoscalePlan(requests, capacities, quiet, burst, baseline)


@dataclass(slots=True)
class EngineReading:
    """One engine's GPUs at the latest poll."""

    size: int
    clock_mhz: float | None = None
    locked: bool | None = None
    power_w: float | None = None
    energy_j: float | None = None  # the twin's counter since it started
    energy_at_start_j: float = 0.0  # the counter when the load began (0: started after)
    reset_on_exit: bool | None = None  # no lock left once its sidecar stopped


@dataclass(frozen=True, slots=True)
class PoolSample:
    """The pool at one poll, for the timeline plot."""

    t_s: float
    serving: int | None
    gpus_held: int
    power_w: float
    clocks_mhz: dict[int, float]  # by engine size


@dataclass(slots=True)
class AutoscaleState:
    """What the demo has seen so far, for the live view and the report."""

    policy: str
    total: int
    started_at: float | None = None
    done: int = 0
    answered: int = 0
    serving: int | None = None
    shadow: int | None = None
    draining: tuple[int, ...] = ()
    last_reason: str = ""
    arrival_rps: float | None = None
    engines: dict[int, EngineReading] = field(default_factory=dict)  # id(LocalEngine) -> reading
    retired: list[EngineReading] = field(default_factory=list)  # engines stopped, last reading
    samples: list[PoolSample] = field(default_factory=list)

    def since_start_s(self) -> float:
        """Seconds since the first request was due (0 before)."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def live(self) -> list[EngineReading]:
        """Engines running now, smallest first."""
        return sorted(self.engines.values(), key=lambda r: r.size)

    def energy_j(self) -> float:
        """Every engine's GPUs since the load began, by the latest readings."""
        return sum(
            r.energy_j - r.energy_at_start_j
            for r in [*self.engines.values(), *self.retired]
            if r.energy_j is not None
        )

    def power_w(self) -> float:
        """The pool's power now."""
        return sum(r.power_w or 0.0 for r in self.engines.values())


async def _read(session: aiohttp.ClientSession, engine: LocalEngine, reading: EngineReading) -> None:
    if engine.twin is None:
        return
    gpu = await get_json(session, engine.twin.gpu_url)
    if gpu is None:
        return
    reading.clock_mhz = float(gpu["clock_mhz"])
    reading.locked = gpu.get("locked_clock_mhz") is not None
    reading.power_w = float(gpu["power_w"])
    reading.energy_j = float(gpu["energy_j"])


class PoolWatch:
    """Polls every running engine's twin GPU and the coordinator; keeps readings across stops."""

    def __init__(self, state: AutoscaleState, backend: LocalBackend, coordinator: Coordinator) -> None:
        self.state = state
        self.backend = backend
        self.coordinator = coordinator
        self.session = aiohttp.ClientSession()

    async def poll(self) -> None:
        """One look at every engine and at the coordinator."""
        for engine in list(self.backend.engines.values()):
            await self.backend.is_ready(engine.size)  # fills in the twin and sidecar once started
            reading = self.state.engines.setdefault(id(engine), EngineReading(engine.size))
            await _read(self.session, engine, reading)
        status = self.coordinator.status()
        self.state.serving, self.state.shadow = status.serving, status.shadow
        self.state.draining, self.state.last_reason = status.draining, status.last_reason
        self.state.arrival_rps = status.arrival_rate_rps
        if self.state.started_at is not None:
            live = self.state.live()
            self.state.samples.append(
                PoolSample(
                    self.state.since_start_s(),
                    status.serving,
                    sum(r.size for r in live),
                    self.state.power_w(),
                    {r.size: r.clock_mhz for r in live if r.clock_mhz is not None},
                )
            )

    def mark_start(self) -> None:
        """The load begins: energy counts from the engines' counters now."""
        self.state.started_at = time.monotonic()
        for reading in self.state.engines.values():
            reading.energy_at_start_j = reading.energy_j or 0.0

    async def stopping(self, engine: LocalEngine) -> None:
        """An engine's sidecar has stopped: its last reading, and whether it left its GPUs locked."""
        reading = self.state.engines.pop(id(engine), EngineReading(engine.size))
        await _read(self.session, engine, reading)
        reading.reset_on_exit = reading.locked is False
        self.state.retired.append(reading)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.session.close()


Update = Callable[[AutoscaleState], None]
Phase = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class AutoscaleRun:
    """A finished live run of the pool."""

    state: AutoscaleState
    report: LoadReport  # what the clients saw
    actions: list[tuple[float, str, int, str]]  # (s after the load began, kind, size, reason)
    relayed: int  # requests the router relayed
    energy_j: float  # every engine's GPUs, from the load's start to its last answer


async def run_autoscale_live(
    config: AutoscaleConfig, plan: AutoscalePlan, on_update: Update, phase: Phase
) -> AutoscaleRun:
    """The pool live under the burst, then every process stopped."""
    from agent.bench.live_run import warm_up  # its module imports the plotting stack

    scaling = ScalingConfig(
        tuple(plan.capacities_rps.items()), config.headroom, config.grace_s, SHADOW_TIMEOUT_S
    )
    smallest = min(config.sizes)
    router = Router()
    state = AutoscaleState(config.policy, len(plan.requests))
    spec = SidecarSpec(
        policy=config.policy, slo=config.preset.name, models_dir=config.models_dir, inherit_otel=False
    )
    async with contextlib.AsyncExitStack() as stack:
        url = f"http://127.0.0.1:{await listen(router.app(), '127.0.0.1', 0, stack, access_log=None)}"
        group = await stack.enter_async_context(ProcessGroup(config.out_dir / "logs"))
        backend = LocalBackend(group, config.setups(), spec, router)
        stack.push_async_callback(backend.close)
        coordinator = Coordinator(
            backend,
            scaling,
            initial_size=smallest,
            drain_timeout_s=DRAIN_TIMEOUT_S,
            min_drain_s=MIN_DRAIN_S,
        )
        watch = PoolWatch(state, backend, coordinator)
        stack.push_async_callback(watch.close)
        backend.on_stopping = watch.stopping
        phase(f"starting tp{smallest} (twin + sidecar)")
        await coordinator.start()
        deadline = time.monotonic() + FIRST_ENGINE_TIMEOUT_S
        while backend.routed is None:
            if time.monotonic() > deadline:
                raise AutoscaleDemoError(f"tp{smallest} did not start; logs in {config.out_dir}/logs")
            await asyncio.sleep(POLL_S)
            await coordinator.tick()
        first = backend.engines[smallest].sidecar
        assert first is not None  # routed: it started
        await warm_up(watch.session, first)
        await watch.poll()

        async def show() -> None:
            await watch.poll()
            on_update(state)

        def on_result(result: RequestResult) -> None:
            state.done += 1
            state.answered += result.answered

        async def coordinate() -> None:
            while True:
                await wait_period(coordinator, config.period_s, asyncio.sleep, READY_POLL_S)
                await coordinator.tick()

        async def watch_pool() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                await show()

        tasks = [asyncio.create_task(coordinate()), asyncio.create_task(watch_pool())]
        began = time.monotonic()
        try:
            phase(
                f"load: {len(plan.requests)} requests at {plan.quiet_rps:.2f} → {plan.burst_rps:.2f} → "
                f"{plan.quiet_rps:.2f} req/s"
            )
            watch.mark_start()
            # A client retries a 429/503 after its Retry-After, as the SDKs do: admission sheds load
            # while the small engine is overloaded, and a retried request is not a lost one.
            report = await generate_load(url, "ensemble", plan.requests, on_result=on_result)
            await watch.poll()
            energy_j = state.energy_j()
            phase("load done: the pool settles")
            settle = time.monotonic() + SETTLE_TIMEOUT_S
            while (backend.routed != smallest or len(backend.engines) > 1) and time.monotonic() < settle:
                await asyncio.sleep(POLL_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for size in sorted(backend.engines):
            await backend.stop(size)
        on_update(state)
        actions = [(t - began, a.kind, a.size, a.reason) for t, a in coordinator.record.actions]
    return AutoscaleRun(state, report, actions, router.relayed, energy_j)


def simulated_baseline(config: AutoscaleConfig, plan: AutoscalePlan) -> dict[str, Any]:
    """`max` on a pool fixed at the burst's size, same requests, in virtual time: its summary."""
    slo = replay_slo(config.preset)
    setups = config.setups()
    contexts = {size: policy_context(setup, slo.targets, config.models_dir) for size, setup in setups.items()}
    pool = simulate_pool(
        PoolConfig(setups, plan.baseline_size, None, SizingKnobs(period_s=config.period_s)),
        lambda size: build_policy(BASELINE_POLICY, contexts[size]),
        plan.requests,
    )
    summary = pool.summary()
    summary["slo_attainment"] = pool.result.slo_attainment(slo.target)
    return summary


def switch_times_s(actions: list[tuple[float, str, int, str]]) -> list[float]:
    """From each shadow's start to traffic moving to it: what a resize takes on the local backend.

    The first engine's start, before the load, is no resize and is left out.
    """
    started: dict[int, float] = {}
    times = []
    for t, kind, size, _ in actions:
        if kind == "start" and t >= 0:
            started[size] = t
        elif kind == "route" and size in started:
            times.append(t - started.pop(size))
    return times


def summarize(config: AutoscaleConfig, plan: AutoscalePlan, run: AutoscaleRun) -> dict[str, Any]:
    """The live figures beside the simulated fixed-size baseline."""
    base = simulated_baseline(config, plan)
    clients = run.report.summary(config.preset)
    tokens = sum(r.output_tokens for r in run.report.results if r.answered)
    served = sorted({size for _, kind, size, _ in run.actions if kind == "route"})
    base_j = base["energy_engine_gpus_j"]
    return {
        "gpu": config.setup.gpu.name,
        "model": config.setup.model.name,
        "sizes": list(config.sizes),
        "policy": config.policy,
        "slo": config.preset.name,
        "trace": config.trace,
        "capacities_rps": plan.capacities_rps,
        "quiet_rps": plan.quiet_rps,
        "burst_rps": plan.burst_rps,
        "phases_s": [config.quiet_s, config.burst_s, config.tail_s],
        "requests": len(plan.requests),
        "answered": clients["answered"],
        "lost": len(plan.requests) - clients["answered"],
        "relayed": run.relayed,
        "rejected_then_retried": sum(r.retries for r in run.report.results),
        "errors": sorted({r.error or f"HTTP {r.status}" for r in run.report.results if not r.answered}),
        "slo_attainment": clients.get("slo_attainment"),
        "energy_j": run.energy_j,
        "output_tokens": tokens,
        "tokens_per_joule": tokens / run.energy_j if run.energy_j else None,
        "sizes_served": served,
        "actions": [
            {"t_s": round(t, 1), "action": kind, "tp": size, "reason": reason}
            for t, kind, size, reason in run.actions
        ],
        "decision_to_switch_s": switch_times_s(run.actions),
        "clocks_reset_on_exit": all(r.reset_on_exit for r in run.state.retired),
        "baseline": {
            "source": "simulated",
            "policy": f"fixed:{BASELINE_POLICY}",
            "tp": plan.baseline_size,
            "energy_j": base_j,
            "tokens_per_joule": base["tokens_out"] / base_j if base_j else None,
            "slo_attainment": base["slo_attainment"],
        },
        "saved_pct": 100.0 * (1.0 - run.energy_j / base_j) if base_j else None,
    }


async def run_autoscale_demo(
    config: AutoscaleConfig, plan: AutoscalePlan, on_update: Update, phase: Phase
) -> dict[str, Any]:
    """Run the planned pool live, compare with the fixed-size baseline, write the report; the summary."""
    from agent.bench.autoscale_report import write_autoscale_report  # matplotlib: slow to import

    run = await run_autoscale_live(config, plan, on_update, phase)
    phase(f"baseline: fixed:{BASELINE_POLICY} on tp{plan.baseline_size}, simulated")
    summary = summarize(config, plan, run)
    summary["report_dir"] = str(config.out_dir)
    summary["plots"] = write_autoscale_report(config.out_dir, summary, run.state.samples)
    return jsonable(summary)
