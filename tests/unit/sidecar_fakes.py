"""Fake engines, GPUs and policies for the sidecar tests: every call is recorded."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from agent.catalog import gpu_spec
from agent.control.admission import EngineLimits
from agent.control.policies import ControlView, StaticPolicy
from agent.domain import Decision, EngineStats
from agent.engines.base import AdapterHealth, EngineError, EngineUnavailableError
from agent.gpus.base import check_supported_clock
from agent.policy_registry import BuiltPolicy, PolicySpec
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.loop import ControlLoop, LoopConfig
from agent.sidecar.request_energy import RequestEnergyLedger
from agent.sidecar.tracker import RequestTracker
from agent.twin.iteration_stats import InflightBatchingStats, IterationStats, KvCacheStats, to_executor_json

GPU = gpu_spec("a100-sxm4-80gb")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(iteration: int, *, scheduled: int = 4, kv_used: int = 100, kv_max: int = 1000) -> EngineStats:
    return EngineStats(
        timestamp_s=iteration * 0.02,
        iteration=iteration,
        active_requests=scheduled,
        queued_requests=0,
        scheduled_requests=scheduled,
        context_requests=0,
        generation_requests=scheduled,
        paused_requests=0,
        context_tokens=0,
        kv_blocks_used=kv_used,
        kv_blocks_max=kv_max,
        tokens_per_block=64,
        iteration_latency_s=0.02,
    )


class FakeAdapter:
    """Returns what the test queued (EngineStats, None or an EngineError to raise), then None."""

    name = "fake-engine"

    def __init__(self) -> None:
        self.queue: deque[EngineStats | EngineError | None] = deque()
        self.healthy = True
        self.restarts = 0

    @property
    def health(self) -> AdapterHealth:
        return AdapterHealth(
            last_success_s=1.0 if self.healthy else None,
            last_new_stats_s=None,
            consecutive_failures=0 if self.healthy else 1,
            last_error=None if self.healthy else EngineUnavailableError("down"),
            restarts=self.restarts,
        )

    async def poll(self) -> EngineStats | None:
        item = self.queue.popleft() if self.queue else None
        if isinstance(item, EngineError):
            self.healthy = False
            raise item
        return item

    async def close(self) -> None:
        pass


class FakeActuator:
    """Records ("set", mhz) and ("reset", None); raises the errors queued in `fail`."""

    actuates = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.fail: deque[Exception] = deque()
        self.closed = False

    @property
    def name(self) -> str:
        return "fake:GPU-0"

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        return GPU.sm_clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        check_supported_clock(mhz, GPU.sm_clocks_mhz, self.name)
        self._call("set", mhz)

    async def reset(self) -> None:
        self._call("reset", None)

    async def clock_mhz(self) -> int:
        return GPU.max_clock_mhz

    async def close(self) -> None:
        self.closed = True

    def _call(self, kind: str, mhz: int | None) -> None:
        if self.fail:
            raise self.fail.popleft()
        self.calls.append((kind, mhz))


class FakeMeter:
    """All GPUs of the engine: `energy_j` is what the test says; raises while `failing`."""

    name = "fake-meter"

    def __init__(self, energy_j: float = 1000.0) -> None:
        self.energy_j_now = energy_j
        self.failing = False

    async def energy_j(self) -> float:
        if self.failing:
            raise RuntimeError("meter unreachable")
        return self.energy_j_now

    async def power_w(self) -> float:
        return 300.0

    async def close(self) -> None:
        pass


@dataclass
class ScriptedPolicy:
    """Decides the clocks in `clocks` in turn (the last one repeats); raises `error` once when set."""

    clocks: list[int | None]
    name: str = "scripted"
    admit_all: bool = False
    error: Exception | None = None
    views: list[ControlView] = field(default_factory=list)

    def decide(self, view: ControlView) -> Decision:
        self.views.append(view)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        clock = self.clocks.pop(0) if len(self.clocks) > 1 else self.clocks[0]
        admit = tuple(int(i) for i in view.scoreboard.queued_ids) if self.admit_all else ()
        return Decision(sm_clock_mhz=clock, admit_request_ids=admit)


class Builder:
    """A PolicyBuilder that hands out `policy` (gating when `gates`) and records every call."""

    def __init__(self, policy: object, gates: bool = False) -> None:
        self.policy = policy
        self.gates = gates
        self.calls: list[tuple[str, EngineLimits | None]] = []

    def __call__(self, spec: str, limits: EngineLimits | None) -> BuiltPolicy:
        self.calls.append((spec, limits))
        if spec.startswith("static:"):
            return BuiltPolicy(StaticPolicy(int(PolicySpec.parse(spec).arg)), None)
        return BuiltPolicy(self.policy, MaxTokensPredictor() if self.gates else None)  # type: ignore[arg-type]


@dataclass
class Rig:
    loop: ControlLoop
    adapter: FakeAdapter
    actuator: FakeActuator
    tracker: RequestTracker
    clock: FakeClock
    builder: Builder


def rig(
    policy: object,
    *,
    gates: bool = False,
    spec: str = "scripted",
    energy: RequestEnergyLedger | None = None,
    **config: float,
) -> Rig:
    clock = FakeClock()
    adapter, actuator = FakeAdapter(), FakeActuator()
    tracker = RequestTracker(MaxTokensPredictor(), clock=clock, max_hold_s=60.0, energy=energy)
    builder = Builder(policy, gates)
    loop = ControlLoop(
        adapter=adapter,
        actuator=actuator,
        tracker=tracker,
        gpu=GPU,
        policy_spec=spec,
        build_policy=builder,
        config=LoopConfig(**config),  # type: ignore[arg-type]
    )
    return Rig(loop, adapter, actuator, tracker, clock, builder)


class FakeTrtllmServe:
    """trtllm-serve's /metrics: each poll drains one new iteration record, as the engine does."""

    def __init__(self) -> None:
        self.iteration = 0
        self.polls = 0

    async def metrics(self, request: web.Request) -> web.Response:
        self.polls += 1
        self.iteration += 1
        stats = IterationStats(
            timestamp=1_727_912_742.0 + self.iteration * 0.02,
            iter=self.iteration,
            iter_latency_ms=20.0,
            new_active_requests_queue_latency_ms=0.0,
            num_new_active_requests=0,
            num_active_requests=2,
            num_queued_requests=0,
            num_completed_requests=0,
            max_num_active_requests=256,
            gpu_mem_usage=0,
            cpu_mem_usage=0,
            pinned_mem_usage=0,
            kv_cache_stats=KvCacheStats(7000, 6900, 100, 64, 100, 100, 0, 100),
            inflight_batching_stats=InflightBatchingStats(2, 0, 2, 0, 0, 0, 1.0),
        )
        return web.Response(text=f"[{to_executor_json(stats)}]", content_type="application/json")
