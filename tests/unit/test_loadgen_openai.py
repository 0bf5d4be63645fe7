"""The load generator's OpenAI modes and per-request energy, against real loopback stand-ins.

The stand-in speaks OpenAI completions and chat completions as vLLM streams them (one token per
chunk, a usage chunk before `data: [DONE]`), names each answer in `X-Throttllem-Request-Id`
as the gateway does, and serves the sidecar's request-energy endpoint: an id's energy turns
final after a few reads.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from agent.cli import main
from agent.domain import Request
from agent.slo_presets import load_slo_preset
from agent.workloads.loadgen import LoadApi, TokenRecording, generate_load, request_body
from agent.workloads.openai_client import ModelListError, OpenAIStreamer, served_models
from agent.workloads.request_energy import REQUEST_ID_HEADER, RequestEnergyReader, parse_energy

MODEL = "llama3-8b"
JOULES_PER_TOKEN = 0.5


class OpenAIStandIn:
    """An OpenAI-compatible engine behind a gateway, with the sidecar's energy endpoint."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: dict[int, float] = {}  # prompt tokens -> monotonic arrival (tests use distinct)
        self.refuse_first: set[int] = set()  # prompt lengths refused once with 429
        self.tokens_per_chunk = 1
        self.break_after: int | None = None  # cut the stream (no finish_reason) after this many chunks
        self.error_after: int | None = None  # an error event after this many chunks
        self.reads_until_final = 3
        self.energy_reads: dict[str, int] = {}
        self.tokens_of: dict[str, int] = {}
        self.served = [MODEL]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/requests/{id}/energy", self.energy)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def models(self, _: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "vllm"} for name in self.served]
        return web.json_response({"object": "list", "data": data})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt_tokens = body["prompt_tokens"]
        self.arrivals.setdefault(prompt_tokens, time.monotonic())
        request_id = f"req-{len(self.bodies)}"
        headers = {REQUEST_ID_HEADER: request_id}
        if prompt_tokens in self.refuse_first:
            self.refuse_first.discard(prompt_tokens)
            error = {"message": "hold queue full", "type": "RateLimitError", "param": None, "code": 429}
            return web.json_response({"error": error}, status=429, headers={**headers, "Retry-After": "0.05"})
        chat = request.path.endswith("/chat/completions")
        tokens = int(body.get("output_tokens", body["max_tokens"]))
        self.tokens_of[request_id] = tokens
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)

        async def send(document: object) -> None:
            data = document if isinstance(document, str) else json.dumps(document)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            kind = "chat.completion.chunk" if chat else "text_completion"
            return {"id": "cmpl-1", "object": kind, "created": 1, "model": body["model"], "choices": [choice]}

        if chat:
            await send({**chunk(""), "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        chunks = -(-tokens // self.tokens_per_chunk)
        for i in range(chunks):
            if i == self.break_after:
                return response  # ends the body without a finish_reason or [DONE]
            if i == self.error_after:
                await send({"error": {"message": "engine failed mid-stream", "code": 500}})
                return response
            await asyncio.sleep(0.01)
            size = min(self.tokens_per_chunk, tokens - i * self.tokens_per_chunk)
            await send(chunk(" tok" * size))
        await send(chunk("", finish="length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + tokens,
                "completion_tokens": tokens,
            }
            await send({"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage})
        await send("[DONE]")
        return response

    async def energy(self, request: web.Request) -> web.Response:
        request_id = request.match_info["id"]
        if request_id not in self.tokens_of:
            return web.json_response({"error": f"no request {request_id}"}, status=404)
        reads = self.energy_reads[request_id] = self.energy_reads.get(request_id, 0) + 1
        tokens = self.tokens_of[request_id]
        final = reads >= self.reads_until_final
        share = 1.0 if final else 0.5
        document = {"request_id": request_id, "energy_j": JOULES_PER_TOKEN * tokens * share, "tokens": tokens}
        return web.json_response({**document, "final": final})


@asynccontextmanager
async def serving(standin: OpenAIStandIn) -> AsyncIterator[str]:
    runner = web.AppRunner(standin.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextmanager
def serving_in_thread(standin: OpenAIStandIn) -> Iterator[str]:
    """The stand-in on its own event loop, for a command that runs `asyncio.run` itself."""
    loop = asyncio.new_event_loop()
    started: list[str] = []
    stop = asyncio.Event()
    ready = threading.Event()

    async def run() -> None:
        async with serving(standin) as url:
            started.append(url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def replay(standin: OpenAIStandIn, requests: list[Request], api: LoadApi, **kwargs: Any):
    async def scenario():
        async with serving(standin) as url:
            energy_url = url if kwargs.pop("energy", False) else None
            return await generate_load(url, MODEL, requests, api=api, energy_url=energy_url, **kwargs)

    return asyncio.run(scenario())


@pytest.mark.parametrize("api", [LoadApi.OPENAI_COMPLETIONS, LoadApi.OPENAI_CHAT])
def test_openai_requests_stream_with_exact_usage_twin_keys_and_retries(api):
    standin = OpenAIStandIn()
    standin.refuse_first = {7}
    requests = [Request(1, 0.0, 12, 64, 5), Request(2, 0.05, 7, 64, 1), Request(3, 0.1, 3, 64, 3)]
    report = replay(standin, requests, api, record=TokenRecording(times=True))
    by_id = {r.request_id: r for r in report.results}
    assert all(r.answered for r in report.results), [r.error for r in report.results]
    assert [by_id[i].output_tokens for i in (1, 2, 3)] == [5, 1, 3]
    assert by_id[2].retries == 1 and by_id[1].retries == 0
    assert len(by_id[1].token_times_s) == 5 and by_id[1].token_times_s[0] == pytest.approx(by_id[1].ttft_s)
    assert np.all(by_id[1].token_gaps_s > 0) and by_id[1].token_gaps_s.mean() > 0.005
    assert by_id[1].gateway_request_id is not None and by_id[1].energy_j is None
    first = next(b for b in standin.bodies if b["prompt_tokens"] == 12)
    assert (first["model"], first["max_tokens"], first["stream"]) == (MODEL, 64, True)
    assert first["stream_options"] == {"include_usage": True} and first["output_tokens"] == 5
    prompt = first["messages"][0]["content"] if api is LoadApi.OPENAI_CHAT else first["prompt"]
    assert prompt == "tok " * 12
    summary = report.summary(load_slo_preset("mlperf-server", MODEL))
    assert summary["answered"] == 3 and summary["retries"] == 1 and summary["slo_attainment"] == 1.0
    assert summary["tbt_p50_s"] is not None and "attributed_energy_j" not in summary


def test_chunks_of_several_tokens_count_by_usage_and_time_by_chunk():
    standin = OpenAIStandIn()
    standin.tokens_per_chunk = 3
    report = replay(
        standin, [Request(1, 0.0, 4, 64, 8)], LoadApi.OPENAI_COMPLETIONS, record=TokenRecording(times=True)
    )
    (result,) = report.results
    assert result.answered and result.output_tokens == 8  # the usage chunk's count
    assert len(result.token_times_s) == 3  # three chunks: 3 + 3 + 2 tokens
    assert result.tpot_s == pytest.approx((result.e2e_s - result.ttft_s) / 7)


def test_broken_streams_and_errors_are_results_not_exceptions():
    standin = OpenAIStandIn()
    standin.break_after = 2
    (cut,) = replay(standin, [Request(1, 0.0, 4, 64, 5)], LoadApi.OPENAI_CHAT).results
    assert cut.status == 200 and not cut.answered and "finish_reason" in (cut.error or "")
    standin = OpenAIStandIn()
    standin.error_after = 1
    (failed,) = replay(standin, [Request(1, 0.0, 4, 64, 5)], LoadApi.OPENAI_COMPLETIONS).results
    assert not failed.answered and "engine failed mid-stream" in (failed.error or "")
    standin = OpenAIStandIn()
    standin.refuse_first = {4}
    (refused,) = replay(standin, [Request(1, 0.0, 4, 64, 5)], LoadApi.OPENAI_CHAT, max_retries=0).results
    assert (refused.status, refused.error) == (429, "hold queue full")

    async def unreachable():
        return await generate_load(
            "http://127.0.0.1:1", MODEL, [Request(1, 0.0, 4, 8, 2)], api=LoadApi.OPENAI_CHAT
        )

    (lost,) = asyncio.run(unreachable()).results
    assert lost.status == 0 and "APIConnectionError" in (lost.error or "")


def test_energy_is_read_until_final_without_delaying_the_sends():
    standin = OpenAIStandIn()
    standin.reads_until_final = 4  # three polls of 50 ms: 150 ms after each answer
    arrivals = (0.0, 0.02, 0.04, 0.06)
    requests = [Request(i, at, 10 + i, 64, 4) for i, at in enumerate(arrivals)]
    report = replay(standin, requests, LoadApi.OPENAI_CHAT, energy=True)
    assert all(r.energy_j == pytest.approx(JOULES_PER_TOKEN * 4) for r in report.results)
    sent = np.array([standin.arrivals[10 + i] for i in range(len(arrivals))])
    assert np.all(np.abs((sent - sent[0]) - np.array(arrivals)) < 0.03)  # on schedule, not after polls
    summary = report.summary()
    assert summary["attributed_requests"] == 4
    assert summary["attributed_energy_j"] == pytest.approx(4 * JOULES_PER_TOKEN * 4)
    assert summary["attributed_j_per_token"] == pytest.approx(JOULES_PER_TOKEN)


def test_energy_not_final_in_time_unknown_or_malformed_is_none():
    standin = OpenAIStandIn()
    standin.reads_until_final = 10**6
    standin.tokens_of["known"] = 3

    async def scenario():
        async with serving(standin) as url, RequestEnergyReader.open(url) as reader:
            assert reader is not None
            began = time.monotonic()
            pending = await reader.energy_j("known")
            waited = time.monotonic() - began
            return pending, waited, await reader.energy_j("nobody"), await reader.energy_j(None)

    pending, waited, unknown, unnamed = asyncio.run(scenario())
    assert pending is None and 0.9 < waited < 1.5  # polled for about a second, then gave up
    assert unknown is None and unnamed is None
    assert parse_energy({"energy_j": 1.5, "final": True}) == (1.5, True)
    for bad in (
        {"energy_j": "1", "final": True},
        {"energy_j": -1.0, "final": True},
        {"energy_j": 1.0},
        [],
        None,
    ):
        assert parse_energy(bad) is None
    assert parse_energy({"energy_j": float("nan"), "final": True}) is None
    assert parse_energy({"energy_j": True, "final": True}) is None


def test_triton_answers_carry_the_gateway_id_and_their_energy():
    standin = OpenAIStandIn()

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        standin.tokens_of["t-1"] = body["output_tokens"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", REQUEST_ID_HEADER: "t-1"})
        await response.prepare(request)
        for _ in range(body["output_tokens"]):
            await response.write(b'data: {"text_output": " tok"}\n\n')
        return response

    async def scenario():
        app = standin.app()
        app.router.add_post("/v2/models/{model}/generate_stream", generate_stream)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            return await generate_load(url, "ensemble", [Request(1, 0.0, 4, 8, 6)], energy_url=url)
        finally:
            await runner.cleanup()

    (result,) = asyncio.run(scenario()).results
    assert result.answered and result.gateway_request_id == "t-1" and result.energy_j == pytest.approx(3.0)


def test_the_model_list_is_read_through_the_sdk():
    standin = OpenAIStandIn()
    standin.served = ["a", "b"]

    async def scenario():
        async with serving(standin) as url:
            return await served_models(url)

    assert asyncio.run(scenario()) == ["a", "b"]
    with pytest.raises(ModelListError, match=r"cannot reach http://127\.0\.0\.1:1"):
        asyncio.run(served_models("http://127.0.0.1:1", timeout_s=2.0))


def test_lags_need_the_triton_api():
    with pytest.raises(ValueError, match="triton"):
        asyncio.run(
            generate_load(
                "http://127.0.0.1:1", MODEL, [], api=LoadApi.OPENAI_CHAT, record=TokenRecording(lags=True)
            )
        )


def test_the_load_command_checks_the_model_then_reports_energy(capsys):
    standin = OpenAIStandIn()
    standin.served = ["other-model", "second"]
    with serving_in_thread(standin) as url:
        base = ["load", "--url", url, "--api", "openai-chat", "--duration", "3", "--start", "600"]
        assert main(base) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{url} does not serve model 'llama3-8b'" in err[0]
        assert "'other-model', 'second'" in err[0]
        standin.served = ["served-as"]
        args = [*base, "--model-name", "served-as", "--max-tokens", "4", "--events", "--energy-url", url]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert main([*base, "--model-name", "served-as", "--energy-url", "http://127.0.0.1:1"]) == 1
        assert capsys.readouterr().err.startswith("throttllem: error: --energy-url: cannot reach")
    lines = [json.loads(line) for line in out.splitlines()]
    requests = [e for e in lines if e["event"] == "request"]
    assert requests and all(e["answered"] and e["energy_j"] is not None for e in requests)
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["answered"] == len(requests)
    assert summary["attributed_requests"] == len(requests) and summary["attributed_j_per_token"] > 0
    assert {b["model"] for b in standin.bodies} == {"served-as"} and all(
        "messages" in b for b in standin.bodies
    )


def test_twin_keys_can_be_left_out_for_engines_that_refuse_unknown_keys():
    request = Request(1, 0.0, 3, 16, 40)
    plain = OpenAIStreamer(None, MODEL, chat=False, record=TokenRecording(), with_twin_keys=False)  # type: ignore[arg-type]
    assert "extra_body" not in plain.arguments(request)
    keyed = OpenAIStreamer(None, MODEL, chat=True, record=TokenRecording(), with_twin_keys=True)  # type: ignore[arg-type]
    assert keyed.arguments(request)["extra_body"] == {"prompt_tokens": 3, "output_tokens": 16}  # capped
    assert not {"prompt_tokens", "output_tokens"} & request_body(request, with_twin_keys=False).keys()
