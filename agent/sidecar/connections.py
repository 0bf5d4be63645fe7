"""The gateway's connections: a budget of descriptors, and a deadline for each request head.

Every descriptor the gateway holds is one the sidecar's own port (/healthz, /metrics) cannot
accept with, and once the process hits RLIMIT_NOFILE every accept() fails, health checks time
out and the pod is restarted for a flood it could have shed. So the gateway keeps at most
`max_connections` client connections (each may hold a second descriptor to the engine); a
connection over the cap is answered 503 + Retry-After and closed at once, before any of its
bytes are read. Should accept() still fail for want of descriptors, asyncio logs a traceback
per failed accept; `AcceptErrorLog` turns that into one WARNING per episode.

aiohttp's server bounds idle keep-alive connections (`keepalive_timeout`, which also closes a
connection whose first request head never completes) but has no header timeout of its own: a
client that sends a few header bytes now and then holds the connection as long as the idle
timeout allows. `GuardedConnection` arms a `header_timeout_s` deadline at the first byte of
each request head and closes the connection if the head has not been handed to the app by
then (`request_phase_middleware` tells it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agent.sidecar.limits import retry_after_header

log = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 64  # listeners, engine adapter, GPU, meter, logs: what the rest of the sidecar needs
DESCRIPTORS_PER_CONNECTION = 2  # the client's, and the one to the engine
MAX_DEFAULT_CONNECTIONS = 4096
OVER_CAPACITY_RETRY_AFTER_S = 1.0
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def default_max_connections() -> int:
    """What the descriptor limit leaves for gateway connections, after the sidecar's own share."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS
    spare = max(soft - RESERVED_DESCRIPTORS, DESCRIPTORS_PER_CONNECTION)
    return min(spare // DESCRIPTORS_PER_CONNECTION, MAX_DEFAULT_CONNECTIONS)


def _over_capacity_answer(max_connections: int) -> bytes:
    body = f'{{"error": "the gateway already holds {max_connections} connections"}}'.encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_header(OVER_CAPACITY_RETRY_AFTER_S)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionBudget:
    """Protocol factory for the gateway's listener: caps connections, times request heads."""

    def __init__(
        self, server: Callable[[], asyncio.Protocol], *, max_connections: int, header_timeout_s: float
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        self.server = server
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.refused = 0  # connections over the cap, answered 503
        self.header_timeouts = 0  # connections closed with an unfinished request head
        self.accept_errors = AcceptErrorLog()
        self._refusal = _over_capacity_answer(max_connections)

    def __call__(self) -> GuardedConnection:
        """One accepted connection's protocol."""
        return GuardedConnection(self)

    def refuse(self, transport: asyncio.Transport) -> None:
        """Over the cap: 503 + Retry-After, closed before any of its bytes are read."""
        self.refused += 1
        transport.write(self._refusal)
        transport.close()


class GuardedConnection(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol; counts itself on the budget."""

    def __init__(self, budget: ConnectionBudget) -> None:
        self._budget = budget
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._awaiting_head = True
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Counted and handed to aiohttp, or refused when the budget is spent."""
        assert isinstance(transport, asyncio.Transport)  # a TCP listener
        budget = self._budget
        budget.accept_errors.recovered()
        if budget.open >= budget.max_connections:
            budget.refuse(transport)
            return
        budget.open += 1
        self._transport = transport
        self._inner = budget.server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """The first byte of a request head starts its deadline."""
        if self._inner is None:
            return
        if self._awaiting_head and self._head_deadline is None:
            loop = asyncio.get_running_loop()
            self._head_deadline = loop.call_later(self._budget.header_timeout_s, self._head_timed_out)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Passed on to aiohttp."""
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Frees its place in the budget."""
        self._cancel_deadline()
        inner, self._inner = self._inner, None
        if inner is not None:
            self._budget.open -= 1
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Flow control, passed on to aiohttp."""
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Flow control, passed on to aiohttp."""
        if self._inner is not None:
            self._inner.resume_writing()

    def request_started(self) -> None:
        """The app has a whole request head: no deadline on it any more."""
        self._awaiting_head = False
        self._cancel_deadline()

    def request_finished(self) -> None:
        """The answer is out: the next byte starts the next request's head."""
        self._awaiting_head = True

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._awaiting_head and self._transport is not None:
            self._budget.header_timeouts += 1
            self._transport.close()

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None


@web.middleware
async def request_phase_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tells the connection's guard when a request's head is in and when its answer is out."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if isinstance(guard, GuardedConnection):
        guard.request_started()
    try:
        return await handler(request)
    finally:
        if isinstance(guard, GuardedConnection):
            guard.request_finished()


class AcceptErrorLog:
    """One WARNING per episode of accept() failing for want of descriptors, not a traceback each.

    At the limit, every descriptor freed lets one accept through before the next fails, so an
    episode ends only once accepts have worked for `QUIET_S` without a failure.
    """

    QUIET_S = 10.0

    def __init__(self) -> None:
        self.failures = 0  # in the current episode
        self._last_failure_s = 0.0
        self._previous: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Filter `loop`'s exception handler; other errors still reach the one it had."""
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        """Give the loop its own exception handler back."""
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def recovered(self) -> None:
        """An accept() worked: the episode, if any, is over once that has lasted QUIET_S."""
        if (
            self.failures
            and self._loop is not None
            and self._loop.time() - self._last_failure_s >= self.QUIET_S
        ):
            log.warning("gateway accept() works again after %d failures", self.failures)
            self.failures = 0

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        out_of_descriptors = isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS
        if out_of_descriptors and "accept" in context.get("message", ""):
            if not self.failures:
                log.warning(
                    "gateway accept() fails: %s; connections wait in the backlog until descriptors "
                    "free up (lower THROTTLLEM_GATEWAY_MAX_CONNECTIONS or raise the limit)",
                    exc.strerror,
                )
            self.failures += 1
            self._last_failure_s = loop.time()
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


class GuardedSite(web.BaseSite):
    """A site on a socket already bound, serving through a `ConnectionBudget`."""

    __slots__ = ("_budget_options", "_sock", "connections")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        max_connections: int,
        header_timeout_s: float,
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._budget_options = {"max_connections": max_connections, "header_timeout_s": header_timeout_s}
        self.connections: ConnectionBudget | None = None

    @property
    def name(self) -> str:
        """The URL it serves, as aiohttp logs it."""
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        """Listen through a fresh budget; its accept errors are logged once per episode."""
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up
        self.connections = ConnectionBudget(server, **self._budget_options)
        loop = asyncio.get_running_loop()
        self.connections.accept_errors.install(loop)
        self._server = await loop.create_server(self.connections, sock=self._sock)

    async def stop(self) -> None:
        """Stop listening; the loop's exception handler is restored."""
        await super().stop()
        if self.connections is not None:
            self.connections.accept_errors.uninstall()
