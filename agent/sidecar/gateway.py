"""The gateway: a reverse proxy in front of the engine's HTTP port that feeds the scoreboard.

An unmodified engine tells nobody when a request arrives, how long its prompt is or when its
tokens stream out, yet the controller's scoreboard needs all of it per request (reference/
throttllem.md §3.4). So clients talk to the gateway, and for every LLM request (Triton generate,
generate_stream and infer; OpenAI completions and chat completions) it:

1. refuses what it can before reading the body: gateway closing (503), hold queue full (429),
   a Content-Length over the limit (413);
2. reads the body within its limits (`limits`: size, time, the bytes all bodies may hold at
   once), sizes the request (`llm_protocol.read_request`) and registers it with the
   `RequestTracker`;
3. waits until the control loop admits it (bounded by the tracker's `max_hold_s`, fail-open);
4. forwards it unchanged but for hop-by-hop fields (RFC 9110 §7.6.1), appending itself to
   X-Forwarded-For and Forwarded, setting X-Forwarded-Host/Proto, adding its span's
   `traceparent`;
5. relays the answer as it arrives — SSE chunk by chunk, never buffered — and reports the first
   token and every later one to the tracker;
6. finishes the ticket exactly once, whatever happened (try/finally).

Every answer to a request that got a ticket carries `X-Throttllem-Request-Id`, an opaque random
id: the sidecar port's `GET /v1/requests/{id}/energy` answers that request's energy. With
per-request energy on, the request's span ends at the next meter reading, at its completion
time, with the energy as an attribute (`spans.RequestSpans`).

Only the inference API goes through (`paths`: health, metadata and model readiness untracked,
`THROTTLLEM_GATEWAY_ALLOW_PATHS` for more); their bodies obey the same limits, answers stream.
The listener itself caps connections and times request heads (`connections`).

Failures and what the client sees (outcomes are span attributes and /metrics labels):

    upstream refused / unreachable      502, route's error shape         outcome upstream_error
    no answer within request_timeout_s  504, route's error shape         outcome upstream_error
    upstream non-2xx, or an error event relayed as is                   outcome upstream_error
    upstream breaks mid-stream          connection closed (truncated)    outcome upstream_error
    client goes away                    upstream request closed          outcome client_disconnected
    client goes away after [DONE]       nothing lost: the answer was whole  outcome ok
    hold queue full / gateway closing   429 / 503 + Retry-After          outcome rejected
    bodies in memory at their bound     503 + Retry-After                outcome rejected
    body over the size limit            413, before reading it           outcome refused
    body slower than body_timeout_s     408, connection closed           outcome refused
    counts beyond INT32, JSON too deep  400, route's error shape         outcome refused
    path not in the inference API       403 (405: known path, other method)  passthrough refused
    connections over the cap            503 + Retry-After, closed at once (connections)
    request head slower than its limit  connection closed (connections)

The gateway's server runs with `handler_cancellation` (`server_options`): a client that
disconnects is noticed at once, even while a non-streamed answer is awaited, and the upstream
connection is then closed so the engine stops work. On shutdown `drain` keeps the listener
open, answering 503 + Retry-After, while the requests in flight finish.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from yarl import URL

from agent.sidecar.connections import (
    ConnectionBudget,
    GuardedSite,
    default_max_connections,
    request_phase_middleware,
)
from agent.sidecar.limits import BodyBudget, BodyRefusedError, BufferedBody, read_body, retry_after_header
from agent.sidecar.llm_protocol import (
    TRACKED_ROUTES,
    Api,
    MalformedRequestError,
    RequestFacts,
    ResponseTokens,
    Route,
    api_for_path,
    error_body,
    read_request,
)
from agent.sidecar.paths import PathPolicy, Verdict
from agent.sidecar.prompt_tokens import PromptTokenCounter
from agent.sidecar.request_energy import label_value
from agent.sidecar.sse import SseParser
from agent.sidecar.tracker import HoldQueueFullError, RequestTracker, Ticket

if TYPE_CHECKING:
    from agent.sidecar.spans import RequestSpans

log = logging.getLogger(__name__)

TRACER_NAME = "throttllem.gateway"
PASSTHROUGH = "passthrough"  # the route label of untracked requests
DEFAULT_MAX_TOKENS = 1024  # a Triton or chat request without a limit (Triton itself requires one)
CONNECT_TIMEOUT_S = 10.0  # a black-holed upstream fails fast instead of after request_timeout_s
SHUTDOWN_RETRY_AFTER_S = 1.0
BINARY_HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe v2 binary tensor extension
BODY_WAIT_S = 1.0  # a body that finds the body budget spent waits this long for room, then 503
REQUEST_ID_HEADER = "X-Throttllem-Request-Id"  # the ticket's opaque id, on every answer that has one

# RFC 9110 §7.6.1, plus the proxy-authentication pair and Trailer of RFC 2616 §13.5.1.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Headers aiohttp's client would add by itself: the client's own (or their absence) go through.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Span attributes: OpenTelemetry HTTP and GenAI semantic conventions where they exist.
ATTR_ROUTE = "http.route"
ATTR_METHOD = "http.request.method"
ATTR_STATUS = "http.response.status_code"
ATTR_MODEL = "gen_ai.request.model"
ATTR_STREAM = "gen_ai.request.stream"
ATTR_MAX_TOKENS = "gen_ai.request.max_tokens"
ATTR_PROMPT_TOKENS = "gen_ai.usage.input_tokens"  # the gateway's count (tokenizer or estimate)
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_REQUEST_ID = "throttllem.request_id"  # the tracker's id, as the control loop sees it
ATTR_PUBLIC_ID = "throttllem.request.id"  # the id the client got in X-Throttllem-Request-Id
ATTR_HELD_S = "throttllem.held_s"  # arrival to admission
ATTR_TTFT_S = "throttllem.ttft_s"  # arrival at the gateway (hold included) to the first token
ATTR_OUTCOME = "throttllem.outcome"


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """What one client may cost the sidecar (THROTTLLEM_GATEWAY_* settings).

    16 MiB of body is ~4 M tokens of text, 30x the longest context windows served today (128k
    tokens ~ 0.5 MB); 32 MiB of bodies at once is two of the largest or thousands of usual ones.
    Parsing and sending a body costs about three times its bytes more, briefly: measured on
    loopback, 8 concurrent 15 MB bodies raised RSS by ~140 MB, 8 concurrent 60 MB ones (413
    before reading, or cut off at 16 MiB when chunked) by 2-20 MB, where the unbounded gateway
    took ~560 MB — the sidecar stays well inside its 512 MiB memory limit.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    body_buffer_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    max_connections: int | None = (
        None  # None: what RLIMIT_NOFILE leaves (connections.default_max_connections)
    )
    allow_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_body_bytes > self.body_buffer_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) must not exceed body_buffer_bytes "
                f"({self.body_buffer_bytes}): the largest body must fit the buffer"
            )


class Outcome(enum.StrEnum):
    """How a request through the gateway ended."""

    OK = "ok"
    REJECTED = "rejected"  # no capacity now: 429 or 503 with Retry-After
    REFUSED = "refused"  # the request itself is unacceptable: 400, 403, 405, 408, 413
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    ERROR = "error"  # a bug in the gateway; aiohttp answers 500


@dataclass(slots=True)
class GatewayStats:
    """Totals since start, read by the sidecar's /metrics at scrape time."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, outcome)
    rejected: Counter[int] = field(default_factory=Counter)  # by status the gateway answered itself
    upstream_errors: int = 0  # upstream unreachable, timed out, or broken mid-response
    client_disconnects: int = 0  # clients that left before their answer was whole
    streamed_tokens: int = 0  # output tokens counted from SSE events
    body_tokens: int = 0  # output tokens counted from whole (non-streamed) answers


@dataclass(slots=True)
class _Exchange:
    """One tracked request on its way through."""

    route: Route
    facts: RequestFacts | None = None  # known once the body is read
    ticket: Ticket | None = None
    outcome: Outcome = Outcome.ERROR
    status: int | None = None  # what the client was answered
    tokens: int = 0
    whole: bool = False  # the answer's end marker was relayed: a disconnect after it loses nothing

    def client_left(self) -> None:
        """The server cancelled the handler: the client went away (harmlessly, once the answer was whole)."""
        self.outcome = Outcome.OK if self.whole else Outcome.CLIENT_DISCONNECTED


class _RefusalError(Exception):
    """The gateway answers this itself: status, message, and Retry-After when it is worth retrying."""

    def __init__(
        self, status: int, message: str, retry_after_s: float | None = None, allow: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.allow = allow  # a 405's Allow header


class _UpstreamFailedError(Exception):
    """No answer from the upstream: 502 or 504."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """Proxies one engine; tracks its LLM requests on `tracker`."""

    def __init__(
        self,
        tracker: RequestTracker,
        upstream_url: str,
        *,
        prompt_tokens: PromptTokenCounter,
        request_timeout_s: float = 600.0,
        client_session: aiohttp.ClientSession | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        tracer_provider: trace.TracerProvider | None = None,
        limits: GatewayLimits | None = None,
        tenant_header: str | None = None,
        request_spans: RequestSpans | None = None,
    ) -> None:
        upstream = URL(upstream_url)
        if not upstream.absolute or upstream.scheme not in ("http", "https"):
            raise ValueError(f"upstream_url must be an absolute http(s) URL, got {upstream_url!r}")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s}")
        self.tracker = tracker
        self.upstream_url = str(upstream).rstrip("/")
        self.prompt_tokens = prompt_tokens
        self.request_timeout_s = request_timeout_s
        self.default_max_tokens = default_max_tokens
        self.tenant_header = tenant_header  # its value labels the request's energy by tenant
        self.request_spans = request_spans  # None: spans end with their request
        self.stats = GatewayStats()
        self._session = client_session
        self._owns_session = client_session is None
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, request_timeout_s)
        )
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._closed = False
        self.limits = limits or GatewayLimits()
        self.paths = PathPolicy(self.limits.allow_paths)
        self.bodies = BodyBudget(self.limits.body_buffer_bytes, BODY_WAIT_S)
        self.connections: ConnectionBudget | None = None  # set when served on a GuardedSite
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def routes(self) -> list[web.RouteDef]:
        """Tracked LLM routes first, then the catch-all pass-through."""
        tracked = [web.post(route.path, self._tracked_handler(route)) for route in TRACKED_ROUTES]
        return [*tracked, web.route("*", "/{tail:.*}", self._passthrough)]

    async def close(self) -> None:
        """Refuse new requests (503) and close the client session if the gateway made it."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def drain(self, timeout_s: float) -> bool:
        """Answer new requests 503 + Retry-After, and wait (up to `timeout_s`) for those in flight.

        The listener stays open meanwhile, so clients are told to retry rather than refused a
        connection. True when nothing is left in flight.
        """
        self._closed = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("gateway drain: %d requests still in flight after %g s", self._in_flight, timeout_s)
            return False
        return True

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    # -- tracked requests ------------------------------------------------------------------------

    def _tracked_handler(self, route: Route) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._tracked(route, request)

        return handle

    async def _tracked(self, route: Route, request: web.Request) -> web.StreamResponse:
        exchange = _Exchange(route)
        with self._tracer.start_as_current_span(
            f"{request.method} {route.path}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={ATTR_ROUTE: route.path, ATTR_METHOD: request.method},
            record_exception=False,
            set_status_on_exception=False,
            end_on_exit=False,
        ) as span:
            self._enter()
            try:
                return await self._read_admit_forward(request, exchange, span)
            except asyncio.CancelledError:  # the server cancels handlers of vanished clients
                exchange.client_left()
                raise
            except Exception as exc:
                exchange.outcome = Outcome.ERROR
                span.record_exception(exc)
                raise
            finally:
                self._leave()
                try:
                    self._record(exchange, span)
                finally:
                    self._end_span(exchange, span)

    def _end_span(self, exchange: _Exchange, span: Span) -> None:
        """Now, or once the request's energy is final (at this completion time)."""
        if self.request_spans is None or exchange.ticket is None:
            span.end()
        else:
            self.request_spans.park(exchange.ticket.public_id, span, time.time_ns())

    async def _read_admit_forward(
        self, request: web.Request, exchange: _Exchange, span: Span
    ) -> web.StreamResponse:
        """Refusals that need no body first, then the body, then admission and the engine."""
        try:
            self._check_capacity()
            body = await self._read_body(request)
        except _RefusalError as exc:
            return await self._refuse(request, exchange, exc)
        try:
            try:
                facts = read_request(
                    exchange.route,
                    body.data,
                    request.match_info.get("model"),
                    self.prompt_tokens,
                    self.default_max_tokens,
                    binary_header_length=request.headers.get(BINARY_HEADER_LENGTH),
                )
            except MalformedRequestError as exc:
                return await self._refuse(request, exchange, _RefusalError(400, str(exc)))
            exchange.facts = facts
            span.set_attributes(_fact_attributes(facts))
            return await self._admit_and_forward(request, body, exchange)
        finally:
            body.release()

    def _check_capacity(self) -> None:
        """503 while closing, 429 when the hold queue is full: both before a body byte is read."""
        if self._closed:
            raise _RefusalError(503, "the gateway is shutting down", SHUTDOWN_RETRY_AFTER_S)
        try:
            self.tracker.check_room()
        except HoldQueueFullError as exc:
            raise _RefusalError(429, str(exc), exc.retry_after_s) from None

    async def _read_body(self, request: web.Request) -> BufferedBody:
        try:
            return await read_body(
                request,
                max_body_bytes=self.limits.max_body_bytes,
                budget=self.bodies,
                timeout_s=self.limits.body_timeout_s,
            )
        except BodyRefusedError as exc:
            raise _RefusalError(exc.status, str(exc), exc.retry_after_s) from None

    async def _admit_and_forward(
        self, request: web.Request, body: BufferedBody, exchange: _Exchange
    ) -> web.StreamResponse:
        assert exchange.facts is not None  # read before admission
        tenant = request.headers.get(self.tenant_header) if self.tenant_header else None
        try:
            ticket = self.tracker.arrive(
                exchange.facts.prompt_tokens,
                exchange.facts.max_tokens,
                model=label_value(exchange.facts.model),
                tenant=label_value(tenant),
            )
        except HoldQueueFullError as exc:
            return await self._refuse(request, exchange, _RefusalError(429, str(exc), exc.retry_after_s))
        exchange.ticket = ticket
        try:
            await self.tracker.wait_admitted(ticket)
            headers = forward_headers(request, tracked=True)
            inject(headers)  # the current span (ours) becomes the engine's parent
            try:
                upstream = await self._open(request, headers, body.data)
            except _UpstreamFailedError as exc:
                exchange.outcome = Outcome.UPSTREAM_ERROR
                return await self._answer_error(request, exchange, exc)
            finally:
                body.release()  # the engine has it (or never will): free the budget now
            try:
                return await self._relay(request, upstream, exchange)
            finally:
                _done(upstream)
        except asyncio.CancelledError:
            exchange.client_left()  # before the ticket is finished with it
            raise
        finally:
            self.tracker.finish(ticket, ok=exchange.outcome is Outcome.OK)

    async def _refuse(
        self, request: web.Request, exchange: _Exchange, refusal: _RefusalError
    ) -> web.StreamResponse:
        """The gateway's own answer, in the route's error shape: never a silent drop."""
        exchange.outcome = Outcome.REJECTED if refusal.retry_after_s is not None else Outcome.REFUSED
        exchange.status = refusal.status
        response = self._refusal_response(request, exchange.route.api, refusal)
        await _deliver(request, response)
        return response

    def _refusal_response(self, request: web.Request, api: Api, refusal: _RefusalError) -> web.Response:
        """Counted by status; the connection is closed after it when the body was left unread."""
        self.stats.rejected[refusal.status] += 1
        response = _error_response(api, refusal.status, str(refusal))
        if refusal.retry_after_s is not None:
            response.headers["Retry-After"] = retry_after_header(refusal.retry_after_s)
        if refusal.allow is not None:
            response.headers["Allow"] = refusal.allow
        if refusal.status in (408, 413) or (request.body_exists and not request.content.is_eof()):
            response.force_close()
        return response

    async def _answer_error(
        self, request: web.Request, exchange: _Exchange, exc: _UpstreamFailedError
    ) -> web.StreamResponse:
        """502 or 504 in the route's error shape."""
        exchange.status = exc.status
        response = _error_response(exchange.route.api, exc.status, str(exc))
        _identify(response.headers, exchange)
        await _deliver(request, response)
        return response

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, exchange: _Exchange
    ) -> web.StreamResponse:
        """SSE chunk by chunk, anything else whole; a non-2xx or an error inside fails the request."""
        tokens = ResponseTokens(exchange.route, exchange.facts, self.prompt_tokens)
        exchange.status = upstream.status
        if upstream.content_type == "text/event-stream":
            response, outcome = await self._relay_events(request, upstream, exchange, tokens)
        else:
            response, outcome = await self._relay_body(request, upstream, exchange, tokens)
        succeeded = 200 <= upstream.status < 300
        if outcome is Outcome.OK and (not succeeded or tokens.failed):
            outcome = Outcome.UPSTREAM_ERROR
        exchange.outcome = outcome
        return response

    async def _relay_events(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        exchange: _Exchange,
        tokens: ResponseTokens,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Each chunk is counted, then written at once: the client sees tokens as they come."""
        parser = SseParser()

        def count(chunk: bytes) -> None:
            for event in parser.feed(chunk):
                self._report(exchange, tokens.event(event), streamed=True)
            exchange.whole = tokens.done

        headers = _identify(response_headers(upstream, True), exchange)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        outcome = await self._pump(request, upstream, response, count)
        if outcome is Outcome.CLIENT_DISCONNECTED and exchange.whole:
            outcome = Outcome.OK  # e.g. the openai SDK closes right after `data: [DONE]`
        if outcome is Outcome.OK:
            for event in parser.close():
                self._report(exchange, tokens.event(event), streamed=True)
        return response, outcome

    async def _relay_body(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        exchange: _Exchange,
        tokens: ResponseTokens,
    ) -> tuple[web.StreamResponse, Outcome]:
        """A whole answer: its tokens all arrive at once, when it does."""
        try:
            body = await upstream.read()  # a client leaving meanwhile cancels this (handler_cancellation)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = self._upstream_failed(exc, "while sending its answer")
            return await self._answer_error(request, exchange, failure), Outcome.UPSTREAM_ERROR
        if 200 <= upstream.status < 300:
            self._report(
                exchange, tokens.body(body, upstream.headers.get(BINARY_HEADER_LENGTH)), streamed=False
            )
        response = web.Response(
            status=upstream.status,
            reason=upstream.reason,
            body=body,
            headers=_identify(response_headers(upstream, True), exchange),
        )
        delivered = await _deliver(request, response)
        return response, Outcome.OK if delivered else Outcome.CLIENT_DISCONNECTED

    def _report(self, exchange: _Exchange, tokens: int, *, streamed: bool) -> None:
        """The first token of a request is its TTFT; the rest only add up."""
        if tokens <= 0 or exchange.ticket is None:
            return
        if exchange.tokens == 0:
            self.tracker.first_token(exchange.ticket)
            if tokens > 1:
                self.tracker.add_tokens(exchange.ticket, tokens - 1)
        else:
            self.tracker.add_tokens(exchange.ticket, tokens)
        exchange.tokens += tokens
        if streamed:
            self.stats.streamed_tokens += tokens
        else:
            self.stats.body_tokens += tokens

    def _record(self, exchange: _Exchange, span: Span) -> None:
        """Close the books on one request: its span's attributes and status, the stats."""
        attributes: dict[str, str | int | float] = {
            ATTR_OUTCOME: exchange.outcome.value,
            ATTR_OUTPUT_TOKENS: exchange.tokens,
        }
        if exchange.status is not None:
            attributes[ATTR_STATUS] = exchange.status
        ticket = exchange.ticket
        if ticket is not None:
            attributes[ATTR_REQUEST_ID] = ticket.request_id
            attributes[ATTR_PUBLIC_ID] = ticket.public_id
            if ticket.admitted_s is not None:
                attributes[ATTR_HELD_S] = ticket.admitted_s - ticket.arrival_s
            if ticket.first_token_s is not None:
                attributes[ATTR_TTFT_S] = ticket.first_token_s - ticket.arrival_s
        span.set_attributes(attributes)
        if exchange.outcome is not Outcome.OK:
            span.set_status(Status(StatusCode.ERROR, exchange.outcome.value))
        self._count(exchange.route.path, exchange.outcome)

    def _count(self, route: str, outcome: Outcome) -> None:
        self.stats.requests[(route, outcome.value)] += 1
        if outcome is Outcome.CLIENT_DISCONNECTED:
            self.stats.client_disconnects += 1

    # -- pass-through ----------------------------------------------------------------------------

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        """Health, metadata, readiness (and allow-listed paths): relayed untracked, answers streamed."""
        api = api_for_path(request.path)
        self._enter()
        try:
            try:
                self._check_path(request)
                if self._closed:
                    raise _RefusalError(503, "the gateway is shutting down", SHUTDOWN_RETRY_AFTER_S)
                body = await self._read_body(request) if request.body_exists else None
            except _RefusalError as exc:
                outcome = Outcome.REJECTED if exc.retry_after_s is not None else Outcome.REFUSED
                self._count(PASSTHROUGH, outcome)
                return self._refusal_response(request, api, exc)
            try:
                data = None if body is None else body.data
                upstream = await self._open(request, forward_headers(request, tracked=False), data)
            except _UpstreamFailedError as exc:
                self._count(PASSTHROUGH, Outcome.UPSTREAM_ERROR)
                return _error_response(api, exc.status, str(exc))
            finally:
                if body is not None:
                    body.release()
            try:
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=response_headers(upstream, False)
                )
                outcome = await self._pump(request, upstream, response, None)
            finally:
                _done(upstream)
            self._count(PASSTHROUGH, outcome)
            return response
        finally:
            self._leave()

    def _check_path(self, request: web.Request) -> None:
        """403 outside the inference API (and the allow-list), 405 for a method a path does not take."""
        path = request.rel_url.raw_path
        verdict = self.paths.verdict(request.method, path)
        if verdict is Verdict.FORBIDDEN:
            raise _RefusalError(
                403, f"{path} is not forwarded by the gateway (THROTTLLEM_GATEWAY_ALLOW_PATHS)"
            )
        if verdict is Verdict.WRONG_METHOD:
            allowed = ", ".join(self.paths.allowed_methods(path))
            raise _RefusalError(405, f"{request.method} is not allowed on {path}", allow=allowed)

    # -- upstream I/O ----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use (inside the running loop) when none was given."""
        if self._session is None:
            # No pool limit: the engine queues; a limit here would be a second, hidden queue.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
            )
        return self._session

    async def _open(
        self, request: web.Request, headers: CIMultiDict[str], data: object
    ) -> aiohttp.ClientResponse:
        """Send the request upstream and wait for its status line and headers."""
        url = URL(self.upstream_url + request.rel_url.raw_path_qs, encoded=True)
        try:
            return await self._client().request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._upstream_failed(exc, "before answering") from exc

    def _upstream_failed(self, exc: BaseException, when: str) -> _UpstreamFailedError:
        """Count and log an upstream failure; the error to answer with if nothing was sent yet."""
        self.stats.upstream_errors += 1
        if isinstance(exc, TimeoutError):
            message = f"upstream {self.upstream_url} timed out {when} (limit {self.request_timeout_s:g} s)"
            log.warning("%s", message)
            return _UpstreamFailedError(504, message)
        message = f"upstream {self.upstream_url} failed {when}: {exc or type(exc).__name__}"
        log.warning("%s", message)
        return _UpstreamFailedError(502, message)

    async def _pump(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        on_chunk: Callable[[bytes], None] | None,
    ) -> Outcome:
        """Copy the upstream body to the client as it arrives; whoever breaks first decides."""
        try:
            await response.prepare(request)
        except ConnectionResetError:
            return Outcome.CLIENT_DISCONNECTED
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._upstream_failed(exc, "mid-response")
                _abort(request)  # a truncated stream, not a clean end the client would trust
                return Outcome.UPSTREAM_ERROR
            if not chunk:
                break
            if on_chunk is not None:
                on_chunk(chunk)
            try:
                await response.write(chunk)
            except ConnectionResetError:
                return Outcome.CLIENT_DISCONNECTED
        try:
            await response.write_eof()
        except ConnectionResetError:
            return Outcome.CLIENT_DISCONNECTED
        return Outcome.OK


def build_gateway_app(gateway: Gateway) -> web.Application:
    """The gateway as its own application (its own port); closes the gateway on cleanup."""
    app = web.Application(
        client_max_size=gateway.limits.max_body_bytes, middlewares=[request_phase_middleware]
    )
    app[GATEWAY_KEY] = gateway
    app.add_routes(gateway.routes())

    async def close(_: web.Application) -> None:
        await gateway.close()

    app.on_cleanup.append(close)
    return app


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def server_options(limits: GatewayLimits) -> dict[str, Any]:
    """How the gateway's aiohttp server runs: clients that leave cancel their handler; idle bound."""
    return {"handler_cancellation": True, "keepalive_timeout": limits.idle_timeout_s}


async def start_gateway_site(runner: web.AppRunner, sock: socket.socket) -> GuardedSite:
    """Serve the gateway app of `runner` (set up with `server_options`) on a bound socket."""
    gateway = runner.app[GATEWAY_KEY]
    limits = gateway.limits
    max_connections = limits.max_connections or default_max_connections()
    site = GuardedSite(
        runner, sock, max_connections=max_connections, header_timeout_s=limits.header_timeout_s
    )
    await site.start()
    gateway.connections = site.connections
    return site


def without_hop_by_hop(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop fields, including those the Connection field names."""
    drop = HOP_BY_HOP | {
        token.strip().lower()
        for key, value in headers.items()
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return CIMultiDict((key, value) for key, value in headers.items() if key.lower() not in drop)


def forward_headers(request: web.Request, *, tracked: bool) -> CIMultiDict[str]:
    """The client's headers for the upstream: end-to-end fields only, plus the proxy's own.

    Host becomes the upstream's. A tracked request asks for an identity encoding, since the
    gateway reads its answer; Content-Length is recomputed from the body the gateway read.
    The peer is appended to X-Forwarded-For and Forwarded (RFC 7239: each proxy adds the
    address it received from, earlier entries are kept as the client claims them);
    X-Forwarded-Host and -Proto say what this hop saw, whatever the client sent.
    """
    headers = without_hop_by_hop(request.headers)
    for name in ("Host", "Expect", "Content-Length", *(("Accept-Encoding",) if tracked else ())):
        headers.popall(name, None)
    if tracked:
        headers["Accept-Encoding"] = "identity"
    peer = request.remote
    if peer:
        chain = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
        node = f'"[{peer}]"' if ":" in peer else peer  # RFC 7239 §6: IPv6 quoted in brackets
        element = f"for={node};host={_forwarded_value(request.host)};proto={request.scheme}"
        earlier = ", ".join(request.headers.getall("Forwarded", ()))
        headers["Forwarded"] = f"{earlier}, {element}" if earlier else element
    headers["X-Forwarded-Host"] = request.host
    headers["X-Forwarded-Proto"] = request.scheme
    return headers


def _forwarded_value(value: str) -> str:
    """A Forwarded parameter value: a token as is, anything else a quoted string (RFC 7239 §4)."""
    if value and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def response_headers(upstream: aiohttp.ClientResponse, drop_length: bool) -> CIMultiDict[str]:
    """The upstream's end-to-end headers; Content-Length dropped when the gateway re-frames."""
    headers = without_hop_by_hop(upstream.headers)
    if drop_length:
        headers.popall("Content-Length", None)
    return headers


def _identify(headers: CIMultiDict[str], exchange: _Exchange) -> CIMultiDict[str]:
    """`headers` with the request's opaque id (replacing any the upstream sent)."""
    if exchange.ticket is not None:
        headers[REQUEST_ID_HEADER] = exchange.ticket.public_id
    return headers


def _fact_attributes(facts: RequestFacts) -> dict[str, str | bool | int]:
    attributes: dict[str, str | bool | int] = {
        ATTR_STREAM: facts.stream,
        ATTR_PROMPT_TOKENS: facts.prompt_tokens,
        ATTR_MAX_TOKENS: facts.max_tokens,
    }
    if facts.model is not None:
        attributes[ATTR_MODEL] = facts.model
    return attributes


def _error_response(api: Api, status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(api, status, message), content_type="application/json")


async def _deliver(request: web.Request, response: web.StreamResponse) -> bool:
    """Send a whole response now; False when the client is already gone."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        return False
    return True


def _done(upstream: aiohttp.ClientResponse) -> None:
    """Keep the connection if the answer was read to the end; else close it, cancelling the work."""
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
