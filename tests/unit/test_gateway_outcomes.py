"""Issue 12, item 8 (gateway): outcomes counted right, clients that leave noticed, all on /metrics."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent.sidecar.app import serve as sidecar_serve
from agent.sidecar.energy import EnergySampler
from agent.sidecar.gateway import GatewayLimits
from agent.sidecar.metrics import SidecarMetrics
from tests.unit.fake_llm_engine import serve
from tests.unit.sidecar_fakes import FakeTrtllmServe, ScriptedPolicy, rig
from tests.unit.test_gateway_limits import ask, head
from tests.unit.test_gpus_twin import FakeTwinGpu
from tests.unit.test_gpus_twin import serve as serve_twin
from tests.unit.test_sidecar_app import free_port
from tests.unit.test_sidecar_app import settings as sidecar_settings
from tests.unit.test_sidecar_gateway import eventually, run, stack


def test_an_openai_sdk_stream_counts_as_ok():
    async def scenario() -> None:
        async with stack() as s:
            s.engine.event_delay_s = 0.05  # the engine ends its stream a moment after [DONE]: the SDK is gone
            client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
            try:
                for _ in range(2):
                    stream = await client.completions.create(
                        model="m", prompt="hi", max_tokens=4, stream=True
                    )
                    texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
                    assert "".join(texts) == " tok" * 4
                chat = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
                )
                assert len([chunk async for chunk in chat]) == 5  # role, 3 tokens, finish
            finally:
                await client.close()
            await eventually(lambda: len(s.finished()) == 3)
            assert s.tracker.counters.completed == 3 and s.tracker.counters.failed == 0
            assert [span.attributes["throttllem.outcome"] for span in s.finished()] == ["ok"] * 3
            assert s.gateway.stats.client_disconnects == 0

    run(scenario)


def test_a_client_that_closes_right_after_done_counts_as_ok():
    """What openai SDKs before the HTTP/1.1 drain did (and what the issue saw): close at [DONE]."""

    async def scenario() -> None:
        async with stack() as s:
            s.engine.event_delay_s = 0.05  # the engine ends its stream a moment after [DONE]
            body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
            resp = await s.client.post(f"{s.url}/v1/completions", json=body)
            while b"data: [DONE]" not in await resp.content.readuntil(b"\n\n"):
                pass
            resp.close()  # drops the connection before the stream's end
            await eventually(lambda: len(s.finished()) == 1)
            assert s.only_span().attributes["throttllem.outcome"] == "ok"
            assert s.tracker.counters.completed == 1 and s.tracker.counters.failed == 0
            assert list(s.tracker.tokens.values()) == [3]

    run(scenario)


def test_a_client_that_drops_a_non_streamed_generate_is_noticed_and_the_upstream_closed():
    cancelled = asyncio.Event()

    async def slow_generate(request: web.Request) -> web.Response:
        await request.read()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({"text_output": "late"})

    async def scenario() -> None:
        engine = web.Application()
        engine.router.add_post("/v2/models/{model}/generate", slow_generate)
        async with (
            serve(engine, handler_cancellation=True) as engine_url,
            stack(upstream_url=engine_url) as s,
        ):
            url = f"{s.url}/v2/models/ensemble/generate"
            request = asyncio.create_task(s.client.post(url, json={"text_input": "hi", "max_tokens": 5}))
            await eventually(lambda: s.tracker.in_flight == 1)
            request.cancel()  # the client gives up and drops the connection
            await eventually(lambda: s.tracker.counters.failed == 1, timeout_s=2)
            s.tracker.assert_empty()
            await asyncio.wait_for(cancelled.wait(), 2)  # the engine's request was closed too
            await eventually(lambda: len(s.finished()) == 1)
            assert s.only_span().attributes["throttllem.outcome"] == "client_disconnected"
            assert s.gateway.stats.client_disconnects == 1

    run(scenario)


def test_a_draining_gateway_answers_503_with_retry_after_while_in_flight_requests_finish():
    async def scenario() -> None:
        async with stack() as s:
            s.engine.gate = asyncio.Event()
            body = {"text_input": "hello", "max_tokens": 3, "stream": True}
            in_flight = await s.client.post(f"{s.url}/v2/models/ensemble/generate_stream", json=body)
            await in_flight.content.readuntil(b"\n\n")
            drain = asyncio.create_task(s.gateway.drain(5))
            await asyncio.sleep(0.05)
            assert not drain.done()
            status, headers, _ = await ask(s.url, head("GET", "/v2/health/ready"))
            assert status == 503 and headers["retry-after"] == "1"
            status, _, _ = await ask(s.url, head("POST", "/v1/completions", "Content-Length: 2") + b"{}")
            assert status == 503
            s.engine.gate.set()
            assert (await in_flight.read()).count(b"data: ") == 2
            in_flight.release()
            assert await asyncio.wait_for(drain, 2) is True
            assert s.tracker.counters.completed == 1

    run(scenario)


def test_the_gateways_outcome_counters_are_on_the_sidecars_metrics():
    async def scenario() -> dict[str, list[tuple[dict[str, str], float]]]:
        limits = GatewayLimits(max_body_bytes=1024, body_buffer_bytes=4096)
        async with stack(limits=limits, max_held=1, max_hold_s=30) as s:
            async with s.client.post(f"{s.url}/v1/completions", json={"model": "m", "prompt": "hi"}) as resp:
                assert resp.status == 200
            async with s.client.post(f"{s.url}/twin/v1/gpu/locked_clocks", json={}) as resp:
                assert resp.status == 403
            async with s.client.post(f"{s.url}/v1/completions", data=b"x" * 2000) as resp:
                assert resp.status == 413
            s.tracker.gating = True
            held = asyncio.create_task(s.client.post(f"{s.url}/v1/completions", json={"prompt": "a"}))
            await eventually(lambda: s.tracker.held == 1)
            async with s.client.post(f"{s.url}/v1/completions", json={"prompt": "b"}) as resp:
                assert resp.status == 429
            s.tracker.release_all()
            (await held).release()
            loop = rig(ScriptedPolicy([None])).loop
            metrics = SidecarMetrics(loop, s.tracker, EnergySampler(None), {}, gateway=s.gateway)
            families = {}
            for family in text_string_to_metric_families(metrics.exposition().decode()):
                if family.name.startswith("throttllem_gateway"):
                    families[family.name] = [(sample.labels, sample.value) for sample in family.samples]
            return families

    families = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    requests = {
        (labels["route"], labels["outcome"]): value
        for labels, value in families["throttllem_gateway_requests"]
    }
    assert requests == {
        ("/v1/completions", "ok"): 2,
        ("/v1/completions", "refused"): 1,
        ("/v1/completions", "rejected"): 1,
        ("passthrough", "refused"): 1,
    }
    refusals = {labels["status"]: value for labels, value in families["throttllem_gateway_refusals"]}
    assert refusals == {"403": 1, "413": 1, "429": 1}
    assert families["throttllem_gateway_upstream_errors"] == [({}, 0.0)]
    assert families["throttllem_gateway_client_disconnects"] == [({}, 0.0)]
    assert families["throttllem_gateway_connections_refused"] == [({}, 0.0)]
    assert families["throttllem_gateway_body_bytes_peak"][0][1] > 0


def test_sigterm_drain_answers_new_requests_503_while_the_listener_stays_open():
    """The sidecar's stop path: clocks reset, then the gateway drains with its port still open."""

    async def scenario() -> None:
        release = asyncio.Event()
        stats = FakeTrtllmServe()

        async def slow_completions(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n')
            await release.wait()
            await response.write(b"data: [DONE]\n\n")
            return response

        engine = web.Application()
        engine.router.add_get("/metrics", stats.metrics)
        engine.router.add_post("/v1/completions", slow_completions)
        gpu = FakeTwinGpu()
        twin, twin_url = await serve_twin(gpu)
        async with serve(engine) as engine_url:
            stop, announced = asyncio.Event(), asyncio.Queue()
            config = sidecar_settings(
                engine_url, twin_url, gateway_host="127.0.0.1", gateway_port=free_port()
            )
            sidecar = asyncio.create_task(sidecar_serve(config, stop, announced.put_nowait))
            ports = await asyncio.wait_for(announced.get(), 10)
            gateway = f"http://127.0.0.1:{ports['gateway_port']}"
            async with aiohttp.ClientSession() as client:
                body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True}
                in_flight = await client.post(f"{gateway}/v1/completions", json=body)
                await in_flight.content.readuntil(b"\n\n")
                async with client.post(f"{gateway}/v2/logging", json={}) as resp:
                    assert resp.status == 403
                async with client.get(f"http://127.0.0.1:{ports['sidecar_port']}/metrics") as resp:
                    metrics = await resp.text()
                assert 'throttllem_gateway_refusals_total{status="403"} 1.0' in metrics
                connections = next(
                    f
                    for f in text_string_to_metric_families(metrics)
                    if f.name == "throttllem_gateway_connections"
                )
                assert connections.samples[0].value >= 1  # the stream in flight (and kept-alive ones)
                stop.set()  # what SIGTERM does
                await eventually(lambda: gpu.locked is None)
                status, headers, answer = await ask(
                    gateway, head("POST", "/v1/completions", "Content-Length: 2") + b"{}"
                )
                assert status == 503 and headers["retry-after"] == "1"
                assert "shutting down" in json.loads(answer)["error"]["message"]
                release.set()
                assert (await in_flight.read()).endswith(b"data: [DONE]\n\n")
                in_flight.release()
            assert await asyncio.wait_for(sidecar, 10) is None
        await twin.cleanup()

    run(scenario)
