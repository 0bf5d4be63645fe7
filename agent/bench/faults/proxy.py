"""A fault-injecting HTTP proxy: what the sidecar reads or steers, made to hang, fail or lie.

The fault suite puts one in front of the twin's GPU endpoint (`/twin/v1/gpu...`, which stands
for NVML) and one in front of its metrics port. In `pass` mode it forwards; the other modes are
the faults a real engine or driver shows:

    hang       accept the request and never answer (a stopped engine, a wedged driver call)
    error      answer 500 (an exporter or endpoint failing)
    garbage    answer 200 with bytes that are not the expected format
    huge       answer 200 with a body of `huge_bytes`, streamed (a runaway metrics page)

Every request is recorded with its arrival time on the suite's monotonic clock, whatever the
mode, so the suite sees *when* the sidecar asked for stock clocks even while the twin behind
the proxy cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

CHUNK = b"# garbage\n" * 6_554  # 64 KiB per write of a huge page
GARBAGE = b"\x00\xffnot a metrics page {]\n" * 64


class Mode(enum.StrEnum):
    """What the proxy does with the next requests."""

    PASS = "pass"
    HANG = "hang"
    ERROR = "error"
    GARBAGE = "garbage"
    HUGE = "huge"


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the proxy received."""

    at_s: float  # time.monotonic() on arrival
    method: str
    path: str


@dataclass(slots=True)
class FaultProxy:
    """Forwards to `upstream` unless told to fail; records every request."""

    upstream: str
    huge_bytes: int = 256 * 1024 * 1024
    mode: Mode = Mode.PASS
    seen: list[Seen] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self, host: str = "127.0.0.1") -> FaultProxy:
        """Listen on a free port of `host`; `url` says where."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        """Stop listening (hung requests are cancelled) and close the upstream session."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def requests_since(self, since_s: float, method: str | None = None) -> list[Seen]:
        """Requests that arrived at or after `since_s`, optionally of one method."""
        return [s for s in self.seen if s.at_s >= since_s and (method is None or s.method == method)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(time.monotonic(), request.method, request.path))
        match self.mode:
            case Mode.HANG:
                await asyncio.Event().wait()  # until the client gives up or the proxy closes
                raise AssertionError("unreachable")
            case Mode.ERROR:
                return web.json_response({"error": "injected fault"}, status=500)
            case Mode.GARBAGE:
                return web.Response(body=GARBAGE, content_type="text/plain")
            case Mode.HUGE:
                return await self._huge(request)
        return await self._forward(request)

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4"})
        await response.prepare(request)
        sent = 0
        with contextlib.suppress(ConnectionError):  # the reader gave up, as it should
            while sent < self.huge_bytes:
                await response.write(CHUNK)
                sent += len(CHUNK)
            await response.write_eof()
        return response

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        try:
            async with self._session.request(
                request.method,
                f"{self.upstream}{request.rel_url}",
                data=body or None,
                headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
            ) as upstream:
                payload = await upstream.read()
                return web.Response(
                    status=upstream.status,
                    body=payload,
                    content_type=upstream.content_type,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response({"error": f"proxy: upstream failed: {exc}"}, status=502)
