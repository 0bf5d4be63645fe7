"""Per-request energy end to end on loopback: clients, gateway, engine, a fake meter, the sidecar port."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from agent.sidecar.energy import EnergySampler
from agent.sidecar.gateway import ATTR_PUBLIC_ID, REQUEST_ID_HEADER, Gateway
from agent.sidecar.http_api import build_sidecar_app
from agent.sidecar.metrics import SidecarMetrics
from agent.sidecar.request_energy import MAX_LABEL_CHARS, OVERFLOW_LABEL, RequestEnergyLedger
from agent.sidecar.spans import ATTR_REQUEST_ENERGY_J, ATTR_REQUEST_TOKENS, RequestSpans
from tests.unit.fake_llm_engine import TOKEN, FakeEngine, serve, sse
from tests.unit.sidecar_fakes import FakeMeter, Rig, ScriptedPolicy, rig
from tests.unit.test_sidecar_gateway import eventually, free_port, serve_gateway, stack

HEX_ID = re.compile(r"[0-9a-f]{32}")
TENANT_HEADER = "X-Tenant"


class WordCounter:
    """Prompt tokens are words: the test knows every count without the gateway's estimate."""

    def count(self, text: str) -> int:
        return len(text.split())


class SteppedEngine:
    """OpenAI completions streamed on the test's command: per prompt, a queue of token counts (0: end)."""

    def __init__(self) -> None:
        self.steps: defaultdict[str, asyncio.Queue[int]] = defaultdict(asyncio.Queue)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        steps = self.steps[(await request.json())["prompt"]]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while tokens := await steps.get():
            for _ in range(tokens):
                await response.write(chunk(TOKEN))
        await response.write(chunk("", finish="length") + sse("[DONE]"))
        await response.write_eof()
        return response


def chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]})


@dataclass
class Sidecar:
    rig: Rig
    ledger: RequestEnergyLedger
    meter: FakeMeter
    sampler: EnergySampler
    gateway_url: str
    sidecar_url: str
    client: aiohttp.ClientSession
    spans: InMemorySpanExporter

    async def tick(self, rise_j: float | None = 0.0) -> None:
        """The meter's energy rises by `rise_j` (None: the read fails), then the sampler reads it."""
        self.meter.failing = rise_j is None
        self.meter.energy_j_now += rise_j or 0.0
        await self.sampler.sample()

    async def energy(self, request_id: str) -> tuple[int, dict]:
        async with self.client.get(f"{self.sidecar_url}/v1/requests/{request_id}/energy") as response:
            return response.status, await response.json()

    async def metrics(self) -> dict:
        async with self.client.get(f"{self.sidecar_url}/metrics") as response:
            text = await response.text()
        return {family.name: family for family in text_string_to_metric_families(text)}


@asynccontextmanager
async def sidecar(engine: web.Application, max_label_values: int = 64) -> AsyncIterator[Sidecar]:
    """The app's wiring (`app.build_sidecar`) around the sidecar fakes: ledger, sampler, metrics, spans."""
    ledger = RequestEnergyLedger()
    r = rig(ScriptedPolicy([None]), energy=ledger)
    meter = FakeMeter()
    sampler = EnergySampler(meter, ledger=ledger, clock=r.clock)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request_spans = RequestSpans(ledger)
    async with serve(engine) as engine_url:
        gateway = Gateway(
            r.tracker,
            engine_url,
            prompt_tokens=WordCounter(),
            tracer_provider=provider,
            tenant_header=TENANT_HEADER,
            request_spans=request_spans,
        )
        metrics = SidecarMetrics(r.loop, r.tracker, sampler, {"engine": "trtllm-serve"}, gateway=gateway)
        sampler.add_observer(metrics.add_request_energy(ledger, max_label_values))
        sampler.add_observer(request_spans.settle)
        async with (
            serve_gateway(gateway) as gateway_url,
            serve(build_sidecar_app(r.loop, metrics, ledger)) as sidecar_url,
            aiohttp.ClientSession() as client,
        ):
            yield Sidecar(r, ledger, meter, sampler, gateway_url, sidecar_url, client, exporter)


@dataclass
class Stream:
    """One streamed completion, read as it arrives: tokens received, its id, when it ended."""

    prompt: str
    tenant: str | None
    tokens: int = 0
    request_id: str | None = None
    done_ns: int | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self, s: Sidecar) -> Stream:
        self.task = asyncio.create_task(self._read(s))
        return self

    async def _read(self, s: Sidecar) -> None:
        body = {"model": "m", "prompt": self.prompt, "max_tokens": 100, "stream": True}
        headers = {TENANT_HEADER: self.tenant} if self.tenant is not None else {}
        async with s.client.post(f"{s.gateway_url}/v1/completions", json=body, headers=headers) as response:
            assert response.status == 200
            self.request_id = response.headers[REQUEST_ID_HEADER]
            async for line in response.content:
                if b'"text":" tok"' in line:
                    self.tokens += 1
        self.done_ns = time.time_ns()


def proportional(windows: list[tuple[float, dict[str, int]]]) -> dict[str, float]:
    """Each window's energy split over the tokens each request processed in it."""
    energy: dict[str, float] = defaultdict(float)
    for window_j, tokens in windows:
        for name, count in tokens.items():
            energy[name] += window_j * count / sum(tokens.values())
    return energy


def by_id(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {
        str(span.attributes[ATTR_PUBLIC_ID]): span
        for span in spans
        if span.attributes and ATTR_PUBLIC_ID in span.attributes
    }


def test_two_streams_are_charged_in_proportion_to_their_tokens_per_meter_reading():
    async def scenario() -> None:
        engine = SteppedEngine()
        async with sidecar(engine.app()) as s:
            await s.tick()  # the first reading: the baseline
            await s.tick(50.0)  # nothing ran: idle
            a = Stream("a1 a2 a3", tenant="acme").start(s)  # 3 prompt tokens
            b = Stream("b1 b2 b3 b4 b5 b6 b7", tenant=None).start(s)  # 7
            await eventually(lambda: len(s.rig.tracker.view().run_ids) == 2)

            engine.steps[a.prompt].put_nowait(1)
            engine.steps[b.prompt].put_nowait(3)
            await eventually(lambda: (a.tokens, b.tokens) == (1, 3))
            await s.tick(70.0)

            engine.steps[a.prompt].put_nowait(2)
            engine.steps[b.prompt].put_nowait(6)
            engine.steps[b.prompt].put_nowait(0)
            await eventually(lambda: (a.tokens, b.tokens) == (3, 9) and s.rig.tracker.in_flight == 1)
            assert b.request_id is not None and b.done_ns is not None
            status, before = await s.energy(b.request_id)
            assert status == 200 and before["final"] is False and before["energy_j"] == 50.0
            assert s.spans.get_finished_spans() == ()  # the span waits for its energy
            await asyncio.sleep(0.2)
            tick_ns = time.time_ns()
            await s.tick(40.0)  # b finished in this window: final now

            engine.steps[a.prompt].put_nowait(5)
            engine.steps[a.prompt].put_nowait(0)
            await eventually(lambda: a.tokens == 8 and s.rig.tracker.in_flight == 0)
            assert a.request_id is not None
            await s.tick(None)  # the read fails: a's window stays open
            await s.tick(0.0)  # the meter has not updated
            assert (await s.energy(a.request_id))[1]["final"] is False
            await s.tick(30.0)

            expected = proportional(
                [
                    (70.0, {"a": 3 + 1, "b": 7 + 3}),  # prompts count with their first token
                    (40.0, {"a": 2, "b": 6}),
                    (30.0, {"a": 5}),
                ]
            )
            for stream, name, tokens in ((a, "a", 3 + 8), (b, "b", 7 + 9)):
                assert stream.request_id is not None and HEX_ID.fullmatch(stream.request_id)
                status, body = await s.energy(stream.request_id)
                assert status == 200
                assert body == {
                    "request_id": stream.request_id,
                    "energy_j": expected[name],
                    "tokens": tokens,
                    "final": True,
                }
            assert a.request_id != b.request_id

            families = await s.metrics()
            histogram = {
                (sample.name, sample.labels["tenant"], sample.labels.get("le")): sample.value
                for sample in families["throttllem_request_energy_joules"].samples
            }
            name = "throttllem_request_energy_joules"
            assert histogram[(f"{name}_sum", "acme", None)] == expected["a"]
            assert histogram[(f"{name}_sum", "", None)] == expected["b"]
            assert histogram[(f"{name}_count", "acme", None)] == histogram[(f"{name}_count", "", None)] == 1
            assert (
                histogram[(f"{name}_bucket", "", "30.0")] == 0
                and histogram[(f"{name}_bucket", "", "100.0")] == 1
            )
            models = {sample.labels["model"] for sample in families[name].samples}
            assert models == {"m"}
            assert families["throttllem_energy_idle_joules"].samples[0].value == 50.0
            assert families["throttllem_energy_attributed_joules"].samples[0].value == 140.0

            spans = by_id(list(s.spans.get_finished_spans()))
            for stream, name in ((a, "a"), (b, "b")):
                assert stream.request_id is not None
                span = spans[stream.request_id]
                assert (
                    span.attributes is not None and span.attributes[ATTR_REQUEST_ENERGY_J] == expected[name]
                )
            b_span = spans[b.request_id]
            assert b_span.attributes is not None and b_span.attributes[ATTR_REQUEST_TOKENS] == 16
            assert b_span.end_time is not None and b_span.start_time is not None
            # Ended at the request's completion, not at the reading that made its energy final.
            assert abs(b_span.end_time - b.done_ns) < 100_000_000 and b_span.end_time < tick_ns - 150_000_000

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_hostile_tenants_and_models_stay_within_the_label_cap():
    cap = 8

    async def scenario() -> None:
        async with sidecar(FakeEngine().app(), max_label_values=cap) as s:
            await s.tick()
            limit = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                body = {"model": f"model-{i}-" + "x" * 10_000, "prompt": "hi", "max_tokens": 2}
                async with (
                    limit,
                    s.client.post(
                        f"{s.gateway_url}/v1/completions", json=body, headers={TENANT_HEADER: f"tenant-{i}"}
                    ) as response,
                ):
                    assert response.status == 200 and HEX_ID.fullmatch(response.headers[REQUEST_ID_HEADER])

            await asyncio.gather(*(one(i) for i in range(1000)))
            await s.tick(100.0)
            families = await s.metrics()
            samples = families["throttllem_request_energy_joules"].samples
            tenants = {sample.labels["tenant"] for sample in samples}
            models = {sample.labels["model"] for sample in samples}
            counted = sum(sample.value for sample in samples if sample.name.endswith("_count"))
            assert counted == 1000
            assert len(tenants) == len(models) == cap + 1
            assert OVERFLOW_LABEL in tenants and OVERFLOW_LABEL in models
            assert all(len(model) <= MAX_LABEL_CHARS for model in models)
            series = {(sample.labels["model"], sample.labels["tenant"]) for sample in samples}
            assert len(series) <= (cap + 1) ** 2

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_request_ids_are_validated_before_lookup():
    async def scenario() -> None:
        async with sidecar(FakeEngine().app()) as s:
            for bad in ("zz" * 16, "ab" * 15, "ab" * 17, "", "%20" + "a" * 29, "g" * 32):
                status, body = await s.energy(bad)
                assert status == 400 and "32 hexadecimal digits" in body["error"], bad
            assert await s.energy("0" * 32) == (404, {"error": "unknown request id"})
            r = rig(ScriptedPolicy([None]))
            metrics = SidecarMetrics(r.loop, r.tracker, EnergySampler(None), {})
            async with (
                serve(build_sidecar_app(r.loop, metrics)) as url,  # no meter: nothing is known
                s.client.get(f"{url}/v1/requests/{'0' * 32}/energy") as response,
            ):
                assert response.status == 404
                assert "per-request energy is off" in (await response.json())["error"]

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_every_answer_with_a_ticket_names_its_request_and_its_span_does_too():
    async def scenario() -> None:
        async with stack() as st:
            requests = [
                ("/v2/models/ensemble/generate", {"text_input": "hi", "max_tokens": 3}),
                ("/v2/models/ensemble/generate_stream", {"text_input": "hi", "max_tokens": 3}),
                ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3}),
                ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}),
                ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            ]
            ids = []
            for path, body in requests:
                async with st.client.post(st.url + path, json=body) as response:
                    assert response.status == 200
                    await response.read()
                    ids.append(response.headers[REQUEST_ID_HEADER])
            too_deep = b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}"  # refused by the gateway: no ticket
            async with st.client.post(st.url + "/v1/completions", data=too_deep) as response:
                assert response.status == 400 and REQUEST_ID_HEADER not in response.headers
            await eventually(lambda: len(st.finished()) == len(requests) + 1)
            assert all(HEX_ID.fullmatch(request_id) for request_id in ids) and len(set(ids)) == len(ids)
            assert set(ids) <= set(by_id(st.finished()))
        async with (
            stack(upstream_url=f"http://127.0.0.1:{free_port()}") as st,  # nothing listens: 502
            st.client.post(st.url + "/v1/completions", json={"prompt": "hi"}) as response,
        ):
            assert response.status == 502 and HEX_ID.fullmatch(response.headers[REQUEST_ID_HEADER])

    asyncio.run(asyncio.wait_for(scenario(), 10))
