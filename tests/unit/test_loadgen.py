"""The load generator against a real loopback server that streams like Triton and refuses once."""

import asyncio
import json
import time

import numpy as np
import pytest
from aiohttp import web

from agent.domain import Request
from agent.slo_presets import load_slo_preset
from agent.workloads.loadgen import TokenRecording, generate_load, request_body


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v2/models/{model}/generate_stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_requests_are_streamed_timed_and_retried():
    seen: list[dict] = []
    refused = {"left": 1}

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        if body["prompt_tokens"] == 7 and refused["left"]:
            refused["left"] -= 1
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "0"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["output_tokens"]):
            await asyncio.sleep(0.01)
            await response.write(f"data: {json.dumps({'text_output': ' tok', 'i': i})}\n\n".encode())
        return response

    async def scenario():
        runner, url = await serve(handler)
        try:
            requests = [Request(1, 0.0, 12, 64, 5), Request(2, 0.1, 7, 64, 1), Request(3, 0.2, 3, 64, 3)]
            return await generate_load(url, "ensemble", requests, time_scale=2.0)
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    by_id = {r.request_id: r for r in report.results}
    assert [by_id[i].output_tokens for i in (1, 2, 3)] == [5, 1, 3]
    assert by_id[2].retries == 1 and all(r.answered for r in report.results)
    assert 0.005 < by_id[1].ttft_s < by_id[1].e2e_s and by_id[1].tpot_s > 0.005
    assert np.isnan(by_id[2].tpot_s)
    assert seen[0]["text_input"] == "tok " * 12 and seen[0]["max_tokens"] == 64
    summary = report.summary(load_slo_preset("mlperf-server", "llama3-8b"))
    assert summary["answered"] == 3 and summary["retries"] == 1 and summary["slo_attainment"] == 1.0
    assert 0.1 <= report.wall_s < 5


def test_failures_are_reported_not_raised_and_count_against_attainment():
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": "model not ready"}, status=400)

    async def scenario():
        runner, url = await serve(handler)
        try:
            return await generate_load(url, "ensemble", [Request(1, 0.0, 4, 8, 2)])
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    assert report.results[0].status == 400 and not report.results[0].answered
    summary = report.summary(load_slo_preset("mlperf-server", "llama3-8b"))
    assert summary["failed"] == 1 and summary["slo_attainment"] == 0.0


def test_body_caps_the_true_length_at_max_tokens():
    assert request_body(Request(1, 0.0, 2, 10, 50))["output_tokens"] == 10
    assert "output_tokens" not in request_body(Request(1, 0.0, 2, 10, None))


def test_token_times_and_delivery_lags_are_recorded_when_asked():
    delay_s = 0.03  # the server stamps each token this long before sending it

    async def handler(request: web.Request) -> web.StreamResponse:
        arrival_ns = time.time_ns() + round(delay_s * 1e9)  # as if the request took 30 ms to arrive
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["output_tokens"]):
            await asyncio.sleep(0.02)
            payload = {"text_output": " tok"}
            if body.get("return_perf_metrics"):
                payload["last_token_time_ns"] = time.time_ns() - round(delay_s * 1e9)
                payload["arrival_time_ns"] = arrival_ns
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        return response

    async def scenario(record):
        runner, url = await serve(handler)
        try:
            return await generate_load(url, "ensemble", [Request(1, 0.0, 4, 8, 4)], record=record)
        finally:
            await runner.cleanup()

    plain = asyncio.run(scenario(None)).results[0]
    assert plain.token_times_s == () and plain.token_lags_s == () and plain.token_gaps_s.size == 0
    report = asyncio.run(scenario(TokenRecording(times=True, lags=True)))
    result = report.results[0]
    assert len(result.token_times_s) == 4 and result.token_times_s[0] == pytest.approx(result.ttft_s)
    assert np.all(result.token_gaps_s > 0.015) and report.token_gaps_s().size == 3
    lags = result.token_lags_s
    assert len(lags) == 4 and all(delay_s <= lag < delay_s + 0.05 for lag in lags)
    assert delay_s <= result.request_lag_s < delay_s + 0.05 and np.isnan(plain.request_lag_s)
    summary = report.summary()
    assert summary["tbt_p50_s"] == pytest.approx(float(np.median(result.token_gaps_s)))
    assert request_body(Request(1, 0.0, 2, 10, 5), perf_metrics=True)["return_perf_metrics"] is True
