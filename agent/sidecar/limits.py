"""Request bodies in memory: each one bounded in size and time, all of them together in bytes.

The gateway must read a tracked body whole (its prompt is sized before admission), so a client
that sends big bodies, many at once or very slowly, decides the sidecar's memory unless:

- a body over `max_body_bytes` is refused (413): at once from its Content-Length, before a byte
  of it is read, or as soon as a chunked body grows past the limit;
- every body byte held is counted on one `BodyBudget` shared by all requests; a chunk that does
  not fit waits up to `wait_s` for others to be released, then the request is refused (503 +
  Retry-After) — bytes, not requests, because one 16 MiB prompt weighs what 4,000 small ones
  do, and memory is what runs out;
- a body that takes longer than `timeout_s` to arrive is refused (408): a slow client cannot
  hold its share of the budget, or its connection, for long.

A body with a Content-Length reserves all of it before reading (it is at most `max_body_bytes`):
bodies that each got part of the budget and all wait for the rest would starve together. A
chunked body reserves chunk by chunk. The bytes are released once the engine has the body.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web


class BodyRefusedError(Exception):
    """A body the gateway will not read: the status to answer with, and when to retry (or None)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class BodyBudget:
    """Bytes of request bodies held at once, across all requests; `peak_bytes` is the high mark."""

    def __init__(self, capacity_bytes: int, wait_s: float) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.wait_s = wait_s
        self.used_bytes = 0
        self.peak_bytes = 0
        self._released = asyncio.Event()  # replaced on every release: waiters wake and look again

    async def reserve(self, nbytes: int) -> None:
        """Count `nbytes` more; waits up to `wait_s` for room, else BodyRefusedError(503)."""
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{nbytes} bytes can never fit a budget of {self.capacity_bytes}")
        try:
            async with asyncio.timeout(self.wait_s):
                while self.used_bytes + nbytes > self.capacity_bytes:
                    await self._released.wait()
        except TimeoutError:
            raise BodyRefusedError(
                503,
                f"the gateway already holds {self.used_bytes} bytes of request bodies",
                retry_after_s=max(1.0, self.wait_s),
            ) from None
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, nbytes: int) -> None:
        """Those bytes are no longer held; wake whoever waits for room (synchronous: safe in finally)."""
        self.used_bytes -= nbytes
        released, self._released = self._released, asyncio.Event()
        released.set()


class BufferedBody:
    """One request's body, read whole and counted on the budget until `release`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.data = bytearray()
        self._budget = budget
        self._counted = 0

    async def reserve(self, nbytes: int) -> None:
        """Count `nbytes` on the budget ahead of the data (waiting for room)."""
        await self._budget.reserve(nbytes)
        self._counted += nbytes

    async def append(self, chunk: bytes) -> None:
        """Keep the chunk, counting what the reservation does not cover yet."""
        uncounted = len(self.data) + len(chunk) - self._counted
        if uncounted > 0:
            await self.reserve(uncounted)
        self.data += chunk

    def release(self) -> None:
        """Drop the bytes (the engine has them) and give their share back; idempotent."""
        self.data = bytearray()
        counted, self._counted = self._counted, 0
        if counted:
            self._budget.release(counted)


def check_declared_length(request: web.Request, max_body_bytes: int) -> None:
    """413 from the Content-Length alone, before any of the body is read."""
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise BodyRefusedError(413, _too_large(max_body_bytes, f"Content-Length {length}"))


async def read_body(
    request: web.Request, *, max_body_bytes: int, budget: BodyBudget, timeout_s: float
) -> BufferedBody:
    """The whole body within the limits; BodyRefusedError (413, 503, 408) when it breaks one.

    On refusal the bytes read so far are released; the caller releases the body it gets back.
    """
    check_declared_length(request, max_body_bytes)
    body = BufferedBody(budget)
    try:
        async with asyncio.timeout(timeout_s):
            if request.content_length:
                await body.reserve(request.content_length)
            while chunk := await request.content.readany():
                if len(body.data) + len(chunk) > max_body_bytes:
                    raise BodyRefusedError(413, _too_large(max_body_bytes, "the body"))
                await body.append(chunk)
    except TimeoutError:
        received = len(body.data)
        body.release()
        raise BodyRefusedError(
            408, f"the request body did not arrive within {timeout_s:g} s ({received} bytes read)"
        ) from None
    except BaseException:
        body.release()
        raise
    return body


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, never 0 for a real wait."""
    return str(max(0, math.ceil(seconds)))


def _too_large(limit: int, what: str) -> str:
    return f"{what} exceeds the gateway's limit of {limit} bytes (THROTTLLEM_GATEWAY_MAX_BODY_BYTES)"
