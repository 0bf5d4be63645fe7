"""One live run: twin, node agent, sidecar and load generator as processes, until the load ends.

The sidecar steers the twin's GPU through the node agent, as it steers real GPUs in production.

Where each figure comes from:

- energy: the twin GPU's counter (`/twin/v1/gpu`), read when the load generator starts its clock
  and again when it reports its last request, so idle time before and after does not count;
- SM clock, lock and power: the same endpoint, every poll; clock changes: its counter, start to end;
- batch and KV blocks, from what the engine the twin emulates exports (`engine_figures`):
  Triton's TRT-LLM gauges on its metrics port; vLLM's `num_requests_running` and
  `kv_cache_usage_perc` × `cache_config_info{num_gpu_blocks}` on its /metrics; trtllm-serve's
  /metrics drains its iteration stats (each record is returned once, and the sidecar needs them
  all), so for it the sidecar's own `throttllem_batch_size` / `throttllem_kv_blocks_used` (its
  latest iteration) and the twin setup's KV pool;
- held requests, loop mode, decision latency: the sidecar's /metrics;
- latency: what the load generator's clients saw, one JSON event per request (`throttllem load --events`).

At the end the sidecar gets SIGTERM (the agent then resets the GPU it leased) and the twin is
asked whether a clock lock outlived it.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from agent.bench.processes import (
    LoadSpec,
    ProcessGroup,
    Sidecar,
    SidecarSpec,
    Twin,
    start_load,
    start_node_agent,
    start_sidecar,
    start_twin,
)
from agent.bench.scrape import MetricsPage, get_json, get_page
from agent.engines.base import EngineError
from agent.engines.vllm import read_vllm
from agent.twin.setup import TwinSetup
from agent.workloads.loadgen import PROMPT_WORD, TRITON_MODEL_NAME

DECISION_HISTOGRAM = "throttllem_decision_seconds"
TAIL_ALLOWANCE_S = 300.0  # after the last arrival, the longest request may still stream for this long
WARM_UP_TIMEOUT_S = 60.0
WARM_UP_TOKENS = {"prompt_tokens": 8, "output_tokens": 2}  # the twin's keys: exact lengths
WARM_UP_PROMPT = PROMPT_WORD * 8


class LiveRunError(RuntimeError):
    """The live run could not finish; the message says which process and quotes its log."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll of the running processes (None: that source did not answer)."""

    t_s: float  # seconds since the load generator started its clock
    clock_mhz: float | None  # SM clock in effect
    locked: bool | None  # a clock lock is set
    power_w: float | None
    energy_j: float | None  # the twin GPU's counter since it started
    batch: float | None  # requests scheduled in the engine's last iteration
    kv_used_blocks: float | None
    kv_max_blocks: float | None
    held: float | None  # requests the gateway holds for admission
    loop_mode: str | None  # the sidecar's control-loop mode
    decision_p99_s: float | None  # estimated from the sidecar's histogram, over the run so far


@dataclass(slots=True)
class LiveState:
    """What the run has seen so far: the load generator's events and the polls."""

    policy: str
    total: int  # requests the run replays
    tpot_target_s: float
    ttft_target_s: float | None
    started_at: float | None = None  # monotonic time of the load generator's start event
    done: int = 0
    answered: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    gaps_s: list[np.ndarray] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    latest: Sample | None = None
    announced_requests: int | None = None  # what the load generator said it will send
    summary: dict[str, Any] | None = None  # the load generator's closing summary
    energy_start_j: float | None = None
    energy_end_j: float | None = None
    clock_changes_start: int | None = None
    clock_changes_end: int | None = None

    def apply(self, event: dict[str, Any]) -> None:
        """Take one load-generator event."""
        match event.get("event"):
            case "start":
                self.started_at = time.monotonic()
                self.announced_requests = int(event["requests"])
            case "request":
                self.done += 1
                if event.get("answered"):
                    self.answered += 1
                    for key, values in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
                        if event.get(key) is not None:
                            values.append(float(event[key]))
                    self.gaps_s.append(np.asarray(event.get("gaps_s", ()), dtype=float))
            case "summary":
                self.summary = {k: v for k, v in event.items() if k != "event"}

    def since_start_s(self) -> float:
        """Seconds since the load started (0 before)."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def all_gaps_s(self) -> np.ndarray:
        """Every token gap the clients saw so far."""
        return np.concatenate(self.gaps_s) if self.gaps_s else np.empty(0)

    def percentile(self, values: list[float] | np.ndarray, q: float) -> float | None:
        """The q-th percentile of `values`; None when there are none yet."""
        data = np.asarray(values, dtype=float)
        data = data[np.isfinite(data)]
        return float(np.percentile(data, q)) if data.size else None

    def energy_so_far_j(self) -> float | None:
        """Energy since the load started, by the latest reading."""
        end = self.energy_end_j
        if end is None and self.latest is not None:
            end = self.latest.energy_j
        if end is None or self.energy_start_j is None:
            return None
        return end - self.energy_start_j


@dataclass(frozen=True, slots=True)
class LiveRunSpec:
    """One live run: the engine, the sidecar's policy, and the load."""

    setup: TwinSetup
    policy: str
    slo: str
    models_dir: Path
    load: LoadSpec  # its url is replaced by the sidecar's gateway; its api must suit `engine`
    requests: int  # how many requests `load` replays
    tpot_target_s: float
    ttft_target_s: float | None
    log_dir: Path
    refresh_s: float = 0.5
    arrivals_s: float = 60.0  # wall seconds from the first to the last arrival
    engine: str = "triton"  # the API the twin serves and the sidecar reads (processes.ENGINES)


@dataclass(frozen=True, slots=True)
class LiveRun:
    """A finished live run."""

    state: LiveState
    clock_reset_on_exit: bool  # the twin reported no lock after the sidecar stopped
    sidecar_exit_code: int
    decision_p99_s: float | None  # from the sidecar's histogram buckets, over the whole run
    decisions: int | None
    log_dir: Path


Update = Callable[[LiveState], None]


async def run_live(spec: LiveRunSpec, on_update: Update) -> LiveRun:
    """Start everything, replay the load through the gateway, stop everything; what was seen."""
    # The agent's socket lives in a short temporary path: a Unix socket's path has 108 bytes at most.
    with tempfile.TemporaryDirectory(prefix="throttllem-") as socket_dir:
        async with ProcessGroup(spec.log_dir) as group, aiohttp.ClientSession() as session:
            twin = await start_twin(group, spec.setup, api=spec.engine)
            agent = await start_node_agent(group, [twin.http_url], Path(socket_dir) / "node.sock")
            sidecar_spec = SidecarSpec(
                policy=spec.policy,
                slo=spec.slo,
                models_dir=spec.models_dir,
                settings=agent.sidecar_settings(),
            )
            sidecar = await start_sidecar(group, twin, spec.setup, sidecar_spec)
            assert sidecar.gateway_url is not None  # SidecarSpec's gateway is on
            await warm_up(session, sidecar, api=twin.api, model_name=twin.model_name)
            state = LiveState(spec.policy, spec.requests, spec.tpot_target_s, spec.ttft_target_s)
            marks: list[asyncio.Task[None]] = []

            def on_line(line: str) -> None:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    return
                if not isinstance(event, dict):
                    return
                state.apply(event)
                if event.get("event") in ("start", "summary"):
                    marks.append(
                        asyncio.create_task(_mark_energy(session, twin, state, event["event"] == "start"))
                    )

            load = await start_load(group, replace(spec.load, url=sidecar.gateway_url), on_line)
            kv_pool = spec.setup.kv_blocks()
            poller = asyncio.create_task(
                _poll(session, twin, sidecar, state, on_update, spec.refresh_s, kv_pool)
            )
            try:
                code = await load.wait(spec.arrivals_s + TAIL_ALLOWANCE_S)
            except TimeoutError:
                raise LiveRunError(
                    f"the load generator did not finish within {spec.arrivals_s + TAIL_ALLOWANCE_S:g} s; "
                    f"logs in {spec.log_dir}"
                ) from None
            finally:
                poller.cancel()
                await asyncio.wait([poller])  # unlike awaiting it, never swallows our own cancellation
            if code != 0:
                raise LiveRunError(
                    f"the load generator exited with code {code}; {load.log_path}: {load.log_tail()}"
                )
            await asyncio.gather(*marks)
            page = await get_page(session, sidecar.metrics_url)
            sidecar_code = await sidecar.child.stop()
            after = await get_json(session, twin.gpu_url)
            on_update(state)
        return LiveRun(
            state=state,
            clock_reset_on_exit=after is not None and after.get("locked_clock_mhz", 0) is None,
            sidecar_exit_code=sidecar_code,
            decision_p99_s=None if page is None else page.histogram_quantile(DECISION_HISTOGRAM, 0.99),
            decisions=None if page is None else _int(page.value(f"{DECISION_HISTOGRAM}_count")),
            log_dir=spec.log_dir,
        )


def warm_up_request(api: str, model_name: str) -> tuple[str, dict[str, Any]]:
    """(path, body) of one tiny unstreamed request in the engine's API: Triton's, or OpenAI completions."""
    if api == "triton":
        body = {"text_input": WARM_UP_PROMPT, "max_tokens": 2, "stream": False, **WARM_UP_TOKENS}
        return f"/v2/models/{model_name}/generate", body
    body = {"model": model_name, "prompt": WARM_UP_PROMPT, "max_tokens": 2, "stream": False, **WARM_UP_TOKENS}
    return "/v1/completions", body


async def warm_up(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    timeout_s: float = WARM_UP_TIMEOUT_S,
    *,
    api: str = "triton",
    model_name: str = TRITON_MODEL_NAME,
) -> None:
    """One tiny request through the gateway (in the engine's `api`), then wait until the loop controls.

    A fresh sidecar builds its policy when it first sees the engine work (the policy needs the
    engine's limits from its metrics), which takes a few seconds; measuring from before then
    would measure start-up, not control.
    """
    assert sidecar.gateway_url is not None
    path, request = warm_up_request(api, model_name)
    async with session.post(f"{sidecar.gateway_url}{path}", json=request) as response:
        if response.status != 200:
            raise LiveRunError(
                f"the warm-up request through the gateway got HTTP {response.status}: "
                f"{(await response.text())[:200]}"
            )
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        body = await get_json(session, f"{sidecar.url}/readyz")
        if body is not None and body.get("mode") == "controlling":
            return
        await asyncio.sleep(0.1)
    raise LiveRunError(
        f"the sidecar was not controlling {timeout_s:g} s after a warm-up request (readyz: {body}); "
        f"{sidecar.child.log_path}: {sidecar.child.log_tail()}"
    )


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


async def _mark_energy(session: aiohttp.ClientSession, twin: Twin, state: LiveState, start: bool) -> None:
    """Read the GPU's energy and clock-change counters at the load's start or end."""
    gpu = await get_json(session, twin.gpu_url)
    if gpu is None:
        return
    energy, changes = float(gpu["energy_j"]), int(gpu["clock_changes"])
    if start:
        state.energy_start_j, state.clock_changes_start = energy, changes
    else:
        state.energy_end_j, state.clock_changes_end = energy, changes


async def _poll(
    session: aiohttp.ClientSession,
    twin: Twin,
    sidecar: Sidecar,
    state: LiveState,
    on_update: Update,
    refresh_s: float,
    kv_pool_blocks: int,
) -> None:
    """Every `refresh_s`: read the three sources, keep a sample once the load runs, show it."""
    while True:
        gpu, engine, side = await asyncio.gather(
            get_json(session, twin.gpu_url),
            _engine_page(session, twin),
            get_page(session, sidecar.metrics_url),
        )
        batch, kv_used, kv_max = engine_figures(twin.api, engine, side, kv_pool_blocks)
        sample = _sample(state.since_start_s(), gpu, side, batch, kv_used, kv_max)
        state.latest = sample
        if state.started_at is not None:
            state.samples.append(sample)
        on_update(state)
        await asyncio.sleep(refresh_s)


async def _engine_page(session: aiohttp.ClientSession, twin: Twin) -> MetricsPage | None:
    """The engine's Prometheus page; None for trtllm-serve, whose /metrics drains what the sidecar reads."""
    if twin.api == "trtllm-serve":
        return None
    return await get_page(session, twin.metrics_url)


EngineFigures = tuple[float | None, float | None, float | None]  # batch, KV blocks used, KV blocks max


def engine_figures(
    engine: str, page: MetricsPage | None, side: MetricsPage | None, kv_pool_blocks: int
) -> EngineFigures:
    """Batch and KV blocks, from what `engine` exports (see the module docstring); None: not read."""
    if engine == "triton":
        if page is None:
            return None, None, None
        return (
            page.value("nv_trt_llm_request_metrics", request_type="scheduled"),
            page.value("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="used"),
            page.value("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="max"),
        )
    if engine == "vllm":
        if page is None:
            return None, None, None
        try:
            reading = read_vllm(page.samples)
        except EngineError:
            return None, None, None
        blocks = float(reading.kv_blocks_max)
        return float(reading.running), round(reading.kv_usage * blocks), blocks
    if side is None:
        return None, None, float(kv_pool_blocks)
    return side.value("throttllem_batch_size"), side.value("throttllem_kv_blocks_used"), float(kv_pool_blocks)


def _sample(
    t_s: float,
    gpu: dict[str, Any] | None,
    side: MetricsPage | None,
    batch: float | None,
    kv_used: float | None,
    kv_max: float | None,
) -> Sample:
    def gpu_value(key: str) -> float | None:
        value = None if gpu is None else gpu.get(key)
        return None if value is None else float(value)

    mode = None
    if side is not None:
        mode = next(
            (
                s.labels["throttllem_loop_mode"]
                for s in side.samples.get("throttllem_loop_mode", ())
                if s.value
            ),
            None,
        )
    return Sample(
        t_s=t_s,
        clock_mhz=gpu_value("clock_mhz"),
        locked=None if gpu is None else gpu.get("locked_clock_mhz") is not None,
        power_w=gpu_value("power_w"),
        energy_j=gpu_value("energy_j"),
        batch=batch,
        kv_used_blocks=kv_used,
        kv_max_blocks=kv_max,
        held=None if side is None else side.value("throttllem_requests_held"),
        loop_mode=mode,
        decision_p99_s=None if side is None else side.histogram_quantile(DECISION_HISTOGRAM, 0.99),
    )


def mean_busy_clock_mhz(samples: list[Sample]) -> float | None:
    """SM clock averaged over the samples that saw the engine busy (as the simulator weights busy time)."""
    clocks = [
        s.clock_mhz for s in samples if s.batch and s.clock_mhz is not None and math.isfinite(s.clock_mhz)
    ]
    return float(np.mean(clocks)) if clocks else None
