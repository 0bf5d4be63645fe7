"""The I/O half of every adapter: fetch a metrics page over HTTP, keep health, classify iterations.

Each concrete adapter only says how one response body becomes `EngineStats` (`_ingest`, no I/O);
this base class does the fetching, the error mapping and the bookkeeping the same way for all.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import ClassVar, Self, TypedDict
from urllib.parse import urlsplit

import aiohttp

from agent.domain import EngineStats
from agent.engines.base import (
    AdapterHealth,
    EngineError,
    EngineUnavailableError,
    HealthTracker,
    IterationChange,
    IterationTracker,
    MalformedMetricsError,
    MissingMetricsError,
)

DEFAULT_TIMEOUT_S = 1.0  # a scrape slower than this is too old to steer a 100 ms control loop
# Triton's page for a few models and eight GPUs is ~100 KiB, vLLM's a few hundred: a page this big
# is broken or hostile, and reading it whole would cost the sidecar its memory limit.
MAX_PAGE_BYTES = 8 * 1024 * 1024
_BODY_EXCERPT_CHARS = 200


def metrics_url(url: str) -> str:
    """`url` itself, or `url` + "/metrics" when it names only a host (every engine serves there)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"engine URL {url!r} must look like http://host:port[/path]")
    return url.rstrip("/") + "/metrics" if parts.path in ("", "/") else url


async def fetch_text(session: aiohttp.ClientSession, url: str, *, timeout_s: float, accept: str) -> str:
    """The body of `GET url`; any transport problem or non-200 answer is `EngineUnavailableError`."""
    try:
        async with session.get(
            url, headers={"Accept": accept}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            body = await _bounded_text(response, url)
            if response.status != 200:
                raise EngineUnavailableError(
                    f"GET {url} answered HTTP {response.status} ({body[:_BODY_EXCERPT_CHARS]!r}); check the"
                    " port and path, and that the engine exports metrics there"
                )
            return body
    except TimeoutError as exc:
        raise EngineUnavailableError(
            f"GET {url} got no answer within {timeout_s} s; check the engine is up and not overloaded"
        ) from exc
    except aiohttp.ClientError as exc:
        raise EngineUnavailableError(
            f"cannot reach {url} ({exc}); check the engine is running and the host and port"
        ) from exc


async def _bounded_text(response: aiohttp.ClientResponse, url: str) -> str:
    """The body, refused (`MalformedMetricsError`) past MAX_PAGE_BYTES without holding more."""
    declared = response.content_length
    if declared is None or declared <= MAX_PAGE_BYTES:
        chunks, size = [], 0  # joined once at the end: growing one buffer fragments the heap
        while chunk := await response.content.readany():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_PAGE_BYTES:
                break
        else:
            return _decode(b"".join(chunks), response.charset)
        # The error's traceback keeps this frame, and with it the chunks, alive until the cyclic
        # GC runs, which large buffers do not hurry: a page refused each poll would pile up.
        chunks.clear()
    response.close()  # drop the connection rather than drain the rest
    raise MalformedMetricsError(
        f"GET {url} sent a page over {MAX_PAGE_BYTES // (1024 * 1024)} MiB; an engine's metrics page is"
        " far smaller: check the URL points at the engine's /metrics"
    )


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know: the exposition format is UTF-8
        return body.decode("utf-8", errors="replace")


class HttpOptions(TypedDict, total=False):
    """The `HttpPollingAdapter` settings a concrete adapter passes through."""

    timeout_s: float
    session: aiohttp.ClientSession | None
    clock: Callable[[], float]
    setting: str | None


class HttpPollingAdapter(ABC):
    """An engine adapter that reads one HTTP endpoint per poll.

    `session` may be shared (the caller then closes it); otherwise the adapter makes its own on
    the first poll (aiohttp wants a running loop for that) and `close()` releases it. `clock` is
    the monotonic clock health times are measured on. `setting`: the environment variable the URL
    came from, named in every log line, so a host that does not resolve says what to fix.
    """

    kind: ClassVar[str]  # engine kind, as `build_adapter` names it
    accept: ClassVar[str]  # Accept header: the format `_ingest` parses

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        setting: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.url = metrics_url(url)
        self.setting = setting
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None
        self._iterations = IterationTracker()
        self._log = logging.getLogger(type(self).__module__)  # the concrete adapter's logger
        self._health = HealthTracker(self.name, self._log, clock)

    @property
    def name(self) -> str:
        """Engine kind and endpoint (and the variable that set it), for logs."""
        return f"{self.kind} {self.url}" + ("" if self.setting is None else f" ({self.setting})")

    @property
    def health(self) -> AdapterHealth:
        """A snapshot of the adapter's health."""
        return self._health.snapshot(self._iterations.restarts)

    async def poll(self) -> EngineStats | None:
        """The newest iteration since the last poll; None when there is none."""
        stats = await self.poll_all()
        return stats[-1] if stats else None

    async def poll_all(self) -> list[EngineStats]:
        """Every new iteration the endpoint shows since the last poll, oldest first.

        Raises `EngineError` subclasses (recorded in `health` first); essential metrics missing
        gives an empty list and an unhealthy `health` instead (see `agent.engines.base`).
        """
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            body = await fetch_text(self._session, self.url, timeout_s=self.timeout_s, accept=self.accept)
            stats = self._ingest(body)
        except MissingMetricsError as exc:
            self._health.failed(exc)
            return []
        except EngineError as exc:
            self._health.failed(exc)
            raise
        self._health.succeeded(new_stats=bool(stats))
        return stats

    async def close(self) -> None:
        """Close the HTTP session if this adapter made it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _observe(self, iteration: int, marker: float | None = None) -> IterationChange:
        """Classify an iteration; a restart is logged, since every counter the engine had is gone."""
        change = self._iterations.observe(iteration, marker)
        if change is IterationChange.RESTART:
            self._log.warning(
                "%s: engine restarted (iteration counter now %d); restarts seen: %d",
                self.name,
                iteration,
                self._iterations.restarts,
            )
        return change

    @abstractmethod
    def _ingest(self, body: str) -> list[EngineStats]:
        """New iterations in one response body, oldest first; no I/O. Raises `EngineError`s."""
