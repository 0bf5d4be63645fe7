"""The loop on OpenAI-compatible engines: the twin served as vLLM and as trtllm-serve, as processes.

For each engine: `twin serve --api <engine>` (fast time scale) and `throttllem run` reading it with
the adapter of the same name, its gateway in front. The official `openai` SDK streams chat and
completions through the gateway (usage chunk included) and asks for one answer whole; every
answer must be complete with exact usage. The sidecar must have read the engine (its loop
controlling on fresh telemetry, decisions made, iterations measured), the gateway must have
counted each request, and no clock lock may outlive the sidecar's SIGTERM. Then `throttllem
load --api openai-chat` replays a few trace requests through the same gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.bench.processes import ProcessGroup, SidecarSpec, start_sidecar, start_twin
from agent.catalog import gpu_spec, model_spec
from agent.shipped import SHIPPED_MODELS_DIR
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
SCALE = 10.0  # the twin runs ten times faster than real time
# A fixed lock below the maximum: the GPU is certainly locked while the sidecar runs, so its
# release on SIGTERM is checked (the throttllem policy, at this time scale, may keep stock clocks).
POLICY = "static:1050"
CHAT_TOKENS = (5, 9, 3)  # output tokens of the streamed chat answers
COMPLETION_TOKENS = (7, 4)
WHOLE_TOKENS = 6  # the unstreamed answer
LOAD_SLICE = ("--trace", "azure-conv", "--start", "600", "--duration", "4", "--max-tokens", "32")


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 200, url
        return await response.text()


def samples_of(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus page by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


async def streamed(client: openai.AsyncOpenAI, model: str, chat: bool, tokens: int) -> dict[str, Any]:
    """One streamed answer: its content chunks, finish reason and usage."""
    twin_keys = {"prompt_tokens": 12, "output_tokens": tokens}
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": twin_keys,
    }
    if chat:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": "tok " * 12}], **common
        )
    else:
        stream = await client.completions.create(prompt="tok " * 12, **common)
    pieces, finish, usage = 0, None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text = choice.delta.content if chat else choice.text
            pieces += bool(text)
            finish = choice.finish_reason or finish
    return {"pieces": pieces, "finish": finish, "usage": usage}


async def run_engine(engine: str, tmp_path) -> dict[str, Any]:
    async with ProcessGroup(tmp_path / engine) as group, aiohttp.ClientSession() as session:
        twin = await start_twin(group, SETUP, api=engine, time_scale=SCALE)
        spec = SidecarSpec(policy=POLICY, models_dir=SHIPPED_MODELS_DIR, inherit_otel=False)
        sidecar = await start_sidecar(group, twin, SETUP, spec)
        assert sidecar.gateway_url is not None
        client = openai.AsyncOpenAI(
            base_url=f"{sidecar.gateway_url}/v1", api_key="unused", max_retries=0, timeout=30.0
        )
        async with client:
            models = [m.id for m in (await client.models.list()).data]
            answers = await asyncio.gather(
                *(streamed(client, twin.model_name, True, n) for n in CHAT_TOKENS),
                *(streamed(client, twin.model_name, False, n) for n in COMPLETION_TOKENS),
            )
            whole = await client.completions.create(
                model=twin.model_name,
                prompt="tok " * 8,
                max_tokens=64,
                extra_body={"prompt_tokens": 8, "output_tokens": WHOLE_TOKENS},
            )
        load_lines: list[str] = []
        load_args = ["load", "--url", sidecar.gateway_url, "--api", "openai-chat", "--json", *LOAD_SLICE]
        load_args += ["--energy-url", sidecar.url]
        load = await group.start(
            "load", [*load_args, "--time-scale", repr(SCALE)], announces=False, on_line=load_lines.append
        )
        load_code = await load.wait(60)
        deadline = time.monotonic() + 10
        while True:  # the loop controls once it has seen the engine work (and its policy is built)
            page = await get_text(session, sidecar.metrics_url)
            mode = samples_of(page).get(("throttllem_loop_mode", (("throttllem_loop_mode", "controlling"),)))
            if mode == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        gpu_during = json.loads(await get_text(session, twin.gpu_url))
        sidecar_code = await sidecar.child.stop()
        gpu_after = json.loads(await get_text(session, twin.gpu_url))
    return {
        "twin": twin,
        "models": models,
        "answers": answers,
        "whole": whole,
        "load": (load_code, "".join(load_lines), load.log_tail()),
        "samples": samples_of(page),
        "gpu": (gpu_during, gpu_after),
        "sidecar_code": sidecar_code,
    }


@pytest.mark.parametrize("engine", ["vllm", "trtllm-serve"])
def test_the_loop_reads_an_openai_engine_and_its_gateway_relays_the_sdk(tmp_path, engine):
    seen = asyncio.run(run_engine(engine, tmp_path))
    twin = seen["twin"]
    assert twin.api == engine and seen["models"] == [twin.model_name] == [SETUP.model.name]
    for answer, tokens in zip(seen["answers"], CHAT_TOKENS + COMPLETION_TOKENS, strict=True):
        assert answer["finish"] is not None and answer["pieces"] == tokens  # one token per chunk
        assert answer["usage"].completion_tokens == tokens and answer["usage"].prompt_tokens == 12
    whole = seen["whole"]
    assert whole.usage.completion_tokens == WHOLE_TOKENS and whole.choices[0].finish_reason is not None
    assert whole.choices[0].text

    load_code, load_out, load_log = seen["load"]
    assert load_code == 0, load_log
    summary = json.loads(load_out)
    assert summary["requests"] == summary["answered"] > 0 and summary["failed"] == 0
    assert summary["attributed_requests"] == summary["answered"]  # each one's energy, final in time
    assert summary["attributed_energy_j"] > 0 and summary["attributed_j_per_token"] > 0

    samples = seen["samples"]

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("throttllem_loop_mode", throttllem_loop_mode="controlling") == 1
    assert value("throttllem_telemetry_stale") == 0
    assert value("throttllem_decision_seconds_count") > 0  # decisions made on what it read
    assert value("throttllem_measured_ips") > 0  # iterations measured from the engine's own metrics
    info = next(labels for (name, labels) in samples if name == "throttllem_sidecar_info")
    assert ("engine", engine) in info
    sent = len(CHAT_TOKENS) + len(COMPLETION_TOKENS) + 1 + summary["requests"]
    counted = {
        route: sum(v for (name, labels), v in samples.items() if name == "throttllem_gateway_requests_total"
                   and ("route", route) in labels)
        for route in ("/v1/chat/completions", "/v1/completions")
    }  # fmt: skip
    assert counted["/v1/chat/completions"] == len(CHAT_TOKENS) + summary["requests"]
    assert counted["/v1/completions"] == len(COMPLETION_TOKENS) + 1
    assert sum(counted.values()) == sent
    assert value("throttllem_gateway_requests_total", route="/v1/completions", outcome="ok") == 3

    gpu_during, gpu_after = seen["gpu"]
    assert seen["sidecar_code"] == 0
    assert gpu_during["locked_clock_mhz"] == 1050 and value("throttllem_clock_changes_total") > 0
    assert gpu_after["locked_clock_mhz"] is None  # no lock outlives the sidecar's SIGTERM
