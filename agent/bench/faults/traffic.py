"""Client traffic for the fault suite, each request judged answered, rejected or lost.

    answered   200 and every token asked for streamed back (or the whole body, not streamed)
    rejected   an explicit answer the client can act on: an HTTP error status (429, 503, 413,
               403, 502, 504 ...) with a body, so it knows to retry or give up
    lost       anything else: connection refused or reset, a stream cut short, no answer in time

A lost request is the one a user cannot tell from a hang; the suite's target is none, wherever
the process holding the connection stays alive.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

import aiohttp

from agent.workloads.loadgen import PROMPT_WORD

REQUEST_TIMEOUT_S = 30.0
MODEL = "ensemble"


@dataclass(frozen=True, slots=True)
class Tally:
    """What a batch of requests saw."""

    sent: int = 0
    answered: int = 0
    rejected: int = 0
    lost: int = 0
    statuses: tuple[tuple[int, int], ...] = ()  # (status, count), 0: no HTTP answer

    def __add__(self, other: Tally) -> Tally:
        statuses = Counter(dict(self.statuses)) + Counter(dict(other.statuses))
        return Tally(
            self.sent + other.sent,
            self.answered + other.answered,
            self.rejected + other.rejected,
            self.lost + other.lost,
            tuple(sorted(statuses.items())),
        )


def tally(verdicts: list[tuple[str, int]]) -> Tally:
    """Count (verdict, status) pairs."""
    kinds = Counter(verdict for verdict, _ in verdicts)
    statuses = Counter(status for _, status in verdicts)
    return Tally(
        len(verdicts), kinds["answered"], kinds["rejected"], kinds["lost"], tuple(sorted(statuses.items()))
    )


def stream_body(max_tokens: int, prompt_tokens: int = 32) -> dict[str, object]:
    """A generate_stream body the twin answers with exactly `max_tokens` events."""
    return {
        "text_input": PROMPT_WORD * prompt_tokens,
        "max_tokens": max_tokens,
        "output_tokens": max_tokens,
        "stream": True,
    }


async def stream_once(session: aiohttp.ClientSession, base_url: str, max_tokens: int) -> tuple[str, int]:
    """One generate_stream request through `base_url`: its verdict and HTTP status (0: none)."""
    url = f"{base_url}/v2/models/{MODEL}/generate_stream"
    try:
        async with session.post(url, json=stream_body(max_tokens)) as response:
            if response.status != 200:
                body = await response.read()
                return ("rejected" if body else "lost"), response.status
            tokens = 0
            async for line in response.content:
                if line.startswith(b"data:"):
                    if "error" in json.loads(line[5:]):
                        return "rejected", 200
                    tokens += 1
            return ("answered" if tokens == max_tokens else "lost"), 200
    except (aiohttp.ClientError, json.JSONDecodeError, TimeoutError):
        return "lost", 0


async def streams(base_url: str, count: int, max_tokens: int, *, connections: int = 0) -> Tally:
    """`count` concurrent generate_stream requests (`connections`: cap on sockets, 0 none)."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        verdicts = await asyncio.gather(*(stream_once(session, base_url, max_tokens) for _ in range(count)))
    return tally(list(verdicts))


async def paced_streams(base_url: str, duration_s: float, rate_hz: float, max_tokens: int) -> Tally:
    """Requests at `rate_hz` for `duration_s`, each judged; waits for the last to end."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        for _ in range(max(1, round(duration_s * rate_hz))):
            tasks.append(asyncio.create_task(stream_once(session, base_url, max_tokens)))
            await asyncio.sleep(1.0 / rate_hz)
        verdicts = await asyncio.gather(*tasks)
    return tally(list(verdicts))
