"""A real aiohttp server on a loopback port for the engine adapter tests: serves what the test sets."""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiohttp import web


class MetricsServer:
    """Serves `body` at GET /metrics with `status`; the test changes them between polls."""

    def __init__(self, body: str = "", content_type: str = "text/plain") -> None:
        self.body = body
        self.status = 200
        self.delay_s = 0.0
        self.content_type = content_type
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(
            text=self.body, status=self.status, content_type=self.content_type, charset="utf-8"
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
