"""The twin engine on the twin GPU, driven against the wall clock instead of virtual time.

The loop is the simulator's (schedule, cost at the clock in force, run, complete), sharing its
step (`agent.twin.step`), except that each iteration is awaited: the driver sleeps until the
iteration's end on the wall clock, then delivers the tokens it produced to the HTTP handlers
waiting on them. With nothing to do it sleeps until a request arrives and books the gap as idle energy.

Twin time starts at 0 and runs `time_scale` times faster than the wall clock; iteration
durations, energy, token timestamps and every statistic are in twin time. The driver keeps its
own cursor: each iteration starts exactly where the previous one ended, and if the host falls
behind (sleeps overshoot, a busy loop) the following iterations start at once until it catches
up, so twin-time figures stay exact. A request arriving while an iteration runs is stamped no
later than that iteration's end, the earliest moment the engine could see it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from operator import methodcaller
from typing import Protocol

from agent.domain import Request
from agent.twin.engine import Batch, Engine, FinishedRequest, IterationOutcome, RequestRejectedError
from agent.twin.gpu import EngineGpus
from agent.twin.iteration_stats import IterationStats
from agent.twin.server.meter import GpuMeter
from agent.twin.setup import TwinSetup
from agent.twin.step import Jitter, engine_stats, iteration_stats, run_on_gpu

log = logging.getLogger(__name__)

STATS_RING = 1000  # iteration records kept for the stats poller (TRT-LLM's iter_stats_max_iterations)
LAG_WARNING_S = 1.0  # twin seconds behind the wall clock before we say the host cannot keep up


class TwinClock:
    """Twin time on the wall clock: 0 at creation, running `scale` times faster than real time."""

    def __init__(self, scale: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        if not scale > 0:
            raise ValueError(f"time scale must be > 0, got {scale}")
        self.scale = scale
        self._monotonic = monotonic
        self._origin = monotonic()
        self.epoch_s = time.time()  # wall-clock epoch seconds of twin time 0

    def restart(self) -> None:
        """Make now twin time 0 (before anything has been timed, e.g. when the ports open)."""
        self._origin = self._monotonic()
        self.epoch_s = time.time()

    def now_s(self) -> float:
        """Twin seconds since start."""
        return (self._monotonic() - self._origin) * self.scale

    def wall_s(self, twin_s: float) -> float:
        """How long `twin_s` of twin time lasts on the wall clock."""
        return twin_s / self.scale

    def wall_delay_s(self, until_twin_s: float) -> float:
        """Wall seconds from now until twin time `until_twin_s` (0 if already past)."""
        return max(0.0, self.wall_s(until_twin_s - self.now_s()))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One response for a request: new tokens, or the error that ended it."""

    tokens: int  # tokens this response carries
    time_s: float  # twin time they were produced (end of their iteration)
    final: bool  # no response follows
    error: str | None = None


class Generation:
    """A request in flight, as its HTTP handler sees it: responses arrive on a queue."""

    def __init__(self, request: Request, stream: bool) -> None:
        self.request = request
        self.stream = stream  # one response per token; otherwise one response at the end
        self.first_scheduled_s: float | None = None  # start of the iteration that began its prefill
        self.first_token_s: float | None = None
        self.tokens = 0  # tokens delivered so far
        self._chunks: asyncio.Queue[Chunk] = asyncio.Queue()

    def deliver(self, chunk: Chunk) -> None:
        """Queue a response (called by the driver)."""
        self.tokens += chunk.tokens
        self._chunks.put_nowait(chunk)

    async def responses(self) -> AsyncIterator[Chunk]:
        """Every response until the final one."""
        while True:
            chunk = await self._chunks.get()
            yield chunk
            if chunk.final:
                return


class TwinObserver:
    """What happens inside the driver; subclasses override what they need (the base does nothing)."""

    def on_iteration(self, stats: IterationStats) -> None:
        """An iteration completed."""

    def on_finished(self, generation: Generation, done: FinishedRequest) -> None:
        """A request produced its last token."""

    def on_rejected(self) -> None:
        """The engine refused a request (it can never fit)."""


class _EngineSeq(Protocol):
    """The engine's view of one request, as `Batch.context` exposes it."""

    request: Request
    prefilled: int
    context_len: int
    decode_start_iter: int  # -1 when not decoding (finished, paused or in prefill)


class RealtimeTwin:
    """One engine on one GPU, serving requests in real time (scaled by the clock)."""

    def __init__(self, setup: TwinSetup, clock: TwinClock, observers: Sequence[TwinObserver] = ()) -> None:
        self.setup = setup
        self.clock = clock
        self.gpu = EngineGpus(setup.gpu, setup.tp, setup.clock_change_delay_s)
        self.engine = Engine(setup.engine, setup.kv_blocks(), setup.max_seq_len)
        self.latency = setup.latency_model()
        self.meter = GpuMeter(self.gpu)
        self.running = False  # the driver loop is up (readiness)
        self.max_lag_s = 0.0  # furthest the driver has fallen behind the clock, twin seconds
        self.observer_errors = 0  # observer calls that raised (telemetry never stops the engine)
        self._jitter = Jitter(setup.noise, setup.seed)
        self._observers = list(observers)
        self._cursor_s = 0.0  # where the next iteration starts
        self._running_until_s = math.inf  # end of the iteration in progress (start of the next when waking)
        self._wake = asyncio.Event()
        self._idle = False  # the driver waits for a request
        self._woken_at_s = 0.0  # arrival of the request that ended the last idle gap
        self._next_id = 0
        self._live: dict[int, Generation] = {}
        self._stream_decoders: dict[int, _EngineSeq] = {}  # streamed requests in their decode phase
        self._records: deque[IterationStats] = deque(maxlen=STATS_RING)

    def now_s(self) -> float:
        """Twin time as the engine sees it: never past the end of the iteration in progress."""
        return min(self.clock.now_s(), self._running_until_s)

    def submit(
        self, prompt_tokens: int, max_tokens: int, output_tokens: int | None, stream: bool
    ) -> Generation:
        """Queue a request; raises RequestRejectedError if the engine can never serve it."""
        self._next_id += 1
        request = Request(self._next_id, self.now_s(), prompt_tokens, max_tokens, output_tokens)
        try:
            self.engine.submit(request)
        except RequestRejectedError:
            self._notify(methodcaller("on_rejected"))
            raise
        generation = Generation(request, stream)
        self._live[request.request_id] = generation
        if self._idle and not self._wake.is_set():
            # The engine starts now: requests arriving before the driver runs join that iteration.
            self._woken_at_s = self._running_until_s = request.arrival_s
            self._wake.set()
        return generation

    def drain_iteration_stats(self) -> list[IterationStats]:
        """Iteration records since the last call (the oldest dropped past `STATS_RING`)."""
        records = list(self._records)
        self._records.clear()
        return records

    async def run(self) -> None:
        """Serve until cancelled; requests still in flight then end with an error response."""
        self.running = True
        try:
            while True:
                batch = self.engine.schedule() if self.engine.has_work() else None
                if batch is None or batch.tokens == 0:
                    await self._wait_for_work()
                else:
                    await self._iterate(batch)
        finally:
            self.running = False
            for generation in self._live.values():
                generation.deliver(
                    Chunk(0, self._cursor_s, final=True, error="the twin server is shutting down")
                )
            self._live.clear()

    async def _wait_for_work(self) -> None:
        """Idle until a request arrives; the gap is booked as idle energy.

        The next iteration starts when the request arrived, not when this task got to run: the
        host's wake-up latency, multiplied by the time scale, is not the engine's.
        """
        self.meter.go_idle()
        self._running_until_s = math.inf
        self._wake.clear()
        self._idle = True
        await self._wake.wait()
        self._idle = False
        # A reading of the idle GPU may already have booked idle time past the arrival.
        self._cursor_s = max(self._cursor_s, self._woken_at_s, self.meter.booked_until_s)
        self.meter.settle(self._cursor_s)

    async def _iterate(self, batch: Batch) -> None:
        start = self._cursor_s
        decoding = self._running_stream_decoders()
        for seq, (_, past) in zip(batch.context, batch.prefill_chunks, strict=True):
            generation = self._live[seq.request.request_id]
            if past == 0 and generation.first_scheduled_s is None:
                generation.first_scheduled_s = start
        run = run_on_gpu(self.gpu, self.latency, batch, start, self._jitter)
        self.meter.busy(start, run.end_s, run.power_w, run.cost.busy_fraction)
        self._running_until_s = run.end_s
        await asyncio.sleep(self.clock.wall_delay_s(run.end_s))
        self._note_lag(run.end_s)
        outcome = self.engine.complete(batch, start, run.end_s)
        self._cursor_s = run.end_s
        self._deliver(batch, outcome, decoding)
        stats = engine_stats(self.engine, batch, outcome, run.end_s, run.duration_s)
        record = iteration_stats(self.setup, batch, outcome, stats, self.clock.epoch_s)
        self._records.append(record)
        self._notify(methodcaller("on_iteration", record))

    def _running_stream_decoders(self) -> list[Generation]:
        """Streamed requests that decode in the batch just scheduled (paused ones drop out)."""
        running: list[Generation] = []
        for request_id, seq in list(self._stream_decoders.items()):
            if seq.decode_start_iter < 0:  # paused by the scheduler: rejoins when its recompute ends
                del self._stream_decoders[request_id]
            else:
                running.append(self._live[request_id])
        return running

    def _deliver(self, batch: Batch, outcome: IterationOutcome, decoding: list[Generation]) -> None:
        """Hand each waiting handler what this iteration produced."""
        end = outcome.end_s
        finished = {done.request.request_id: done for done in outcome.finished}
        for request_id in outcome.first_token_ids:
            self._live[request_id].first_token_s = end
        for generation in decoding:
            if generation.request.request_id not in finished:
                generation.deliver(Chunk(1, end, final=False))
        for seq in batch.context:
            request_id = seq.request.request_id
            generation = self._live[request_id]
            if generation.stream and request_id not in finished and seq.prefilled >= seq.context_len:
                generation.deliver(Chunk(1, end, final=False))  # prefill done: first (or resumed) token
                self._stream_decoders[request_id] = seq
        for request_id, done in finished.items():
            generation = self._live.pop(request_id)
            self._stream_decoders.pop(request_id, None)
            generation.deliver(Chunk(1 if generation.stream else done.output_tokens, end, final=True))
            self._notify(methodcaller("on_finished", generation, done))

    def _notify(self, call: Callable[[TwinObserver], None]) -> None:
        """Tell every observer; one that fails is logged and counted, and serving goes on."""
        for observer in self._observers:
            try:
                call(observer)
            except Exception:
                self.observer_errors += 1
                if self.observer_errors == 1:
                    log.exception(
                        "observer %s failed (later failures are only counted)", type(observer).__name__
                    )

    def _note_lag(self, due_s: float) -> None:
        lag = self.clock.now_s() - due_s
        if lag > LAG_WARNING_S >= self.max_lag_s:
            log.warning(
                "the twin runs %.1f twin seconds behind the clock: the host cannot keep up with "
                "--time-scale %g; lower it",
                lag,
                self.clock.scale,
            )
        self.max_lag_s = max(self.max_lag_s, lag)
