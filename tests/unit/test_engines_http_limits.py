"""A metrics page is read with a bound: a huge or endless one is refused, never held whole."""

import asyncio
import gc
import tracemalloc

import aiohttp
import pytest
from aiohttp import web

from agent.engines.base import MalformedMetricsError
from agent.engines.http import MAX_PAGE_BYTES, fetch_text

CHUNK = b"# padding\n" * 6554


async def serve(handler):
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"


async def endless(request: web.Request) -> web.StreamResponse:
    """Chunked, no length, far past the bound (the fault suite's runaway page)."""
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(2 * MAX_PAGE_BYTES // len(CHUNK)):
        await response.write(CHUNK)
    return response


async def declared_huge(_: web.Request) -> web.Response:
    return web.Response(body=b"x" * (MAX_PAGE_BYTES + 1))


async def small(_: web.Request) -> web.Response:
    return web.Response(
        body=b"nv_gpu_utilization 1\n", headers={"Content-Type": "text/plain; charset=no-such-charset"}
    )


async def fetch_from(handler) -> str:
    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session:
            return await fetch_text(session, url, timeout_s=5.0, accept="text/plain")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("handler", [endless, declared_huge])
def test_a_page_past_the_bound_is_refused_as_malformed(handler):
    with pytest.raises(MalformedMetricsError, match="over 8 MiB"):
        asyncio.run(fetch_from(handler))


def test_a_page_within_the_bound_is_read_whole_even_with_an_unknown_charset():
    assert asyncio.run(fetch_from(small)) == "nv_gpu_utilization 1\n"


def test_refused_pages_are_not_kept_alive_by_their_errors():
    """A page refused every poll must not pile up: the error's traceback must not hold the bytes read."""

    async def refuse_repeatedly() -> int:
        runner, url = await serve(endless)
        try:
            async with aiohttp.ClientSession() as session:
                tracemalloc.start()
                errors = []  # kept, as a log record or a health tracker may keep them
                for _ in range(6):
                    with pytest.raises(MalformedMetricsError) as caught:
                        await fetch_text(session, url, timeout_s=5.0, accept="text/plain")
                    errors.append(caught.value)
                held, _ = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                return held
        finally:
            await runner.cleanup()

    gc.disable()  # the cyclic GC would free them at some point; RSS under an OOM limit cannot wait
    try:
        held = asyncio.run(refuse_repeatedly())
    finally:
        gc.enable()
    assert held < 2 * MAX_PAGE_BYTES
