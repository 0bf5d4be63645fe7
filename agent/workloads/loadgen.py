"""A load generator: replays trace requests over HTTP against Triton's generate_stream, in real time.

Each request is sent at its trace arrival time (divided by `time_scale`) to
`POST {url}/v2/models/{model}/generate_stream` with a synthetic prompt of the right length and the
twin-only keys `prompt_tokens` and `output_tokens` (a real Triton ignores them; the twin uses them
to stop where the trace's request stopped). Every streamed event is one token, as TRT-LLM streams
by default. A 429 or 503 is retried after its Retry-After, up to `max_retries` times; the request's
times keep counting from its scheduled arrival, as a user would experience them.

Two opt-in records per token (`TokenRecording`), for latency studies: `times` keeps when each
token arrived (token gaps: the client's view of time between tokens), and `lags` asks the engine
for TRT-LLM's `return_perf_metrics` outputs and keeps, per event, how long after the engine's
`last_token_time_ns` the client read it (the delivery lag), and how long after the client sent
the request the engine stamped its `arrival_time_ns` (the request lag). Both compare this host's
wall clock with the engine's: meaningful on loopback with a twin running at time scale 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from agent.domain import Request
from agent.slo_presets import SloPreset, meets_slo

log = logging.getLogger(__name__)

PROMPT_WORD = "tok "  # 4 characters: gateways that estimate 4 characters per token count exactly
RETRY_STATUSES = (429, 503)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What one request saw, in seconds from its scheduled arrival (NaN: never happened)."""

    request_id: int
    status: int  # final HTTP status; 0 when the connection failed
    ttft_s: float
    e2e_s: float
    output_tokens: int
    retries: int
    error: str | None = None
    token_times_s: tuple[float, ...] = ()  # each token's arrival, from scheduled arrival
    token_lags_s: tuple[float, ...] = ()  # per event: client read time - engine's last token time
    request_lag_s: float = math.nan  # engine's arrival stamp - client send time (lags recorded)

    @property
    def token_gaps_s(self) -> np.ndarray:
        """Time between consecutive tokens as the client saw them (empty unless tokens were recorded)."""
        return np.diff(np.asarray(self.token_times_s, dtype=float))

    @property
    def answered(self) -> bool:
        """Completed with every token it asked for streamed back."""
        return self.status == 200 and self.error is None

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Every request's result and how long the replay took."""

    results: tuple[RequestResult, ...]
    wall_s: float

    def summary(self, slo: SloPreset | None = None) -> dict[str, float | int | None]:
        """Counts, latency percentiles and (given an SLO) attainment over all requests sent."""
        answered = [r for r in self.results if r.answered]
        ttft = np.array([r.ttft_s for r in answered])
        tpot = np.array([r.tpot_s for r in answered])
        e2e = np.array([r.e2e_s for r in answered])

        def pct(values: np.ndarray, q: float) -> float | None:
            values = values[~np.isnan(values)]
            return float(np.percentile(values, q)) if len(values) else None

        gaps = self.token_gaps_s()
        summary: dict[str, float | int | None] = {
            "requests": len(self.results),
            "answered": len(answered),
            "rejected": sum(r.status in RETRY_STATUSES for r in self.results),
            "failed": sum(not r.answered and r.status not in RETRY_STATUSES for r in self.results),
            "retries": sum(r.retries for r in self.results),
            "output_tokens": sum(r.output_tokens for r in answered),
            "wall_s": self.wall_s,
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50),
            "tpot_p99_s": pct(tpot, 99),
            "e2e_p50_s": pct(e2e, 50),
            "e2e_p99_s": pct(e2e, 99),
            "tbt_p50_s": pct(gaps, 50),  # None unless token times were recorded
            "tbt_p99_s": pct(gaps, 99),
        }
        if slo is not None:
            summary["slo_attainment"] = self.attainment(slo)
        return summary

    def token_gaps_s(self) -> np.ndarray:
        """Every gap between consecutive tokens of the answered requests (empty unless recorded)."""
        gaps = [r.token_gaps_s for r in self.results if r.answered]
        return np.concatenate(gaps) if gaps else np.empty(0)

    def attainment(self, slo: SloPreset) -> float | None:
        """Share of all requests sent that were answered within every target (unanswered ones miss)."""
        if not self.results:
            return None
        answered = [r for r in self.results if r.answered]
        if not answered:
            return 0.0
        ok = meets_slo(
            slo,
            np.array([r.ttft_s for r in answered]),
            np.array([r.tpot_s for r in answered]),
            np.array([r.e2e_s for r in answered]),
            np.array([max(r.output_tokens, 1) for r in answered]),
        )
        return float(ok.sum()) / len(self.results)


def request_body(request: Request, perf_metrics: bool = False) -> dict[str, object]:
    """The generate_stream body for one trace request (asking for TRT-LLM's perf metrics if told)."""
    body: dict[str, object] = {
        "text_input": PROMPT_WORD * request.prompt_tokens,
        "max_tokens": request.max_tokens,
        "stream": True,
        "prompt_tokens": request.prompt_tokens,
    }
    if request.output_tokens is not None:
        body["output_tokens"] = min(request.output_tokens, request.max_tokens)
    if perf_metrics:
        body["return_perf_metrics"] = True
    return body


@dataclass(frozen=True, slots=True)
class TokenRecording:
    """Which per-token records `generate_load` keeps (both off: counts and times only)."""

    times: bool = False  # each token's arrival time
    lags: bool = False  # ask for perf metrics and keep each event's delivery lag


def _retry_after_s(value: str) -> float:
    """Seconds a 429/503's Retry-After asks to wait (1 s when it does not say a number)."""
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 1.0


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    request: Request,
    start: float,
    max_retries: int,
    record: TokenRecording,
) -> RequestResult:
    """Send one request (retrying refusals) and read its event stream."""
    retries = 0
    body = request_body(request, perf_metrics=record.lags)
    while True:
        sent_wall_s = time.time()
        try:
            async with session.post(url, json=body) as response:
                if response.status in RETRY_STATUSES and retries < max_retries:
                    retries += 1
                    await asyncio.sleep(_retry_after_s(response.headers.get("Retry-After", "1")))
                    continue
                if response.status != 200:
                    text = (await response.text())[:200]
                    return RequestResult(
                        request.request_id, response.status, math.nan, math.nan, 0, retries, text
                    )
                first = math.nan
                tokens = 0
                error = None
                times: list[float] = []
                lags: list[float] = []
                request_lag = math.nan
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    payload = json.loads(line[5:])
                    if "error" in payload:
                        error = str(payload["error"])
                        break
                    tokens += 1
                    now = time.monotonic() - start
                    if tokens == 1:
                        first = now
                    if record.times:
                        times.append(now)
                    if record.lags and "last_token_time_ns" in payload:
                        lags.append(time.time() - payload["last_token_time_ns"] / 1e9)
                    if record.lags and tokens == 1 and "arrival_time_ns" in payload:
                        request_lag = payload["arrival_time_ns"] / 1e9 - sent_wall_s
                return RequestResult(
                    request.request_id,
                    200,
                    first,
                    time.monotonic() - start,
                    tokens,
                    retries,
                    error,
                    tuple(times),
                    tuple(lags),
                    request_lag,
                )
        except (aiohttp.ClientError, json.JSONDecodeError, TimeoutError) as exc:
            return RequestResult(request.request_id, 0, math.nan, math.nan, 0, retries, repr(exc))


async def generate_load(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    *,
    time_scale: float = 1.0,
    max_retries: int = 3,
    on_result: Callable[[RequestResult], None] | None = None,
    record: TokenRecording | None = None,
) -> LoadReport:
    """Replay `requests` against `base_url` at their arrival times; return what each one saw."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    url = f"{base_url.rstrip('/')}/v2/models/{model}/generate_stream"
    recording = record or TokenRecording()
    began = time.monotonic()
    first_arrival = min((r.arrival_s for r in requests), default=0.0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)

    async def one(session: aiohttp.ClientSession, request: Request) -> RequestResult:
        scheduled = began + (request.arrival_s - first_arrival) / time_scale
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        result = await _stream(session, url, request, scheduled, max_retries, recording)
        if on_result is not None:
            on_result(result)
        return result

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, r) for r in requests))
    return LoadReport(tuple(results), time.monotonic() - began)
