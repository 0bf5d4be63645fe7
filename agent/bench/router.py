"""The local backend's route: a reverse proxy on loopback whose upstream the coordinator moves.

On Kubernetes a Service's selector does this; locally, clients talk to this proxy and it relays
each request, bodies streamed both ways (token streams stay unbuffered), to the gateway of the
engine it points at. A request keeps the upstream it started on, so a switch never cuts a stream:
only requests that arrive after it go to the new engine. Without an upstream it answers 503 with
Retry-After. Bodies are bounded as the sidecar's gateway bounds them by default
(`GatewayLimits.max_body_bytes`).
"""

from __future__ import annotations

import contextlib

import aiohttp
from aiohttp import web
from yarl import URL

from agent.sidecar.gateway import GatewayLimits, without_hop_by_hop

CONNECT_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1


class Router:
    """Relays every request to `upstream_url`; `point_at` moves it for requests arriving later."""

    def __init__(self) -> None:
        self.upstream_url: str | None = None
        self.relayed = 0  # requests relayed, whatever their answer
        self._session: aiohttp.ClientSession | None = None

    def point_at(self, upstream_url: str) -> None:
        """Send requests that arrive from now on to `upstream_url`."""
        self.upstream_url = upstream_url.rstrip("/")

    def app(self) -> web.Application:
        """The aiohttp application serving every path."""
        app = web.Application(client_max_size=GatewayLimits().max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        app.on_cleanup.append(self._close)
        return app

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        upstream = self.upstream_url
        if upstream is None:
            return web.json_response(
                {"error": "no engine is serving yet"}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        headers = without_hop_by_hop(request.headers)
        headers.popall("Host", None)
        url = URL(upstream + request.rel_url.raw_path_qs, encoded=True)
        data = request.content if request.body_exists else None
        try:
            answer = await self._client().request(request.method, url, headers=headers, data=data)
        except (TimeoutError, aiohttp.ClientError) as err:
            return web.json_response({"error": f"the engine at {upstream} did not answer: {err}"}, status=502)
        self.relayed += 1
        try:
            response = web.StreamResponse(
                status=answer.status, reason=answer.reason, headers=without_hop_by_hop(answer.headers)
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            answer.release()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=timeout, auto_decompress=False
            )
        return self._session

    async def _close(self, _: web.Application) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
