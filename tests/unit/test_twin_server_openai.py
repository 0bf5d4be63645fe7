"""The twin server as vLLM and as trtllm-serve, over real HTTP on loopback, with the official openai SDK."""

import asyncio
import io
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from agent.catalog import gpu_spec, model_spec
from agent.twin.memory import EngineConfig, SchedulerPolicy
from agent.twin.server.app import ServeConfig, TwinServer, running_server
from agent.twin.server.openai_protocol import COMPLETIONS_DEFAULT_MAX_TOKENS
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
MODEL = "llama3-8b"  # the catalog name: the OpenAI APIs' default model name
APIS = ("vllm", "trtllm-serve")
MAX_MODEL_LEN = 8192  # llama3-8b's window, the twin's max_seq_len


@dataclass
class Served:
    server: TwinServer
    session: aiohttp.ClientSession
    client: AsyncOpenAI

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.http_port}{path}"

    async def get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.url(path)) as resp:
            return resp.status, await resp.read()

    async def post(self, path: str, body: bytes) -> tuple[int, object]:
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url(path), data=body, headers=headers) as resp:
            return resp.status, json.loads(await resp.read())

    async def events(self, path: str, payload: dict) -> list[bytes]:
        """The raw `data:` lines of a streamed answer, each with its trailing blank line."""
        async with self.session.post(self.url(path), json=payload) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            raw = await resp.read()
        assert raw.endswith(b"data: [DONE]\n\n")
        return [event + b"\n\n" for event in raw.split(b"\n\n")[:-1]]


@asynccontextmanager
async def serving(api: str, setup: TwinSetup = SETUP, **config: object) -> AsyncIterator[Served]:
    settings = ServeConfig(http_port=0, api=api, **{"time_scale": 50.0, **config})
    async with (
        running_server(setup, settings, io.StringIO()) as server,
        aiohttp.ClientSession() as session,
    ):
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
        try:
            yield Served(server, session, client)
        finally:
            await client.close()


def run(api: str, scenario: Callable[[Served], Awaitable[None]], setup: TwinSetup = SETUP, **config) -> None:
    async def main() -> None:
        async with serving(api, setup, **config) as served:
            await scenario(served)

    asyncio.run(main())


def chat_estimate(*contents: str) -> int:
    """The twin's prompt estimate for a chat: ceil(chars / 4) plus 4 template tokens per message."""
    return sum(math.ceil(len(text) / 4) + 4 for text in contents)


@pytest.mark.parametrize("api", APIS)
def test_models_health_version_and_fastapi_routing_errors(api: str):
    async def scenario(s: Served) -> None:
        models = (await s.client.models.list()).data
        assert [(m.id, m.object) for m in models] == [(MODEL, "model")]
        assert models[0].owned_by == ("vllm" if api == "vllm" else "tensorrt_llm")
        if api == "vllm":
            assert models[0].max_model_len == MAX_MODEL_LEN
        assert await s.get("/health") == (200, b"")
        status, body = await s.get("/version")
        assert status == 200 and set(json.loads(body)) == {"version"}
        assert await s.get("/v1/nothing") == (404, b'{"detail":"Not Found"}')
        async with s.session.post(s.url("/health")) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"
            assert await resp.json() == {"detail": "Method Not Allowed"}
        with pytest.raises(openai.NotFoundError) as caught:
            await s.client.embeddings.create(model=MODEL, input="x")
        assert caught.value.status_code == 404
        assert (await s.get("/twin/v1/gpu"))[0] == 200  # the twin GPU endpoint, on every API
        assert s.server.metrics_port is None

    run(api, scenario)


@pytest.mark.parametrize("api", APIS)
def test_completions_count_tokens_and_usage_exactly(api: str):
    async def scenario(s: Served) -> None:
        prompt = "x" * 41  # 11 tokens at four characters each
        answer = await s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
        assert answer.id.startswith("cmpl-") and answer.object == "text_completion" and answer.model == MODEL
        (choice,) = answer.choices
        assert (choice.text, choice.finish_reason) == (" tok" * 7, "length")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
            11,
            7,
            18,
        )
        early = await s.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=7, extra_body={"output_tokens": 3, "prompt_tokens": 500}
        )
        assert (early.choices[0].text, early.choices[0].finish_reason) == (" tok" * 3, "stop")
        assert (early.usage.prompt_tokens, early.usage.completion_tokens) == (500, 3)
        default = await s.client.completions.create(model=MODEL, prompt=[1, 2, 3])  # token ids: exact
        assert default.usage.completion_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
        assert default.usage.prompt_tokens == 3

        stream = await s.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=9, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert texts == [" tok"] * 9  # one chunk per token
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 8 + ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
        assert chunks[-1].usage.prompt_tokens == 11 and chunks[-1].usage.total_tokens == 20
        assert len({c.id for c in chunks}) == 1

        plain = await s.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, stream=True, extra_body={"output_tokens": 2}
        )
        chunks = [chunk async for chunk in plain]
        assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [
            (" tok", None),
            (" tok", "stop"),
        ]
        assert all(c.usage is None for c in chunks)  # no usage chunk unless asked

    run(api, scenario)


@pytest.mark.parametrize("api", APIS)
def test_chat_completions_stream_a_role_then_one_chunk_per_token(api: str):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a GPU?"}]
    prompt = chat_estimate("Be brief.", "What is a GPU?")

    async def scenario(s: Served) -> None:
        answer = await s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
        (choice,) = answer.choices
        assert (choice.message.role, choice.message.content) == ("assistant", " tok" * 6)
        assert choice.finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 6)
        newer = await s.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=50, max_completion_tokens=4
        )
        assert newer.usage.completion_tokens == 4  # max_completion_tokens wins
        unbounded = await s.client.chat.completions.create(
            model=MODEL, messages=messages, extra_body={"output_tokens": 5}
        )
        assert (unbounded.usage.completion_tokens, unbounded.choices[0].finish_reason) == (5, "stop")

        stream = await s.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"output_tokens": 5},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
        tokens = [c.choices[0].delta.content for c in chunks[1:-1]]
        assert tokens == [" tok"] * 5
        assert [c.choices[0].finish_reason for c in chunks[1:-1]] == [None] * 4 + ["stop"]
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (prompt, 5)
        assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1

    run(api, scenario)


def test_stream_bytes_follow_each_servers_serialisation():
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    payload |= {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def vllm(s: Served) -> None:
        first, token, last, usage, done = await s.events("/v1/chat/completions", payload)
        role = json.loads(first[6:])["choices"]
        assert role == [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        assert first.endswith(b"}\n\n") and done == b"data: [DONE]\n\n"
        assert json.loads(token[6:])["usage"] == {
            "prompt_tokens": 5,
            "total_tokens": 6,
            "completion_tokens": 1,
        }
        assert json.loads(last[6:])["choices"][0] == {
            "index": 0,
            "delta": {"content": " tok"},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        assert json.loads(usage[6:])["usage"] == {
            "prompt_tokens": 5,
            "total_tokens": 7,
            "completion_tokens": 2,
        }
        completion = {"model": MODEL, "prompt": "abcd", "max_tokens": 1, "stream": True}
        (chunk, _) = await s.events("/v1/completions", completion)
        assert list(json.loads(chunk[6:])) == ["id", "object", "created", "model", "choices", "usage"]
        assert json.loads(chunk[6:])["usage"] is None  # every field, as model_dump_json(exclude_unset=False)

    async def trtllm(s: Served) -> None:
        first, token, last, usage, done = await s.events("/v1/chat/completions", payload)
        assert first.endswith(b"} \n\n")  # trtllm-serve's role chunk: a space before the blank line
        first_doc = json.loads(first[6:])
        assert first_doc["choices"] == [{"index": 0, "delta": {"role": "assistant"}}]
        assert first_doc["id"] == json.loads(usage[6:])["id"] and first_doc["id"].startswith("chatcmpl-")
        assert first_doc["id"].removeprefix("chatcmpl-").isdigit()  # the engine's request id
        assert json.loads(last[6:])["choices"][0] == {
            "index": 0,
            "delta": {"content": " tok", "reasoning_content": ""},
            "finish_reason": "length",
            "avg_decoded_tokens_per_iter": 1.0,
        }
        details = {"prompt_tokens_details": {"cached_tokens": 0}}
        assert (
            json.loads(usage[6:])["usage"]
            == {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2} | details
        )
        assert done == b"data: [DONE]\n\n" and token.endswith(b"}\n\n")

    run("vllm", vllm)
    run("trtllm-serve", trtllm)


def test_vllm_errors_are_its_documents_and_the_sdks_typed_errors():
    async def scenario(s: Served) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            await s.client.completions.create(model="nope", prompt="x")
        assert caught.value.body == {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1, got 0"):
            await s.client.completions.create(model=MODEL, prompt="x", max_tokens=0)
        with pytest.raises(openai.BadRequestError) as caught:
            await s.client.completions.create(
                model=MODEL, prompt="x", extra_body={"prompt_tokens": MAX_MODEL_LEN}
            )
        assert caught.value.body["message"] == (
            "This model's maximum context length is 8192 tokens. However, your request has 8192 input "
            "tokens. Please reduce the length of the input messages."
        )
        with pytest.raises(openai.BadRequestError, match=r"is too large: 8000\. .* \(8000 > 8192 - 500\)"):
            await s.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=8000,
                extra_body={"prompt_tokens": 500},
            )
        with pytest.raises(openai.BadRequestError, match="one choice per request"):
            await s.client.completions.create(model=MODEL, prompt="x", n=2)
        status, body = await s.post("/v1/completions", b'{"model": "llama3-8b", "prompt": ')
        assert (
            status == 400
            and body["error"]["type"] == "Bad Request"
            and "not valid JSON" in body["error"]["message"]
        )
        status, body = await s.post(
            "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode()
        )
        assert status == 400 and "'max_tokens': input should be a valid integer" in body["error"]["message"]
        status, body = await s.post("/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
        assert status == 400 and body["error"]["code"] == 400
        status, body = await s.post(
            "/v1/completions", json.dumps({"prompt": "x", "stream_options": {"include_usage": True}}).encode()
        )
        assert (status, body["error"]["message"]) == (
            400,
            "Stream options can only be defined when `stream=True`.",
        )
        status, body = await s.post("/v1/completions", b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and body["error"]["type"] == "Bad Request"  # nesting past the parser's stack
        status, body = await s.post("/v1/completions", json.dumps({"prompt": "x" * (1024**2)}).encode())
        assert status == 413 and body["error"]["code"] == 413
        # model may be left out: vLLM serves its only model
        status, body = await s.post("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())
        assert status == 200 and body["model"] == MODEL and body["usage"]["completion_tokens"] == 2

    run("vllm", scenario)


def test_trtllm_serve_errors_are_its_documents_and_it_echoes_any_model():
    async def scenario(s: Served) -> None:
        answer = await s.client.completions.create(model="anything", prompt="x", max_tokens=2)
        assert answer.model == "anything"  # trtllm-serve checks no model name
        with pytest.raises(openai.BadRequestError) as caught:
            await s.client.completions.create(
                model=MODEL, prompt="x", max_tokens=500, extra_body={"prompt_tokens": 8000}
            )
        assert caught.value.body == {
            "object": "error",
            "message": "prompt 8000 + max_tokens 500 exceeds max_seq_len 8192",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
        with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
            await s.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1
            )
        status, body = await s.post("/v1/completions", b"{oops")
        assert status == 400 and list(body) == ["error"] and "not valid JSON" in body["error"]
        status, body = await s.post("/v1/completions", json.dumps({"prompt": "x"}).encode())
        assert (status, body) == (400, {"error": "'model': field required"})
        async with s.session.get(s.url("/health_generate")) as resp:
            assert (resp.status, await resp.text()) == (200, "Generation health check OK")

    run("trtllm-serve", scenario)


def test_vllm_metrics_count_every_step_as_vllm_does():
    requests = [(40, 12, None), (400, 30, 9), (4, 5, None)]  # (prompt chars, max_tokens, output_tokens)

    async def scenario(s: Served) -> None:
        async def complete(chars: int, max_tokens: int, output: int | None) -> None:
            extra = {} if output is None else {"output_tokens": output}
            await s.client.completions.create(
                model=MODEL, prompt="x" * chars, max_tokens=max_tokens, extra_body=extra
            )

        await asyncio.gather(*(complete(*r) for r in requests))
        async with s.session.get(s.url("/metrics"), headers={"Accept-Encoding": "identity"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await resp.text()
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(text)}

        def sample(name: str, **labels: str) -> float:
            (match,) = [
                x.value
                for f in families.values()
                for x in f.samples
                if x.name == name and labels.items() <= x.labels.items()
            ]
            return match

        base = {"engine": "0", "model_name": MODEL}
        for f in families.values():
            for x in f.samples:
                if f.name != "vllm:cache_config_info":
                    assert base.items() <= x.labels.items(), x
        types = {name: families[name].type for name in families if not name.endswith("_created")}
        assert types == {
            "vllm:num_requests_running": "gauge",
            "vllm:num_requests_waiting": "gauge",
            "vllm:kv_cache_usage_perc": "gauge",
            "vllm:num_preemptions": "counter",
            "vllm:prompt_tokens": "counter",
            "vllm:generation_tokens": "counter",
            "vllm:request_success": "counter",
            "vllm:iteration_tokens_total": "histogram",
            "vllm:time_to_first_token_seconds": "histogram",
            "vllm:inter_token_latency_seconds": "histogram",
            "vllm:e2e_request_latency_seconds": "histogram",
            "vllm:cache_config_info": "gauge",
        }
        prompts = [math.ceil(chars / 4) for chars, _, _ in requests]
        outputs = [min(output or max_tokens, max_tokens) for _, max_tokens, output in requests]
        engine = s.server.runtime.engine
        assert sample("vllm:prompt_tokens_total") == sum(prompts)
        assert sample("vllm:generation_tokens_total") == sum(outputs)
        assert sample("vllm:iteration_tokens_total_count") == engine.iteration  # every step had output
        assert sample("vllm:iteration_tokens_total_sum") == sum(prompts) + sum(outputs)
        assert sample("vllm:request_success_total", finished_reason="length") == 2
        assert sample("vllm:request_success_total", finished_reason="stop") == 1
        assert sample("vllm:request_success_total", finished_reason="abort") == 0
        assert sample("vllm:time_to_first_token_seconds_count") == 3
        assert sample("vllm:inter_token_latency_seconds_count") == sum(outputs) - 3
        assert sample("vllm:e2e_request_latency_seconds_count") == 3
        assert sample("vllm:inter_token_latency_seconds_sum") > (max(outputs) - 1) * 0.005  # >= 5 ms a step
        assert (sample("vllm:num_requests_running"), sample("vllm:num_requests_waiting")) == (0, 0)
        assert sample("vllm:num_preemptions_total") == 0
        buckets = [
            x.labels["le"]
            for x in families["vllm:iteration_tokens_total"].samples
            if x.name.endswith("_bucket")
        ]
        assert buckets == [
            f"{b:.1f}" for b in (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
        ] + ["+Inf"]
        ttft = [
            x.labels["le"]
            for x in families["vllm:time_to_first_token_seconds"].samples
            if x.name.endswith("_bucket")
        ]
        assert (ttft[0], ttft[-2], len(ttft)) == ("0.001", "2560.0", 23)
        (info,) = families["vllm:cache_config_info"].samples
        assert info.value == 1 and info.labels["engine"] == "0" and "model_name" not in info.labels
        assert (info.labels["num_gpu_blocks"], info.labels["block_size"]) == (str(engine.kv_blocks), "64")

    run("vllm", scenario)


async def _start_streams(
    s: Served, count: int, max_tokens: int, prompt_tokens: int
) -> list[asyncio.Task[int]]:
    """`count` streamed completions, returned once the first of them is generating."""
    generating = asyncio.Event()

    async def stream() -> int:
        answer = await s.client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=max_tokens,
            stream=True,
            extra_body={"prompt_tokens": prompt_tokens},
        )
        tokens = 0
        async for _ in answer:
            tokens += 1
            generating.set()
        return tokens

    tasks = [asyncio.create_task(stream()) for _ in range(count)]
    await asyncio.wait_for(generating.wait(), 10)
    return tasks


def test_the_vllm_adapter_reads_the_twins_running_waiting_and_kv():
    from agent.engines.vllm import VllmAdapter

    small_batches = TwinSetup(
        gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"), engine=EngineConfig(max_batch_size=2)
    )

    async def scenario(s: Served) -> None:
        tasks = await _start_streams(s, count=5, max_tokens=300, prompt_tokens=200)
        engine = s.server.runtime.engine
        async with VllmAdapter(s.url("/metrics"), session=s.session) as adapter:
            used_before = engine.used_blocks
            stats = await adapter.poll()
            used_after = engine.used_blocks
        assert stats is not None
        assert (
            (stats.active_requests, stats.queued_requests)
            == (2, 3)
            == (engine.active_requests, len(engine.waiting))
        )
        assert (stats.kv_blocks_max, stats.tokens_per_block) == (engine.kv_blocks, 64)
        assert (
            used_before <= stats.kv_blocks_used <= used_after and stats.kv_blocks_used >= 2 * 4
        )  # 200+ tokens each
        assert await asyncio.gather(*tasks) == [300] * 5

    run("vllm", scenario, small_batches, time_scale=20.0)


def test_vllm_preemptions_are_counted_and_preempted_requests_wait():
    from prometheus_client.parser import text_string_to_metric_families

    # A KV cache of a few dozen blocks that admits on current need: decoding outgrows it.
    tight = TwinSetup(
        gpu_spec("a100-sxm4-80gb"),
        model_spec("llama3-8b"),
        engine=EngineConfig(
            scheduler=SchedulerPolicy.MAX_UTILIZATION, kv_cache_free_gpu_mem_fraction=0.006, max_seq_len=1400
        ),
    )

    async def scenario(s: Served) -> None:
        engine = s.server.runtime.engine
        assert engine.kv_blocks < 60
        tasks = await _start_streams(s, count=4, max_tokens=600, prompt_tokens=700)
        assert await asyncio.gather(*tasks) == [600] * 4
        assert engine.preemptions > 0
        async with s.session.get(s.url("/metrics")) as resp:
            text = await resp.text()
        samples = {
            x.name: x.value
            for f in text_string_to_metric_families(text)
            for x in f.samples
            if not x.labels.get("le")
        }
        assert samples["vllm:num_preemptions_total"] == engine.preemptions
        assert samples["vllm:generation_tokens_total"] == 4 * 600
        assert (
            samples["vllm:inter_token_latency_seconds_count"] == 4 * 599
        )  # a resumed token is a later token

    run("vllm", scenario, tight, time_scale=50.0)


def test_the_trtllm_serve_adapter_reads_the_twins_iteration_stats():
    from agent.engines.trtllm_serve import TrtllmServeAdapter, parse_serve_metrics

    async def scenario(s: Served) -> None:
        tasks = await _start_streams(s, count=3, max_tokens=80, prompt_tokens=100)
        status, raw = await s.get("/metrics")
        batch = parse_serve_metrics(raw.decode())
        assert status == 200 and batch.rejected == () and batch.stats
        assert max(x.scheduled_requests for x in batch.stats) == 3
        assert all(x.iteration_latency_s > 0 for x in batch.stats)
        async with TrtllmServeAdapter(s.url("/metrics"), session=s.session) as adapter:
            await asyncio.gather(*tasks)
            later = await adapter.poll_all()
        assert later and later[0].iteration == batch.stats[-1].iteration + 1  # drained: each record once
        assert later[-1].kv_blocks_used == 0 or later[-1].active_requests > 0

    run("trtllm-serve", scenario)


def test_serve_config_refuses_what_an_api_cannot_do():
    with pytest.raises(ValueError, match="api must be one of triton, trtllm-serve, vllm"):
        ServeConfig(api="sglang")
    with pytest.raises(ValueError, match="iteration stats endpoint is an option of the triton API"):
        ServeConfig(api="vllm", iteration_stats_endpoint=True)
    with pytest.raises(ValueError, match="no '/'"):
        ServeConfig(model_name="meta-llama/Llama-3.1-8B")
    assert ServeConfig(api="vllm", model_name="meta-llama/Llama-3.1-8B").served_model_name(SETUP) == (
        "meta-llama/Llama-3.1-8B"
    )
    assert ServeConfig().served_model_name(SETUP) == "ensemble"
    assert ServeConfig(api="trtllm-serve").served_model_name(SETUP) == MODEL
