"""The twin server over real HTTP on loopback: Triton's API, its metrics, and the GPU endpoint."""

import asyncio
import io
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent.catalog import gpu_spec, model_spec
from agent.engines.trtllm_serve import TrtllmServeAdapter, parse_serve_metrics
from agent.twin.server.app import ServeConfig, TwinServer, running_server
from agent.twin.server.protocol import MULTIPLE_RESPONSES_ERROR, SERVER_METADATA
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
GENERATE = "/v2/models/ensemble/generate"
STREAM = "/v2/models/ensemble/generate_stream"
LOCK = "/twin/v1/gpu/locked_clocks"


@dataclass
class Client:
    server: TwinServer
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.http_port}{path}"

    async def get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.url(path)) as resp:
            return resp.status, await resp.read()

    async def post(self, path: str, payload: object) -> tuple[int, dict]:
        async with self.session.post(self.url(path), json=payload) as resp:
            return resp.status, json.loads(await resp.read())

    async def gpu(self) -> dict:
        async with self.session.get(self.url("/twin/v1/gpu")) as resp:
            assert resp.status == 200
            return await resp.json()

    async def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Family -> {sorted labels (with the sample suffix as "__name__") -> value}."""
        async with self.session.get(f"http://127.0.0.1:{self.server.metrics_port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
            text = await resp.text()
        return {
            f.name: {tuple(sorted({**s.labels, "__name__": s.name}.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)
        }


def value(families: dict, family: str, **labels: str) -> float:
    """The one sample of `family` whose labels include `labels`."""
    matches = [v for key, v in families[family].items() if set(labels.items()) <= set(key)]
    assert len(matches) == 1, (family, labels, families[family])
    return matches[0]


@asynccontextmanager
async def serving(setup: TwinSetup = SETUP, **config) -> AsyncIterator[Client]:
    settings = ServeConfig(http_port=0, metrics_port=0, **{"time_scale": 50.0, **config})
    async with (
        running_server(setup, settings, io.StringIO()) as server,
        aiohttp.ClientSession() as session,
    ):
        yield Client(server, session)


def run(scenario: Callable[[Client], Awaitable[None]], setup: TwinSetup = SETUP, **config) -> None:
    async def main() -> None:
        async with serving(setup, **config) as client:
            await scenario(client)

    asyncio.run(main())


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_health_and_metadata_answer_like_triton():
    async def scenario(c: Client) -> None:
        assert await c.get("/v2/health/live") == (200, b"")
        assert await c.get("/v2/health/ready") == (200, b"")
        status, body = await c.get("/v2")
        assert status == 200 and json.loads(body) == SERVER_METADATA
        for path in ("/v2/models/ensemble", "/v2/models/ensemble/versions/1"):
            status, body = await c.get(path)
            assert status == 200 and json.loads(body)["name"] == "ensemble"
        assert await c.get("/v2/models/ensemble/ready") == (200, b"")
        assert (await c.get("/v2/models/other/ready"))[0] == 400
        assert await c.get("/v2/models/other") == (
            400,
            b'{"error":"Request for unknown model: \'other\' is not found"}',
        )
        assert (await c.get("/v2/models/ensemble/versions/2"))[0] == 400
        assert await c.get("/v2/nothing/here") == (404, b'{"error":"Not Found"}')
        status, body = await c.post("/v2/health/live", {})
        assert (status, body) == (405, {"error": "Method Not Allowed"})

    run(scenario)


def test_generate_returns_max_tokens_tokens_unless_told_to_stop_early():
    async def scenario(c: Client) -> None:
        request = {"text_input": "Hi", "max_tokens": 25, "return_num_output_tokens": True, "id": "a1"}
        status, body = await c.post(GENERATE, request)
        assert status == 200
        assert body["num_output_tokens"] == 25 == body["text_output"].count(" tok")
        assert body["text_output"].startswith("Hi") and len(body["output_log_probs"]) == 25
        assert (body["id"], body["model_name"], body["model_version"]) == ("a1", "ensemble", "1")
        status, body = await c.post(
            GENERATE,
            {
                "text_input": "Hi",
                "parameters": {"max_tokens": 25, "output_tokens": 4, "return_perf_metrics": True},
            },
        )
        assert status == 200 and body["text_output"].count(" tok") == 4
        times = [body[k] for k in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns")]
        assert times == sorted(times) and times[-1] < body["last_token_time_ns"]

    run(scenario)


def test_generate_with_stream_true_gets_tritons_one_response_error():
    async def scenario(c: Client) -> None:
        assert await c.post(GENERATE, {"text_input": "x", "max_tokens": 3, "stream": True}) == (
            200,
            {"error": MULTIPLE_RESPONSES_ERROR},
        )
        status, body = await c.post(GENERATE, {"text_input": "x", "max_tokens": 1, "stream": True})
        assert status == 200 and body["text_output"] == " tok"

    run(scenario)


def test_generate_stream_sends_one_sse_event_per_token():
    async def scenario(c: Client) -> None:
        request = {"text_input": "Hello", "max_tokens": 17, "stream": True, "id": "s"}
        async with c.session.post(c.url(STREAM), json=request) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            lines = [line async for line in resp.content]
        assert len(lines) == 2 * 17
        events = lines[0::2]
        assert all(blank == b"\n" for blank in lines[1::2])
        assert all(e.startswith(b"data: {") and e.endswith(b"}\n") for e in events)
        payloads = [json.loads(e[len(b"data: ") :]) for e in events]
        assert [p["text_output"] for p in payloads] == [" tok"] * 17
        assert {p["id"] for p in payloads} == {"s"} and b"[DONE]" not in b"".join(lines)

        async with c.session.post(c.url(STREAM), json={"text_input": "Hello", "max_tokens": 5}) as resp:
            raw = await resp.read()
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
        assert json.loads(raw[6:])["text_output"] == "Hello" + " tok" * 5

    run(scenario)


def test_requests_that_can_never_fit_are_400_and_counted_as_backend_failures():
    async def scenario(c: Client) -> None:
        too_long = {"text_input": "x", "max_tokens": 500, "prompt_tokens": 8000}
        status, body = await c.post(GENERATE, too_long)
        assert status == 400 and "exceeds max_seq_len 8192" in body["error"]
        async with c.session.post(c.url(STREAM), json={**too_long, "stream": True}) as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            raw = await resp.read()
        assert raw.startswith(b'data: {"error":"') and raw.endswith(b"\n\n")
        status, body = await c.post(GENERATE, {"text_input": "x"})
        assert status == 400 and "missing required input(s) ['max_tokens']" in body["error"]
        status, body = await c.post("/v2/models/nope/generate", {"text_input": "x", "max_tokens": 1})
        assert (status, body) == (400, {"error": "Request for unknown model: 'nope' is not found"})
        families = await c.scrape()
        for model in ("ensemble", "tensorrt_llm"):
            assert value(families, "nv_inference_request_failure", model=model, reason="BACKEND") == 2
            assert value(families, "nv_inference_request_success", model=model) == 0

    run(scenario)


def test_concurrent_requests_share_iterations_as_the_metrics_show():
    n, tokens = 6, 300

    async def scenario(c: Client) -> None:
        started = asyncio.Event()
        first_tokens = 0

        async def stream() -> int:
            nonlocal first_tokens
            request = {"text_input": "x" * 200, "max_tokens": tokens, "stream": True}
            count = 0
            async with c.session.post(c.url(STREAM), json=request) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        count += 1
                        if count == 1:
                            first_tokens += 1
                            if first_tokens == n:
                                started.set()
            return count

        streams = [asyncio.create_task(stream()) for _ in range(n)]
        await asyncio.wait_for(started.wait(), 5)

        async def batched() -> bool:
            families = await c.scrape()
            return value(families, "nv_trt_llm_request_metrics", request_type="scheduled") == n

        await wait_for(batched)
        families = await c.scrape()
        assert value(families, "nv_trt_llm_request_metrics", request_type="active") == n
        gen = value(
            families,
            "nv_trt_llm_inflight_batcher_metrics",
            inflight_batcher_specific_metric="generation_requests",
        )
        assert gen == n
        assert value(families, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="used") >= n
        assert await asyncio.gather(*streams) == [tokens] * n

        families = await c.scrape()
        assert value(families, "nv_inference_request_success", model="ensemble") == n
        assert value(families, "nv_inference_count", model="tensorrt_llm") == n
        assert value(families, "nv_llm_output_token_len", __name__="nv_llm_output_token_len_count") == n
        assert (
            value(families, "nv_llm_output_token_len", __name__="nv_llm_output_token_len_sum") == n * tokens
        )
        assert value(families, "nv_llm_input_token_len", __name__="nv_llm_input_token_len_sum") == n * 50
        buckets = {
            dict(key)["le"]: v
            for key, v in families["nv_llm_output_token_len"].items()
            if "_bucket" in str(key)
        }
        assert buckets == {"10": 0, "50": 0, "100": 0, "500": n, "1000": n, "+Inf": n}  # le as %.16g
        duration = value(families, "nv_inference_request_duration_us", model="ensemble")
        queue = value(families, "nv_inference_queue_duration_us", model="ensemble")
        infer = value(families, "nv_inference_compute_infer_duration_us", model="ensemble")
        assert queue >= 0 and infer > n * tokens * 5_000  # each decode step takes >= 5 ms
        assert abs(duration - (queue + infer)) <= 2 * n  # whole microseconds, rounded per request

    run(scenario, time_scale=20.0)


def test_gpu_metrics_describe_the_twin_gpu():
    async def scenario(c: Client) -> None:
        state = await c.gpu()
        await c.post(GENERATE, {"text_input": "x", "max_tokens": 200})
        await asyncio.sleep(0.03)  # a few DCGM polls
        families = await c.scrape()
        gpu = {"gpu_uuid": state["uuid"]}
        assert state["uuid"].startswith("GPU-") and len(state["uuid"]) == 40
        assert value(families, "nv_gpu_memory_total_bytes", **gpu) == 80 * 1024**3
        used = value(families, "nv_gpu_memory_used_bytes", **gpu)
        assert 16e9 < used < 80 * 1024**3 and used % (1024 * 1024) == 0
        assert value(families, "nv_gpu_power_limit", **gpu) == 400
        assert 80 <= value(families, "nv_gpu_power_usage", **gpu) <= 400
        util = value(families, "nv_gpu_utilization", **gpu)
        assert 0 <= util <= 1 and round(util * 100) == util * 100
        assert value(families, "nv_energy_consumption", **gpu) > 0
        assert value(families, "nv_trt_llm_general_metrics", general_type="iteration_counter") > 100
        stamp = value(families, "nv_trt_llm_general_metrics", general_type="timestamp")
        assert 1.7e15 < stamp < 1e17  # epoch microseconds

    run(scenario, metrics_interval_ms=200.0)


def test_gpu_control_locks_after_the_delay_resets_and_refuses_bad_clocks():
    delayed = replace(SETUP, clock_change_delay_s=1.0)  # 100 ms of wall time at 10x

    async def scenario(c: Client) -> None:
        state = await c.gpu()
        assert state["supported_clocks_mhz"] == sorted(state["supported_clocks_mhz"], reverse=True)
        assert (state["max_clock_mhz"], state["clock_mhz"], state["locked_clock_mhz"]) == (1410, 210, None)
        assert state["name"] == "NVIDIA A100-SXM4-80GB"
        status, state = await c.post(LOCK, {"min_mhz": 1200, "max_mhz": 1200})
        assert status == 200 and state["locked_clock_mhz"] == 1200
        assert state["clock_mhz"] == 210 and state["clock_changes"] == 0  # not yet in effect

        async def applied() -> bool:
            return (await c.gpu())["clock_mhz"] == 1200

        await wait_for(applied)
        assert (await c.gpu())["clock_changes"] == 1
        for bad in (
            {"min_mhz": 1201, "max_mhz": 1201},
            {"min_mhz": 1200, "max_mhz": 900},
            {"min_mhz": 1200},
            {"min_mhz": True, "max_mhz": 1200},
        ):
            status, body = await c.post(LOCK, bad)
            assert status == 400 and body["error"], bad
        async with c.session.post(c.url(LOCK), data=b"{oops") as resp:
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
        assert (await c.gpu())["locked_clock_mhz"] == 1200
        status, state = await c.post(LOCK, {"min_mhz": 600, "max_mhz": 990})
        assert status == 200 and state["locked_clock_mhz"] == 990  # a range locks at its top
        async with c.session.delete(c.url(LOCK)) as resp:
            assert resp.status == 200 and (await resp.json())["locked_clock_mhz"] is None

        async def reset() -> bool:
            return (await c.gpu())["clock_mhz"] == 210

        await wait_for(reset)

    run(scenario, delayed, time_scale=10.0)


def test_energy_only_rises_and_a_lower_clock_slows_decoding_and_draws_less_power():
    async def decode(c: Client) -> tuple[float, float]:
        request = {"text_input": "x", "max_tokens": 60, "return_perf_metrics": True}
        task = asyncio.create_task(c.post(GENERATE, request))
        await asyncio.sleep(0.01)
        power = (await c.gpu())["power_w"]
        _, body = await task
        return (body["last_token_time_ns"] - body["first_token_time_ns"]) / 1e9, power

    async def scenario(c: Client) -> None:
        readings = [(await c.gpu())["energy_j"]]
        scrapes = [value(await c.scrape(), "nv_energy_consumption")]
        fast, fast_power = await decode(c)
        readings.append((await c.gpu())["energy_j"])
        await c.post(LOCK, {"min_mhz": 600, "max_mhz": 600})
        await asyncio.sleep(0.01)
        slow, slow_power = await decode(c)
        for _ in range(5):
            readings.append((await c.gpu())["energy_j"])
            scrapes.append(value(await c.scrape(), "nv_energy_consumption"))
            await asyncio.sleep(0.004)
        assert all(b > a for a, b in itertools.pairwise(readings)), readings
        assert scrapes == sorted(scrapes) and scrapes[-1] > scrapes[0]
        assert slow > 1.1 * fast
        assert slow_power < fast_power

    run(scenario, time_scale=10.0, metrics_interval_ms=100.0)


def test_trtllm_serve_iteration_stats_endpoint_drains_every_iteration_once():
    async def scenario(c: Client) -> None:
        status, _ = await c.post(GENERATE, {"text_input": "x" * 400, "max_tokens": 6})
        assert status == 200
        status, raw = await c.get("/metrics")
        assert status == 200
        text = raw.decode()
        assert text.startswith("[{") and ", " not in text and '": ' not in text  # Starlette's compact JSON
        records = json.loads(text)
        assert [list(r) for r in records] == [sorted(r) for r in records]  # nlohmann's sorted keys
        served = parse_serve_metrics(text)
        assert served.rejected == ()
        assert [s.context_tokens for s in served.stats] == [100, 0, 0, 0, 0, 0]  # prefill, then 5 decodes
        assert [s.scheduled_requests for s in served.stats] == [1] * 6
        assert [s.iteration for s in served.stats] == list(range(served.stats[0].iteration, 6))
        assert all(s.iteration_latency_s > 0.005 for s in served.stats)
        assert await c.get("/metrics") == (200, b"[]")  # drained, as trtllm-serve's queue is

        status, _ = await c.post(GENERATE, {"text_input": "x", "max_tokens": 3})
        async with TrtllmServeAdapter(c.url("/metrics"), session=c.session) as adapter:
            assert [s.iteration for s in await adapter.poll_all()] == [6, 7, 8]
            assert await adapter.poll_all() == []

    run(scenario, iteration_stats_endpoint=True)


def test_the_triton_port_has_no_iteration_stats_unless_asked():
    async def scenario(c: Client) -> None:
        status, body = await c.get("/metrics")
        assert status == 404 and json.loads(body) == {"error": "Not Found"}

    run(scenario)
