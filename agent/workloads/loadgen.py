"""A load generator: replays trace requests over HTTP against Triton's generate_stream, in real time.

Each request is sent at its trace arrival time (divided by `time_scale`) to
`POST {url}/v2/models/{model}/generate_stream` with a synthetic prompt of the right length and the
twin-only keys `prompt_tokens` and `output_tokens` (a real Triton ignores them; the twin uses them
to stop where the trace's request stopped). Every streamed event is one token, as TRT-LLM streams
by default. A 429 or 503 is retried after its Retry-After, up to `max_retries` times; the request's
times keep counting from its scheduled arrival, as a user would experience them.
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
        }
        if slo is not None:
            summary["slo_attainment"] = self.attainment(slo)
        return summary

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


def request_body(request: Request) -> dict[str, object]:
    """The generate_stream body for one trace request."""
    body: dict[str, object] = {
        "text_input": PROMPT_WORD * request.prompt_tokens,
        "max_tokens": request.max_tokens,
        "stream": True,
        "prompt_tokens": request.prompt_tokens,
    }
    if request.output_tokens is not None:
        body["output_tokens"] = min(request.output_tokens, request.max_tokens)
    return body


def _retry_after_s(value: str) -> float:
    """Seconds a 429/503's Retry-After asks to wait (1 s when it does not say a number)."""
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 1.0


async def _stream(
    session: aiohttp.ClientSession, url: str, request: Request, start: float, max_retries: int
) -> RequestResult:
    """Send one request (retrying refusals) and read its event stream."""
    retries = 0
    while True:
        try:
            async with session.post(url, json=request_body(request)) as response:
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
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    payload = json.loads(line[5:])
                    if "error" in payload:
                        error = str(payload["error"])
                        break
                    tokens += 1
                    if tokens == 1:
                        first = time.monotonic() - start
                return RequestResult(
                    request.request_id, 200, first, time.monotonic() - start, tokens, retries, error
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
) -> LoadReport:
    """Replay `requests` against `base_url` at their arrival times; return what each one saw."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    url = f"{base_url.rstrip('/')}/v2/models/{model}/generate_stream"
    began = time.monotonic()
    first_arrival = min((r.arrival_s for r in requests), default=0.0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)

    async def one(session: aiohttp.ClientSession, request: Request) -> RequestResult:
        scheduled = began + (request.arrival_s - first_arrival) / time_scale
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        result = await _stream(session, url, request, scheduled, max_retries)
        if on_result is not None:
            on_result(result)
        return result

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, r) for r in requests))
    return LoadReport(tuple(results), time.monotonic() - began)
