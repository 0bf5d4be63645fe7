"""The profiling sweep on a live engine and GPU: `LiveProfileTarget`, a `ProfileTarget` over HTTP and NVML.

Each sweep point: lock the point's clock through the actuator, wait for it to settle, read and
discard what the engine reported before, send the point's requests at once (exact sizes, see
`agent.modeling.live_points`), read iteration stats until every request has answered (and a
few polls more, for the last records), reset the clock, and keep the iterations inside the
point's envelope as rows. The same code profiles the twin served over HTTP (`twin serve` with
its GPU endpoint and trtllm-serve's iteration stats endpoint), which is how it is tested.

Opening checks everything before the first point, and in this order, so nothing is sent to an
engine that cannot be profiled: a probe lock at the highest clock (a refused lock means no
CAP_SYS_ADMIN: stop, saying how to get it), the stats endpoint, then one small warm-up request
whose iteration stats give the KV-cache size and block size.

Locked clocks outlive the process, so every point resets in a `finally`, `close()` resets
again, and Ctrl-C goes through both: the sweep is synchronous, and this target runs every
coroutine on one `asyncio.Runner`, which on SIGINT cancels the running point (its `finally`
resets) and raises KeyboardInterrupt, after which `close()` still runs on the same loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp

from agent.domain import EngineStats
from agent.engines.base import EngineUnavailableError
from agent.engines.http import HttpPollingAdapter
from agent.engines.triton_trtllm import TritonTrtllmAdapter
from agent.engines.trtllm_serve import TrtllmServeAdapter
from agent.gpus import Actuator, GpuControlError, PermissionDeniedError, open_engine_actuator
from agent.gpus.base import CLOCK_PERMISSION_ADVICE, DRYRUN_ADVICE
from agent.modeling.dataset import Row
from agent.modeling.live_points import (
    APIS,
    Matched,
    PointEnvelope,
    PointRequest,
    point_requests,
    rows_from_iterations,
    rows_from_snapshots,
)
from agent.modeling.profile import ProfileLimits

log = logging.getLogger(__name__)

ENGINES: dict[str, type[HttpPollingAdapter]] = {
    "trtllm-serve": TrtllmServeAdapter,  # every iteration, with its latency
    "triton": TritonTrtllmAdapter,  # the last iteration of each stats poll, without latency
}
ACTUATORS = ("nvml", "twin")  # dry-run cannot profile: its clocks never take effect
WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS = 32, 8
WARMUP_KEY = 2**31 - 1  # the warm-up's "point" for prompt token ids: never a sweep point's index
STATS_TIMEOUT_S = 5.0  # one read of the stats endpoint; a drained backlog can be large
TAIL_POLLS = 3  # polls after the last answer: an engine publishes an iteration's stats after it
MAX_POLL_FAILURES = 10  # consecutive unreachable stats reads before a point gives up
ERROR_EXCERPT_CHARS = 300


class LiveProfileError(Exception):
    """The live profile cannot start or go on; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """Where the engine and the GPU are, and what the engine was built to accept."""

    engine: str  # "trtllm-serve" | "triton": where iteration stats come from, and in which form
    engine_url: str  # base URL the requests go to
    metrics_url: str  # trtllm-serve's /metrics (iteration stats JSON), or Triton's metrics port
    api: str  # "openai" (/v1/completions, trtllm-serve) | "triton" (generate extension)
    model_name: str  # the model the requests address
    actuator: str  # "nvml" | "twin"
    gpu_uuids: tuple[str, ...] = ()  # nvml: every GPU of the engine, by UUID (preferred: stable)
    gpu_index: int | None = None  # nvml: or, for TP1, its NVML index
    twin_url: str | None = None  # twin: base URL of the twin's GPU endpoint
    tp: int = 1  # tensor-parallel degree of the engine (recorded, and a model feature)
    max_batch_size: int = 256  # the engine's build limits; points stay within them
    max_num_tokens: int = 8192
    max_seq_len: int = 2048
    settle_s: float = 0.1  # wall time after a lock before the load starts (NVML publishes no latency)
    poll_s: float = 0.02  # stats read interval; Triton needs it below its stats_check_period_ms
    point_timeout_s: float = 600.0  # one point, wall time, before it is abandoned
    warmup_timeout_s: float = 120.0  # the first request, which may wait for engine start-up
    seed: int = 0  # prompt token ids

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")
        if self.api not in APIS:
            raise ValueError(f"unknown API {self.api!r}; choose one of: {', '.join(APIS)}")
        if self.actuator not in ACTUATORS:
            raise ValueError(
                f"a live profile locks clocks with {' or '.join(ACTUATORS)}, not {self.actuator!r}"
            )
        for name in ("tp", "max_batch_size", "max_num_tokens", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("poll_s", "point_timeout_s", "warmup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {self.settle_s}")


async def _reset_quietly(actuator: Actuator) -> None:
    """Reset the clock; a failure is logged loudly, since the GPU may stay locked."""
    try:
        await actuator.reset()
    except GpuControlError as err:
        log.error("could not reset the clock of %s; it may stay locked: %s", actuator.name, err)


async def _probe_permission(actuator: Actuator, clocks_mhz: tuple[int, ...]) -> None:
    """Lock the highest clock and reset: a refusal stops the profile before any load."""
    try:
        await actuator.set_clock_mhz(max(clocks_mhz))
        await actuator.reset()
    except PermissionDeniedError as exc:
        reason = str(exc).replace(f"; {DRYRUN_ADVICE}", "")  # shadow mode cannot measure a clock
        advice = "" if CLOCK_PERMISSION_ADVICE in reason else f"; {CLOCK_PERMISSION_ADVICE}"
        raise LiveProfileError(
            f"a profile locks the SM clock at every point, and {actuator.name} refused a lock: "
            f"{reason}{advice}"
        ) from exc


def _answer_error(text: str) -> str | None:
    """The error a 200 answer carries (Triton reports some in the body), or None."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return f"the answer is not JSON: {text[:ERROR_EXCERPT_CHARS]!r}"
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])[:ERROR_EXCERPT_CHARS]
    return None


class _LiveSession:
    """The asynchronous half of `LiveProfileTarget`: actuator, stats adapter and HTTP client."""

    def __init__(
        self,
        config: LiveConfig,
        stack: AsyncExitStack,
        actuator: Actuator,
        clocks_mhz: tuple[int, ...],
        adapter: HttpPollingAdapter,
        http: aiohttp.ClientSession,
    ) -> None:
        self.config = config
        self._stack = stack  # closes, in reverse: stats adapter, HTTP client, reset, actuator
        self.actuator = actuator
        self.clocks_mhz = clocks_mhz
        self._adapter = adapter
        self._http = http
        self._poll_failures = 0
        self.limits: ProfileLimits | None = None  # known after the warm-up

    @classmethod
    async def open(cls, config: LiveConfig) -> _LiveSession:
        """Open the actuator, check clock permission, reach the stats endpoint and warm up."""
        stack = AsyncExitStack()
        try:
            actuator = await open_engine_actuator(
                config.actuator, uuids=config.gpu_uuids, index=config.gpu_index, twin_url=config.twin_url
            )
            stack.push_async_callback(actuator.close)
            stack.push_async_callback(_reset_quietly, actuator)
            if not actuator.actuates:
                raise LiveProfileError(f"{actuator.name} does not set clocks; a profile needs one that does")
            clocks = await actuator.supported_clocks_mhz()
            await _probe_permission(actuator, clocks)
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            )
            stack.push_async_callback(http.close)
            adapter = ENGINES[config.engine](config.metrics_url, timeout_s=STATS_TIMEOUT_S)
            stack.push_async_callback(adapter.close)
            session = cls(config, stack, actuator, clocks, adapter, http)
            await session._poll()  # reach the endpoint, and forget what came before us
            await session._warm_up()
        except BaseException:
            await stack.aclose()
            raise
        return session

    async def close(self) -> None:
        """Reset the clock and release everything."""
        await self._stack.aclose()

    async def _warm_up(self) -> None:
        """Send one small request; its iteration stats say how large the KV cache is."""
        config = self.config
        requests = point_requests(
            config.api,
            config.model_name,
            [WARMUP_PROMPT_TOKENS],
            [WARMUP_OUTPUT_TOKENS],
            WARMUP_KEY,
            config.seed,
        )
        records = await self._load(requests, "the warm-up request", config.warmup_timeout_s)
        deadline = time.monotonic() + config.warmup_timeout_s
        while not records and time.monotonic() < deadline:
            await asyncio.sleep(config.poll_s)
            records = await self._poll()
        if not records:
            raise LiveProfileError(
                f"{self._adapter.url} showed no iteration stats within {config.warmup_timeout_s:g} s of a "
                "warm-up request. trtllm-serve: set `enable_iter_perf_stats: true` in its --config YAML; "
                "Triton: check the engine metrics URL is the metrics port (8002) and the tensorrtllm backend "
                "exports nv_trt_llm_* metrics; the twin: serve it with --iteration-stats-endpoint"
            )
        last = records[-1]
        self.limits = ProfileLimits(
            tp=config.tp,
            max_batch_size=config.max_batch_size,
            max_num_tokens=config.max_num_tokens,
            tokens_per_block=last.tokens_per_block,
            kv_blocks=last.kv_blocks_max,
            max_seq_len=config.max_seq_len,
        )
        log.info(
            "%s: %d KV blocks of %d tokens", self._adapter.name, last.kv_blocks_max, last.tokens_per_block
        )

    async def run_point(
        self, clock_mhz: int, prompts: Sequence[int], outputs: Sequence[int], point: int
    ) -> Matched:
        """Lock, load, read, reset (see the module docstring)."""
        config, limits = self.config, self.limits
        assert limits is not None, "opened sessions have warmed up"
        envelope = PointEnvelope.of(prompts, outputs, limits.tokens_per_block)
        requests = point_requests(config.api, config.model_name, prompts, outputs, point, config.seed)
        await self.actuator.set_clock_mhz(clock_mhz)
        try:
            await asyncio.sleep(config.settle_s)
            await self._poll()  # iterations before the lock settled are not this point's
            records = await self._load(requests, f"point {point}", config.point_timeout_s)
        finally:
            await self.actuator.reset()
        match = rows_from_iterations if config.engine == "trtllm-serve" else rows_from_snapshots
        return match(records, envelope, point=point, tp=limits.tp, clock_mhz=clock_mhz)

    async def _load(self, requests: Sequence[PointRequest], what: str, timeout_s: float) -> list[EngineStats]:
        """Send `requests` at once; the iteration stats read until all have answered, and just after."""
        records: list[EngineStats] = []
        sending = asyncio.ensure_future(asyncio.gather(*(self._send(r) for r in requests)))
        try:
            async with asyncio.timeout(timeout_s):
                while not sending.done():
                    await asyncio.wait([sending], timeout=self.config.poll_s)
                    records += await self._poll()
        except TimeoutError:
            raise LiveProfileError(
                f"{what} did not finish within {timeout_s:g} s; is the engine busy with other work?"
            ) from None
        finally:
            sending.cancel()  # only matters when leaving early: closes the requests still open
        errors = [error for error in sending.result() if error is not None]
        if errors:
            raise LiveProfileError(
                f"{what}: {len(errors)} of {len(requests)} requests to {self.config.engine_url} failed; "
                f"first: {errors[0]}. Check --api and --model-name, and that --max-batch-size, "
                "--max-num-tokens and --max-seq-len do not exceed what the engine was built with"
            )
        for _ in range(TAIL_POLLS):
            await asyncio.sleep(self.config.poll_s)
            records += await self._poll()
        return records

    async def _send(self, request: PointRequest) -> str | None:
        """POST one request and wait for its whole answer; the error it met, or None."""
        url = self.config.engine_url.rstrip("/") + request.path
        try:
            async with self._http.post(url, json=request.body) as response:
                text = await response.text()
                if response.status != 200:
                    return f"POST {url} answered HTTP {response.status}: {text[:ERROR_EXCERPT_CHARS]!r}"
                return _answer_error(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"POST {url} failed: {exc!r}"

    async def _poll(self) -> list[EngineStats]:
        """New iteration stats; an unreachable endpoint is retried on the next poll, up to a limit."""
        try:
            records = await self._adapter.poll_all()
        except EngineUnavailableError:
            self._poll_failures += 1
            if self._poll_failures >= MAX_POLL_FAILURES:
                raise
            return []
        self._poll_failures = 0
        return records


class LiveProfileTarget:
    """A live engine on a GPU whose clock we may lock, as the synchronous `ProfileTarget` the sweep drives.

    Open it with `LiveProfileTarget.open(config)` in a `with` block: leaving it resets the clock.
    """

    def __init__(self, runner: asyncio.Runner, session: _LiveSession) -> None:
        assert session.limits is not None, "opened sessions have warmed up"
        self._runner = runner
        self._session = session
        self._limits = session.limits
        self.kept = 0  # iteration records (Triton: windows) that became rows
        self.dropped = 0  # records that did not
        self.empty_points = 0  # points that gave no row (Triton: no decode window long enough)

    @classmethod
    def open(cls, config: LiveConfig) -> LiveProfileTarget:
        """Check permission, reach the engine and warm it up (see the module docstring)."""
        runner = asyncio.Runner()
        try:
            session = runner.run(_LiveSession.open(config))
        except BaseException:
            runner.close()
            raise
        return cls(runner, session)

    def close(self) -> None:
        """Reset the clock and release the GPU and the connections."""
        try:
            self._runner.run(self._session.close())
        finally:
            self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def setup_description(self) -> dict[str, Any]:
        """The GPU, the engine and how its iterations were timed; no URLs, so a moved engine resumes."""
        config, limits = self._session.config, self._limits
        return {
            "target": "live",
            "gpu": self._session.actuator.name,
            "model": config.model_name,
            "tp": limits.tp,
            "engine": {
                "kind": config.engine,
                "api": config.api,
                "max_batch_size": limits.max_batch_size,
                "max_num_tokens": limits.max_num_tokens,
                "tokens_per_block": limits.tokens_per_block,
                "kv_blocks": limits.kv_blocks,
                "max_seq_len": limits.max_seq_len,
            },
            "timing": "iteration_latency" if config.engine == "trtllm-serve" else "decode_window_mean",
        }

    def supported_clocks_mhz(self) -> tuple[int, ...]:
        """The clocks the actuator accepts."""
        return self._session.clocks_mhz

    def limits(self) -> ProfileLimits:
        """The engine's limits: build limits as configured, KV cache as the engine reports it."""
        return self._limits

    def run_point(
        self, clock_mhz: int, prompts: Sequence[int], outputs: Sequence[int], point: int
    ) -> list[Row]:
        """Run one point on the engine (see ProfileTarget); may return no row (Triton, short points)."""
        matched = self._runner.run(self._session.run_point(clock_mhz, prompts, outputs, point))
        self.kept += len(matched.rows)
        self.dropped += matched.dropped
        if not matched.rows:
            self.empty_points += 1
            log.warning(
                "point %d at %d MHz gave no row (%d records dropped)", point, clock_mhz, matched.dropped
            )
        return list(matched.rows)
