"""The gateway: a reverse proxy in front of the engine's HTTP port that feeds the scoreboard.

An unmodified engine tells nobody when a request arrives, how long its prompt is or when its
tokens stream out, yet the controller's scoreboard needs all of it per request (reference/
throttllem.md §3.4). So clients talk to the gateway, and for every LLM request it:

1. sizes the request (`llm_protocol.read_request`) and registers it with the `RequestTracker`;
   a full hold queue is answered 429 + Retry-After in the route's own error shape;
2. waits until the control loop admits it (bounded by the tracker's `max_hold_s`, fail-open);
3. forwards it unchanged but for hop-by-hop fields (RFC 9110 §7.6.1), adding X-Forwarded-*
   and the W3C `traceparent` of its span;
4. relays the answer as it arrives — SSE chunk by chunk, never buffered — and reports the first
   token and every later one to the tracker;
5. finishes the ticket exactly once, whatever happened (try/finally).

Every other method and path is passed through untracked, bodies streamed both ways.

Failures and what the client sees:

    upstream refused / unreachable      502, route's error shape         outcome upstream_error
    no answer within request_timeout_s  504, route's error shape         outcome upstream_error
    upstream non-2xx, or an error event relayed as is                   outcome upstream_error
    upstream breaks mid-stream          connection closed (truncated)    outcome upstream_error
    client goes away                    upstream request closed          outcome client_disconnected
    hold queue full / gateway closing   429 / 503 + Retry-After          outcome rejected

A client that disconnects is noticed at the next write (or at once when the server runs with
`handler_cancellation`), and the upstream connection is then closed so the engine stops work.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from yarl import URL

from agent.sidecar.llm_protocol import (
    TRACKED_ROUTES,
    Api,
    RequestFacts,
    ResponseTokens,
    Route,
    api_for_path,
    error_body,
    read_request,
)
from agent.sidecar.prompt_tokens import PromptTokenCounter
from agent.sidecar.sse import SseParser
from agent.sidecar.tracker import HoldQueueFullError, RequestTracker, Ticket

log = logging.getLogger(__name__)

TRACER_NAME = "throttllem.gateway"
PASSTHROUGH = "passthrough"  # the route label of untracked requests
DEFAULT_MAX_TOKENS = 1024  # a Triton or chat request without a limit (Triton itself requires one)
CONNECT_TIMEOUT_S = 10.0  # a black-holed upstream fails fast instead of after request_timeout_s
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # long-context prompts exceed aiohttp's 1 MiB default
SHUTDOWN_RETRY_AFTER_S = 1.0

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
ATTR_HELD_S = "throttllem.held_s"  # arrival to admission
ATTR_TTFT_S = "throttllem.ttft_s"  # arrival at the gateway (hold included) to the first token
ATTR_OUTCOME = "throttllem.outcome"


class Outcome(enum.StrEnum):
    """How a request through the gateway ended."""

    OK = "ok"
    REJECTED = "rejected"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    ERROR = "error"  # a bug in the gateway; aiohttp answers 500


@dataclass(slots=True)
class GatewayStats:
    """Totals since start, read by the sidecar's /metrics at scrape time."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, outcome)
    rejected: Counter[int] = field(default_factory=Counter)  # by status the gateway answered: 429, 503
    upstream_errors: int = 0  # upstream unreachable, timed out, or broken mid-response
    streamed_tokens: int = 0  # output tokens counted from SSE events
    body_tokens: int = 0  # output tokens counted from whole (non-streamed) answers


@dataclass(slots=True)
class _Exchange:
    """One tracked request on its way through."""

    route: Route
    facts: RequestFacts
    ticket: Ticket | None = None
    outcome: Outcome = Outcome.ERROR
    status: int | None = None  # what the client was answered
    tokens: int = 0


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
        self.stats = GatewayStats()
        self._session = client_session
        self._owns_session = client_session is None
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, request_timeout_s)
        )
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._closed = False

    def routes(self) -> list[web.RouteDef]:
        """Tracked LLM routes first, then the catch-all pass-through."""
        tracked = [web.post(route.path, self._tracked_handler(route)) for route in TRACKED_ROUTES]
        return [*tracked, web.route("*", "/{tail:.*}", self._passthrough)]

    async def close(self) -> None:
        """Refuse new requests (503) and close the client session if the gateway made it."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    # -- tracked requests ------------------------------------------------------------------------

    def _tracked_handler(self, route: Route) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._tracked(route, request)

        return handle

    async def _tracked(self, route: Route, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        facts = read_request(
            route, body, request.match_info.get("model"), self.prompt_tokens, self.default_max_tokens
        )
        exchange = _Exchange(route, facts)
        attributes: dict[str, str | bool | int] = {
            ATTR_ROUTE: route.path,
            ATTR_METHOD: request.method,
            ATTR_STREAM: facts.stream,
            ATTR_PROMPT_TOKENS: facts.prompt_tokens,
            ATTR_MAX_TOKENS: facts.max_tokens,
        }
        if facts.model is not None:
            attributes[ATTR_MODEL] = facts.model
        with self._tracer.start_as_current_span(
            f"{request.method} {route.path}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._admit_and_forward(request, body, exchange)
            except asyncio.CancelledError:  # the server cancels handlers of vanished clients
                exchange.outcome = Outcome.CLIENT_DISCONNECTED
                raise
            except Exception as exc:
                exchange.outcome = Outcome.ERROR
                span.record_exception(exc)
                raise
            finally:
                self._record(exchange, span)

    async def _admit_and_forward(
        self, request: web.Request, body: bytes, exchange: _Exchange
    ) -> web.StreamResponse:
        if self._closed:
            return await self._refuse(
                request, exchange, 503, "the gateway is shutting down", SHUTDOWN_RETRY_AFTER_S
            )
        try:
            ticket = self.tracker.arrive(exchange.facts.prompt_tokens, exchange.facts.max_tokens)
        except HoldQueueFullError as exc:
            return await self._refuse(request, exchange, 429, str(exc), exc.retry_after_s)
        exchange.ticket = ticket
        try:
            await self.tracker.wait_admitted(ticket)
            headers = forward_headers(request, tracked=True)
            inject(headers)  # the current span (ours) becomes the engine's parent
            try:
                upstream = await self._open(request, headers, body)
            except _UpstreamFailedError as exc:
                exchange.outcome = Outcome.UPSTREAM_ERROR
                return await self._answer_error(request, exchange, exc)
            try:
                return await self._relay(request, upstream, exchange)
            finally:
                _done(upstream)
        finally:
            self.tracker.finish(ticket, ok=exchange.outcome is Outcome.OK)

    async def _refuse(
        self, request: web.Request, exchange: _Exchange, status: int, message: str, retry_after_s: float
    ) -> web.StreamResponse:
        """429 (hold queue full) or 503 (closing): never a silent drop."""
        exchange.outcome = Outcome.REJECTED
        exchange.status = status
        self.stats.rejected[status] += 1
        response = _error_response(exchange.route.api, status, message)
        response.headers["Retry-After"] = str(max(0, math.ceil(retry_after_s)))
        await _deliver(request, response)
        return response

    async def _answer_error(
        self, request: web.Request, exchange: _Exchange, exc: _UpstreamFailedError
    ) -> web.StreamResponse:
        """502 or 504 in the route's error shape."""
        exchange.status = exc.status
        response = _error_response(exchange.route.api, exc.status, str(exc))
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

        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=response_headers(upstream, True)
        )
        outcome = await self._pump(request, upstream, response, count)
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
            body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = self._upstream_failed(exc, "while sending its answer")
            return await self._answer_error(request, exchange, failure), Outcome.UPSTREAM_ERROR
        if 200 <= upstream.status < 300:
            self._report(exchange, tokens.body(body), streamed=False)
        response = web.Response(
            status=upstream.status,
            reason=upstream.reason,
            body=body,
            headers=response_headers(upstream, True),
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
            if ticket.admitted_s is not None:
                attributes[ATTR_HELD_S] = ticket.admitted_s - ticket.arrival_s
            if ticket.first_token_s is not None:
                attributes[ATTR_TTFT_S] = ticket.first_token_s - ticket.arrival_s
        span.set_attributes(attributes)
        if exchange.outcome is not Outcome.OK:
            span.set_status(Status(StatusCode.ERROR, exchange.outcome.value))
        self.stats.requests[(exchange.route.path, exchange.outcome.value)] += 1

    # -- pass-through ----------------------------------------------------------------------------

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        """Anything that is not an LLM request: relayed untracked, bodies streamed both ways."""
        api = api_for_path(request.path)
        if self._closed:
            response = _error_response(api, 503, "the gateway is shutting down")
            response.headers["Retry-After"] = str(math.ceil(SHUTDOWN_RETRY_AFTER_S))
            self.stats.rejected[503] += 1
            self.stats.requests[(PASSTHROUGH, Outcome.REJECTED.value)] += 1
            return response
        data = request.content if request.body_exists else None
        try:
            upstream = await self._open(request, forward_headers(request, tracked=False), data)
        except _UpstreamFailedError as exc:
            self.stats.requests[(PASSTHROUGH, Outcome.UPSTREAM_ERROR.value)] += 1
            return _error_response(api, exc.status, str(exc))
        try:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=response_headers(upstream, False)
            )
            outcome = await self._pump(request, upstream, response, None)
        finally:
            _done(upstream)
        self.stats.requests[(PASSTHROUGH, outcome.value)] += 1
        return response

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
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.add_routes(gateway.routes())

    async def close(_: web.Application) -> None:
        await gateway.close()

    app.on_cleanup.append(close)
    return app


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
    """The client's headers for the upstream: end-to-end fields only, plus X-Forwarded-*.

    Host becomes the upstream's. A tracked request asks for an identity encoding, since the
    gateway reads its answer; Content-Length is recomputed from the body the gateway read.
    """
    headers = without_hop_by_hop(request.headers)
    for name in ("Host", "Expect", *(("Content-Length", "Accept-Encoding") if tracked else ())):
        headers.popall(name, None)
    if tracked:
        headers["Accept-Encoding"] = "identity"
    if request.remote:
        chain = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{chain}, {request.remote}" if chain else request.remote
    headers.setdefault("X-Forwarded-Host", request.host)
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    return headers


def response_headers(upstream: aiohttp.ClientResponse, drop_length: bool) -> CIMultiDict[str]:
    """The upstream's end-to-end headers; Content-Length dropped when the gateway re-frames."""
    headers = without_hop_by_hop(upstream.headers)
    if drop_length:
        headers.popall("Content-Length", None)
    return headers


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
