"""What feeds the metrics: Triton's two pollers and the per-request counters, in twin time.

- The TensorRT-LLM backend's stats thread: every `stats_check_period_ms` it drains the
  executor's iteration records and sets the `nv_trt_llm_*` gauges from the last one; with no
  new iteration the gauges keep their values (reference/interfaces.md §1.1).
- Triton's DCGM poll: every half `--metrics-interval-ms` it reads each GPU
  (`core:src/metrics.cc`, `PollDcgmMetrics`): utilisation as an integer percent x 0.01, power
  in watts at NVML's milliwatt resolution, memory in whole MiB, and the energy counter
  incremented by the change in NVML's millijoule counter since the previous poll, so the first
  poll is its baseline. Power and utilisation are means over the last second of twin time.
- Per-request counters and token-length histograms, on each finished or rejected request.
- Optionally, each iteration's executor JSON on stdout, and a queue of iteration records that
  `GET /metrics` on the HTTP port drains, as trtllm-serve's does (reference/interfaces.md §1.6).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from typing import TextIO

from agent.twin.engine import FinishedRequest
from agent.twin.iteration_stats import IterationStats, to_executor_json, triton_gauge_values
from agent.twin.memory import RUNTIME_RESERVED_BYTES, activation_bytes
from agent.twin.server.metrics import FinishedRequestTimes, GpuReading, TritonMetrics
from agent.twin.server.realtime import STATS_RING, Generation, RealtimeTwin, TwinObserver
from agent.twin.setup import TwinSetup

MIB = 1024 * 1024
DCGM_WINDOW_S = 1.0  # NVML averages board power over one second on recent GPUs
MICROS = 1_000_000


def engine_memory_bytes(setup: TwinSetup) -> int:
    """GPU memory TensorRT-LLM holds from load on: weights, activations, runtime and the KV pool."""
    kv_pool = setup.kv_blocks() * setup.engine.tokens_per_block * setup.model.kv_bytes_per_token(setup.tp)
    return (
        setup.model.weight_bytes_per_gpu(setup.tp)
        + activation_bytes(setup.model, setup.tp, setup.engine)
        + RUNTIME_RESERVED_BYTES
        + kv_pool
    )


class DcgmSampler:
    """One GPU of the engine read the way Triton's DCGM poll reads it (every GPU reads the same)."""

    def __init__(self, runtime: RealtimeTwin) -> None:
        self.runtime = runtime
        spec = runtime.setup.gpu
        self._memory_total = spec.memory_bytes // MIB * MIB
        self._memory_used = min(engine_memory_bytes(runtime.setup), spec.memory_bytes) // MIB * MIB
        self._last_energy_mj: int | None = None

    def read(self) -> GpuReading:
        """Sample now."""
        runtime = self.runtime
        now = runtime.now_s()
        gpus = runtime.gpu.count
        energy_mj = math.floor(runtime.meter.energy_j(now) / gpus * 1000.0)
        last = energy_mj if self._last_energy_mj is None else self._last_energy_mj
        self._last_energy_mj = energy_mj
        percent = round(runtime.meter.utilization(now, DCGM_WINDOW_S) * 100.0)
        return GpuReading(
            utilization=percent * 0.01,
            memory_total_bytes=self._memory_total,
            memory_used_bytes=self._memory_used,
            power_w=round(runtime.meter.power_w(now, DCGM_WINDOW_S) / gpus * 1000.0) / 1000.0,
            power_limit_w=runtime.setup.gpu.tdp_w,
            energy_delta_j=(energy_mj - last) * 0.001,
        )


async def poll_engine_stats(runtime: RealtimeTwin, metrics: TritonMetrics, period_s: float) -> None:
    """The backend's stats thread (`period_s` in twin time)."""
    while True:
        await asyncio.sleep(runtime.clock.wall_s(period_s))
        records = runtime.drain_iteration_stats()
        if records:
            metrics.set_engine_gauges(triton_gauge_values(records[-1]))


async def poll_gpu(sampler: DcgmSampler, metrics: TritonMetrics, interval_s: float) -> None:
    """Triton's metrics thread: sleeps half the metrics interval, then polls DCGM."""
    while True:
        await asyncio.sleep(sampler.runtime.clock.wall_s(interval_s / 2))
        metrics.record_gpu(sampler.read())


class RequestCounters(TwinObserver):
    """Per-model counters and token histograms from finished and rejected requests."""

    def __init__(self, metrics: TritonMetrics) -> None:
        self.metrics = metrics

    def on_finished(self, generation: Generation, done: FinishedRequest) -> None:
        """Count a success with its durations (twin time, whole microseconds)."""
        arrival = done.request.arrival_s
        scheduled = arrival if generation.first_scheduled_s is None else generation.first_scheduled_s
        self.metrics.request_succeeded(
            FinishedRequestTimes(
                request_us=round((done.finish_s - arrival) * MICROS),
                queue_us=round((scheduled - arrival) * MICROS),
                compute_us=round((done.finish_s - scheduled) * MICROS),
                input_tokens=done.request.prompt_tokens,
                output_tokens=done.output_tokens,
            )
        )

    def on_rejected(self) -> None:
        """The backend answered with an error."""
        self.metrics.request_failed("BACKEND")


class IterationStatsWriter(TwinObserver):
    """One executor-JSON line per iteration (`--iteration-stats-stdout`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def on_iteration(self, stats: IterationStats) -> None:
        """Write and flush one record."""
        self.out.write(to_executor_json(stats) + "\n")
        self.out.flush()


class IterationStatsQueue(TwinObserver):
    """trtllm-serve's iteration stats queue: every record is returned once, the oldest dropped past a bound.

    The bound is TRT-LLM's `iter_stats_max_iterations` (1000 by default), so a twin nobody reads
    holds a fixed amount of memory.
    """

    def __init__(self, max_records: int = STATS_RING) -> None:
        self._records: deque[IterationStats] = deque(maxlen=max_records)

    def on_iteration(self, stats: IterationStats) -> None:
        """Queue one record."""
        self._records.append(stats)

    def drain_json(self) -> str:
        """The records since the last call as trtllm-serve answers them, and forget them.

        trtllm-serve parses each executor JSON record into a dict and returns the list through
        Starlette's `JSONResponse`: compact separators, keys in the executor's (sorted) order.
        """
        records = [json.loads(to_executor_json(stats)) for stats in self._records]
        self._records.clear()
        return json.dumps(records, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
