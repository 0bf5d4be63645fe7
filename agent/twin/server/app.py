"""Assemble and run the twin server: Triton's HTTP port, its metrics port, and the engine loop.

One place starts every task (the engine driver and Triton's two pollers), under a TaskGroup:
if one dies the others stop and the failure surfaces to the caller. Ports may be 0 (any free
port); the bound ports are announced in one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
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
from agent.twin.server.realtime import RealtimeTwin, TwinClock, TwinObserver
from agent.twin.setup import TwinSetup

SHUTDOWN_TIMEOUT_S = 2.0  # open connections get this long to finish on shutdown


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """How the twin server listens and paces itself."""

    host: str = "127.0.0.1"  # address both ports bind to
    http_port: int = 8000  # Triton's HTTP port (generate, health, metadata, GPU control); 0: any free port
    metrics_port: int = 8002  # Triton's metrics port; 0: any free port
    model_name: str = "ensemble"  # the model clients address (TRT-LLM gauges keep "tensorrt_llm")
    time_scale: float = 1.0  # twin time runs this many times faster than the wall clock
    stats_period_ms: float = 100.0  # backend's stats_check_period_ms, twin time
    metrics_interval_ms: float = 2000.0  # Triton's --metrics-interval-ms (GPU metrics), twin time
    iteration_stats_stdout: bool = False  # write each iteration's executor JSON to stdout
    iteration_stats_endpoint: bool = False  # also answer trtllm-serve's GET /metrics on the HTTP port

    def __post_init__(self) -> None:
        for name in ("http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {getattr(self, name)}")
        for name in ("time_scale", "stats_period_ms", "metrics_interval_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"model name {self.model_name!r} must be non-empty and contain no '/'")


class _Stopped(Exception):
    """Raised inside the task group to end it on request."""


class TwinServer:
    """The twin, its metrics and its two HTTP apps; `start`, then `run` until stopped, then `close`."""

    def __init__(self, setup: TwinSetup, config: ServeConfig, out: TextIO) -> None:
        self.config = config
        uuids = gpu_uuids(setup)
        self.metrics = TritonMetrics([config.model_name], uuids)
        observers: list[TwinObserver] = [RequestCounters(self.metrics)]
        if config.iteration_stats_stdout:
            observers.append(IterationStatsWriter(out))
        stats_queue = IterationStatsQueue() if config.iteration_stats_endpoint else None
        if stats_queue is not None:
            observers.append(stats_queue)
        self.runtime = RealtimeTwin(setup, TwinClock(config.time_scale), observers)
        self.gpu = GpuControl(self.runtime, uuids)
        self._runners = [
            web.AppRunner(
                triton_app(self.runtime, config.model_name, self.gpu, stats_queue),
                access_log=None,
                shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            ),
            web.AppRunner(metrics_app(self.metrics), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S),
        ]
        self.http_port = config.http_port
        self.metrics_port = config.metrics_port
        self.task: asyncio.Task[None] | None = None  # `run`, once `running_server` started it

    async def start(self) -> None:
        """Bind both ports (OSError if one is taken); twin time starts now."""
        self.runtime.clock.restart()
        ports = (self.config.http_port, self.config.metrics_port)
        bound = []
        for runner, port in zip(self._runners, ports, strict=True):
            await runner.setup()
            await web.TCPSite(runner, self.config.host, port).start()
            bound.append(runner.addresses[0][1])
        self.http_port, self.metrics_port = bound

    async def run(self, stop: asyncio.Event) -> None:
        """Drive the engine and the pollers until `stop` is set; a task that fails ends the run."""
        config = self.config
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.runtime.run(), name="twin-engine")
                group.create_task(
                    poll_engine_stats(self.runtime, self.metrics, config.stats_period_ms / 1000.0),
                    name="trtllm-stats-poller",
                )
                group.create_task(
                    poll_gpu(DcgmSampler(self.runtime), self.metrics, config.metrics_interval_ms / 1000.0),
                    name="dcgm-poller",
                )
                await stop.wait()
                raise _Stopped
        except* _Stopped:
            pass

    async def close(self) -> None:
        """Close connections and unbind."""
        for runner in self._runners:
            await runner.cleanup()

    def listening_line(self) -> str:
        """The start-up announcement: one JSON object."""
        return json.dumps(
            {
                "event": "listening",
                "host": self.config.host,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "model_name": self.config.model_name,
                "time_scale": self.config.time_scale,
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
