"""Assemble and run the twin server: the HTTP port in one server's API, its metrics, and the engine loop.

`ServeConfig.api` picks the server the twin stands in for:

- `triton` (default): Triton's HTTP port (`http_api`) and its metrics port (`metrics`), fed by
  Triton's two pollers; trtllm-serve's iteration stats on the HTTP port if asked;
- `vllm`: vLLM's OpenAI-compatible server with its Prometheus `/metrics` on the HTTP port
  (`openai_api`, `vllm_metrics`); no metrics port;
- `trtllm-serve`: trtllm-serve's OpenAI-compatible server with its drained iteration stats
  `/metrics`; no metrics port.

Every API keeps the twin GPU endpoint on the HTTP port. One place starts every task (the engine
driver and, for Triton, its two pollers), under a TaskGroup: if one dies the others stop and the
failure surfaces to the caller. Ports may be 0 (any free port); the bound ports are announced in
one JSON line on stdout (`metrics_port` null without a metrics port).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import TextIO

from aiohttp import web

from agent.twin.server.collectors import (
    DcgmSampler,
    IterationStatsQueue,
    IterationStatsWriter,
    RequestCounters,
    poll_engine_stats,
    poll_gpu,
)
from agent.twin.server.gpu_control import GpuControl, gpu_uuids
from agent.twin.server.http_api import triton_app
from agent.twin.server.metrics import TritonMetrics, metrics_app
from agent.twin.server.openai_api import openai_app
from agent.twin.server.realtime import RealtimeTwin, TwinClock, TwinObserver
from agent.twin.server.vllm_metrics import VllmMetrics
from agent.twin.setup import TwinSetup

SHUTDOWN_TIMEOUT_S = 2.0  # open connections get this long to finish on shutdown


class ServeApi(StrEnum):
    """The server whose API the HTTP port speaks."""

    TRITON = "triton"
    TRTLLM_SERVE = "trtllm-serve"
    VLLM = "vllm"


TRITON_MODEL_NAME = "ensemble"  # the stock TRT-LLM ensemble Triton clients address


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """How the twin server listens and paces itself."""

    host: str = "127.0.0.1"  # address both ports bind to
    http_port: int = 8000  # the API's port (requests, health, GPU control, OpenAI metrics); 0: any free
    metrics_port: int = 8002  # Triton's metrics port; 0: any free port; unused by the OpenAI APIs
    model_name: str | None = None  # the model clients address; None: "ensemble" (Triton), the catalog name
    time_scale: float = 1.0  # twin time runs this many times faster than the wall clock
    stats_period_ms: float = 100.0  # backend's stats_check_period_ms, twin time (Triton)
    metrics_interval_ms: float = 2000.0  # Triton's --metrics-interval-ms (GPU metrics), twin time
    iteration_stats_stdout: bool = False  # write each iteration's executor JSON to stdout
    iteration_stats_endpoint: bool = False  # Triton: also answer trtllm-serve's GET /metrics on the HTTP port
    api: ServeApi = ServeApi.TRITON  # the server the twin stands in for
    # Triton: the ensemble's transaction policy, TRT-LLM's `decoupled_mode`. Decoupled streams per
    # token and refuses HTTP infer (501, as Triton does); not decoupled serves infer and one
    # response per request.
    decoupled: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "api", ServeApi(self.api))
        except ValueError:
            choices = ", ".join(api.value for api in ServeApi)
            raise ValueError(f"api must be one of {choices}, got {self.api!r}") from None
        for name in ("http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {getattr(self, name)}")
        for name in ("time_scale", "stats_period_ms", "metrics_interval_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model_name is not None:
            if not self.model_name:
                raise ValueError("the model name must not be empty")
            if self.api is ServeApi.TRITON and "/" in self.model_name:
                raise ValueError(
                    f"model name {self.model_name!r} must contain no '/' (Triton puts it in paths)"
                )
        if self.iteration_stats_endpoint and self.api is not ServeApi.TRITON:
            raise ValueError(
                "the iteration stats endpoint is an option of the triton API: trtllm-serve always "
                "serves it, and vLLM's GET /metrics is its Prometheus page"
            )
        if not self.decoupled and self.api is not ServeApi.TRITON:
            raise ValueError("decoupled mode is an option of the triton API's TRT-LLM ensemble")

    def served_model_name(self, setup: TwinSetup) -> str:
        """The model name clients address: as configured, else the API's default."""
        if self.model_name is not None:
            return self.model_name
        return TRITON_MODEL_NAME if self.api is ServeApi.TRITON else setup.model.name


class _Stopped(Exception):
    """Raised inside the task group to end it on request."""


class TwinServer:
    """The twin, its metrics and its HTTP apps; `start`, then `run` until stopped, then `close`."""

    def __init__(self, setup: TwinSetup, config: ServeConfig, out: TextIO) -> None:
        self.config = config
        self.model_name = config.served_model_name(setup)
        uuids = gpu_uuids(setup)
        triton = config.api is ServeApi.TRITON
        # Triton's families and the vLLM page exist only for their API.
        self.metrics = TritonMetrics([self.model_name], uuids) if triton else None
        self.vllm_metrics = VllmMetrics(self.model_name) if config.api is ServeApi.VLLM else None
        observers: list[TwinObserver] = []
        if self.metrics is not None:
            observers.append(RequestCounters(self.metrics))
        if self.vllm_metrics is not None:
            observers.append(self.vllm_metrics)
        if config.iteration_stats_stdout:
            observers.append(IterationStatsWriter(out))
        serves_stats = config.api is ServeApi.TRTLLM_SERVE or config.iteration_stats_endpoint
        stats_queue = IterationStatsQueue() if serves_stats else None
        if stats_queue is not None:
            observers.append(stats_queue)
        self.runtime = RealtimeTwin(setup, TwinClock(config.time_scale), observers)
        if self.vllm_metrics is not None:
            self.vllm_metrics.watch(self.runtime.engine)
        self.gpu = GpuControl(self.runtime, uuids)
        if triton:
            http_app = triton_app(
                self.runtime, self.model_name, self.gpu, stats_queue, decoupled=config.decoupled
            )
        else:
            http_app = openai_app(
                self.runtime,
                self.model_name,
                self.gpu,
                vllm_metrics=self.vllm_metrics,
                iteration_stats=stats_queue,
            )
        self._http_runner = web.AppRunner(http_app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self._metrics_runner = (
            web.AppRunner(metrics_app(self.metrics), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
            if self.metrics is not None
            else None
        )
        self.http_port = config.http_port
        self.metrics_port: int | None = config.metrics_port if triton else None
        self.task: asyncio.Task[None] | None = None  # `run`, once `running_server` started it

    async def _bind(self, runner: web.AppRunner, port: int) -> int:
        await runner.setup()
        await web.TCPSite(runner, self.config.host, port).start()
        return runner.addresses[0][1]

    async def start(self) -> None:
        """Bind the ports (OSError if one is taken); twin time starts now."""
        self.runtime.clock.restart()
        self.http_port = await self._bind(self._http_runner, self.config.http_port)
        if self._metrics_runner is not None:
            self.metrics_port = await self._bind(self._metrics_runner, self.config.metrics_port)

    async def run(self, stop: asyncio.Event) -> None:
        """Drive the engine and the pollers until `stop` is set; a task that fails ends the run."""
        config = self.config
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.runtime.run(), name="twin-engine")
                if self.metrics is not None:
                    group.create_task(
                        poll_engine_stats(self.runtime, self.metrics, config.stats_period_ms / 1000.0),
                        name="trtllm-stats-poller",
                    )
                    group.create_task(
                        poll_gpu(
                            DcgmSampler(self.runtime), self.metrics, config.metrics_interval_ms / 1000.0
                        ),
                        name="dcgm-poller",
                    )
                await stop.wait()
                raise _Stopped
        except* _Stopped:
            pass

    async def close(self) -> None:
        """Close connections and unbind."""
        for runner in (self._http_runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()

    def listening_line(self) -> str:
        """The start-up announcement: one JSON object."""
        return json.dumps(
            {
                "event": "listening",
                "host": self.config.host,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "model_name": self.model_name,
                "time_scale": self.config.time_scale,
                "api": self.config.api.value,
            }
        )


@asynccontextmanager
async def running_server(
    setup: TwinSetup, config: ServeConfig, out: TextIO = sys.stdout
) -> AsyncIterator[TwinServer]:
    """A started server with its tasks running; on exit it stops, re-raising a task's failure."""
    server = TwinServer(setup, config, out)
    try:
        await server.start()
        stop = asyncio.Event()
        server.task = asyncio.create_task(server.run(stop), name="twin-server")
        try:
            yield server
        finally:
            stop.set()
            await server.task
    finally:
        await server.close()


async def serve(setup: TwinSetup, config: ServeConfig, out: TextIO = sys.stdout) -> None:
    """Serve until SIGINT or SIGTERM (or until a task fails, which raises)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(setup, config, out) as server:
        out.write(server.listening_line() + "\n")
        out.flush()
        assert server.task is not None
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopper, server.task], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        with suppress(asyncio.CancelledError):
            await stopper
