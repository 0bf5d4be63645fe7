"""A load generator: replays trace requests over HTTP in real time, against Triton or an OpenAI API.

Each request is sent at its trace arrival time (divided by `time_scale`), in one of three APIs
(`LoadApi`):

- `triton`: `POST {url}/v2/models/{model}/generate_stream`; every streamed event is one token,
  as TRT-LLM streams by default;
- `openai-completions` / `openai-chat`: `POST {url}/v1/completions` or `/v1/chat/completions`
  through the official `openai` SDK, streamed with the usage chunk (`agent.workloads.openai_client`).

Prompts have the traced length (`PROMPT_WORD` repeated) and the body carries the twin-only keys
`prompt_tokens` and `output_tokens` (unless `twin_keys` is off): the twin stops where the trace's
request stopped; vLLM and Triton ignore them, a real trtllm-serve refuses unknown keys. A 429 or
503 is retried after its Retry-After, up to `max_retries` times, whatever the API; the request's
times keep counting from its scheduled arrival, as a user would experience them.

With an `energy_url` (the sidecar's HTTP port), each finished request's energy is read from
`GET {energy_url}/v1/requests/{id}/energy`, the id being the gateway's `X-Throttllem-Request-Id`
response header (`agent.workloads.request_energy`). It is read in the request's own task after
its answer, so it never delays another request's send.

Two opt-in records per token (`TokenRecording`), for latency studies: `times` keeps when each
token arrived (token gaps: the client's view of time between tokens), and `lags` (Triton only)
asks the engine for TRT-LLM's `return_perf_metrics` outputs and keeps, per event, how long after
the engine's `last_token_time_ns` the client read it (the delivery lag), and how long after the
client sent the request the engine stamped its `arrival_time_ns` (the request lag). Both compare
this host's wall clock with the engine's: meaningful on loopback with a twin at time scale 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp
import numpy as np

from agent.domain import Request
from agent.slo_presets import SloPreset, meets_slo
from agent.workloads.request_energy import REQUEST_ID_HEADER, RequestEnergyReader

log = logging.getLogger(__name__)

PROMPT_WORD = "tok "  # 4 characters: gateways that estimate 4 characters per token count exactly
RETRY_STATUSES = (429, 503)
TRITON_MODEL_NAME = "ensemble"  # what a Triton TRT-LLM model repository serves, and the twin as Triton
ERROR_TEXT_CHARS = 200  # of an error answer's body, kept in the result


class LoadApi(enum.StrEnum):
    """The API the load generator speaks."""

    TRITON = "triton"  # Triton's generate_stream (the twin's default API)
    OPENAI_COMPLETIONS = "openai-completions"  # POST /v1/completions (vLLM, trtllm-serve)
    OPENAI_CHAT = "openai-chat"  # POST /v1/chat/completions (vLLM, trtllm-serve)

    @property
    def is_openai(self) -> bool:
        """An OpenAI-compatible API (served under /v1)."""
        return self is not LoadApi.TRITON


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
    gateway_request_id: str | None = None  # the gateway's X-Throttllem-Request-Id; None: not sent
    energy_j: float | None = None  # GPU energy the sidecar attributed to it; None: not read or unknown

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
class Refusal:
    """A 429 or 503: the server asks to come back after `retry_after_s`."""

    status: int
    retry_after_s: float
    text: str  # the start of its body
    gateway_request_id: str | None


def failed(request: Request, status: int, error: str, gateway_request_id: str | None = None) -> RequestResult:
    """A request that got no tokens: refused, an error status, or no connection (status 0)."""
    return RequestResult(
        request.request_id, status, math.nan, math.nan, 0, 0, error, gateway_request_id=gateway_request_id
    )


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Every request's result and how long the replay took."""

    results: tuple[RequestResult, ...]
    wall_s: float  # from the first scheduled send to the last answer
    energy_read: bool = False  # per-request energy was asked for (the summary then reports it)

    def summary(self, slo: SloPreset | None = None) -> dict[str, float | int | None]:
        """Counts, latency percentiles, (given an SLO) attainment and (when read) attributed energy."""
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
        if self.energy_read:
            summary.update(attributed_energy(answered))
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


def attributed_energy(answered: Sequence[RequestResult]) -> dict[str, float | int | None]:
    """Energy the sidecar attributed to the answered requests, and per output token of those it knew."""
    known = [r for r in answered if r.energy_j is not None]
    energy_j = sum(r.energy_j for r in known if r.energy_j is not None)
    tokens = sum(r.output_tokens for r in known)
    return {
        "attributed_requests": len(known),  # answered requests whose energy is known
        "attributed_energy_j": energy_j if known else None,
        "attributed_j_per_token": energy_j / tokens if tokens else None,
    }


def twin_keys(request: Request) -> dict[str, int]:
    """The body keys the twin honours: the traced prompt length and where the traced answer stopped."""
    keys = {"prompt_tokens": request.prompt_tokens}
    if request.output_tokens is not None:
        keys["output_tokens"] = min(request.output_tokens, request.max_tokens)
    return keys


def request_body(
    request: Request, perf_metrics: bool = False, with_twin_keys: bool = True
) -> dict[str, object]:
    """The generate_stream body for one trace request (asking for TRT-LLM's perf metrics if told)."""
    body: dict[str, object] = {
        "text_input": PROMPT_WORD * request.prompt_tokens,
        "max_tokens": request.max_tokens,
        "stream": True,
    }
    if with_twin_keys:
        body.update(twin_keys(request))
    if perf_metrics:
        body["return_perf_metrics"] = True
    return body


@dataclass(frozen=True, slots=True)
class TokenRecording:
    """Which per-token records `generate_load` keeps (both off: counts and times only)."""

    times: bool = False  # each token's arrival time
    lags: bool = False  # ask for perf metrics and keep each event's delivery lag (Triton only)


def retry_after_s(value: str) -> float:
    """Seconds a 429/503's Retry-After asks to wait (1 s when it does not say a number)."""
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 1.0


class Streamer(Protocol):
    """One API's way to send one request and read its answer."""

    async def attempt(self, request: Request, start: float) -> RequestResult | Refusal:
        """Send `request` once; times from `start` (monotonic); a refusal is returned, not retried."""
        ...


class TritonStreamer:
    """Triton's generate_stream over aiohttp: one `data:` event per token."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, record: TokenRecording, with_twin_keys: bool
    ) -> None:
        self._session = session
        self._url = url
        self._record = record
        self._with_twin_keys = with_twin_keys

    async def attempt(self, request: Request, start: float) -> RequestResult | Refusal:
        """POST the body, read the event stream (see the module docstring)."""
        record = self._record
        body = request_body(request, perf_metrics=record.lags, with_twin_keys=self._with_twin_keys)
        sent_wall_s = time.time()
        try:
            async with self._session.post(self._url, json=body) as response:
                ref = response.headers.get(REQUEST_ID_HEADER)
                if response.status != 200:
                    text = (await response.text())[:ERROR_TEXT_CHARS]
                    if response.status in RETRY_STATUSES:
                        wait_s = retry_after_s(response.headers.get("Retry-After", "1"))
                        return Refusal(response.status, wait_s, text, ref)
                    return failed(request, response.status, text, ref)
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
                    0,
                    error,
                    tuple(times),
                    tuple(lags),
                    request_lag,
                    ref,
                )
        except (aiohttp.ClientError, json.JSONDecodeError, TimeoutError) as exc:
            return failed(request, 0, repr(exc))


async def send_with_retries(
    streamer: Streamer, request: Request, start: float, max_retries: int
) -> RequestResult:
    """Send until answered or refused `max_retries` + 1 times, waiting each refusal's Retry-After."""
    retries = 0
    while True:
        outcome = await streamer.attempt(request, start)
        if isinstance(outcome, RequestResult):
            return replace(outcome, retries=retries)
        if retries >= max_retries:
            return replace(
                failed(request, outcome.status, outcome.text, outcome.gateway_request_id), retries=retries
            )
        retries += 1
        await asyncio.sleep(outcome.retry_after_s)


@contextlib.asynccontextmanager
async def open_streamer(
    api: LoadApi,
    base_url: str,
    model: str,
    record: TokenRecording,
    *,
    with_twin_keys: bool = True,
    api_key: str | None = None,
) -> AsyncIterator[Streamer]:
    """The streamer of `api` against `base_url`, its connections closed on the way out."""
    if api is LoadApi.TRITON:
        url = f"{base_url.rstrip('/')}/v2/models/{model}/generate_stream"
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            yield TritonStreamer(session, url, record, with_twin_keys)
        return
    if record.lags:
        raise ValueError("delivery lags need TRT-LLM's perf metrics: record them with the triton API")
    # Imported here: only the OpenAI APIs need the SDK, and its import costs half a second.
    from agent.workloads.openai_client import OpenAIStreamer

    async with OpenAIStreamer.open(
        base_url,
        model,
        chat=api is LoadApi.OPENAI_CHAT,
        record=record,
        with_twin_keys=with_twin_keys,
        api_key=api_key,
    ) as streamer:
        yield streamer


async def generate_load(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    *,
    api: LoadApi = LoadApi.TRITON,
    time_scale: float = 1.0,
    max_retries: int = 3,
    on_result: Callable[[RequestResult], None] | None = None,
    record: TokenRecording | None = None,
    energy_url: str | None = None,
    with_twin_keys: bool = True,
    api_key: str | None = None,
) -> LoadReport:
    """Replay `requests` against `base_url` at their arrival times; return what each one saw.

    `model` is the served model name (Triton's path segment, OpenAI's `model`); `api_key` the
    OpenAI bearer token (None: a placeholder, for engines started without one).
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    recording = record or TokenRecording()
    first_arrival = min((r.arrival_s for r in requests), default=0.0)

    async with (
        open_streamer(
            api, base_url, model, recording, with_twin_keys=with_twin_keys, api_key=api_key
        ) as streamer,
        RequestEnergyReader.open(energy_url) as energy,
    ):
        began = last_answer = time.monotonic()  # once the clients are up: the SDK takes a while

        async def one(request: Request) -> RequestResult:
            nonlocal last_answer
            scheduled = began + (request.arrival_s - first_arrival) / time_scale
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            result = await send_with_retries(streamer, request, scheduled, max_retries)
            last_answer = max(last_answer, time.monotonic())
            if energy is not None:
                result = replace(result, energy_j=await energy.energy_j(result.gateway_request_id))
            if on_result is not None:
                on_result(result)
            return result

        results = await asyncio.gather(*(one(r) for r in requests))
    return LoadReport(tuple(results), last_answer - began, energy_read=energy_url is not None)
