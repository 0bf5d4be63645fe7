"""Reading live processes: Prometheus pages, histogram quantiles as Prometheus estimates them."""

import asyncio
import math

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from agent.bench.scrape import MetricsPage, bucket_quantile, get_json, get_page


def test_bucket_quantile_interpolates_within_the_bucket_like_prometheus():
    buckets = [(0.001, 50.0), (0.002, 90.0), (math.inf, 100.0)]
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert bucket_quantile(buckets, 0.7) == pytest.approx(0.0015)  # 20 of the bucket's 40, halfway
    assert bucket_quantile(buckets, 0.25) == pytest.approx(0.0005)  # the first bucket starts at 0
    assert bucket_quantile(buckets, 0.99) == pytest.approx(0.002)  # in +Inf: the highest finite bound
    assert bucket_quantile([(0.001, 0.0), (math.inf, 0.0)], 0.99) is None
    assert bucket_quantile([], 0.5) is None


def test_page_reads_labelled_samples_and_histograms():
    registry = CollectorRegistry()
    histogram = Histogram("decide_seconds", "x", buckets=(0.001, 0.01, 0.1), registry=registry)
    for value in [0.0005] * 90 + [0.05] * 10:
        histogram.observe(value)
    text = generate_latest(registry).decode() + 'gpu_clock{kind="sm"} 1050\ngpu_clock{kind="mem"} 1593\n'
    page = MetricsPage.parse(text)
    assert page.value("gpu_clock", kind="mem") == 1593 and page.value("gpu_clock") == 1050
    assert page.value("missing") is None
    assert page.buckets("decide_seconds")[0] == (0.001, 90.0)
    assert page.histogram_quantile("decide_seconds", 0.5) == pytest.approx(0.001 * 50 / 90)
    assert page.histogram_quantile("decide_seconds", 0.99) == pytest.approx(0.01 + 0.09 * 9 / 10)
    with pytest.raises(ValueError):
        MetricsPage.parse("this is { not exposition")


def test_failed_reads_are_none_not_exceptions():
    async def scenario():
        def answer(make_response):
            async def handler(_: web.Request) -> web.Response:
                return make_response()

            return handler

        app = web.Application()
        app.router.add_get("/metrics", answer(lambda: web.Response(text="up 1\n")))
        app.router.add_get("/json", answer(lambda: web.json_response({"clock_mhz": 1410})))
        app.router.add_get("/list", answer(lambda: web.json_response([1, 2])))
        app.router.add_get("/down", answer(lambda: web.Response(status=503, text="no")))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as session:
                return (
                    await get_page(session, f"{base}/metrics"),
                    await get_page(session, f"{base}/down"),
                    await get_json(session, f"{base}/json"),
                    await get_json(session, f"{base}/list"),
                    await get_json(session, f"{base}/down"),
                    await get_json(session, "http://127.0.0.1:1/nothing"),
                )
        finally:
            await runner.cleanup()

    page, down_page, document, listed, down, refused = asyncio.run(scenario())
    assert page is not None and page.value("up") == 1
    assert down_page is None and listed is None and down is None and refused is None
    assert document == {"clock_mhz": 1410}
