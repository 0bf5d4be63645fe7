"""Issue 12, items 3 and 8: /infer is tracked for admission; bodies no engine would run are 400s."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from aiohttp import web

from agent.sidecar.llm_protocol import (
    MAX_JSON_DEPTH,
    TRACKED_ROUTES,
    MalformedRequestError,
    ResponseTokens,
    read_request,
)
from agent.sidecar.prompt_tokens import EstimateCounter
from tests.unit.fake_llm_engine import serve
from tests.unit.test_sidecar_gateway import eventually, run, stack

INFER = next(route for route in TRACKED_ROUTES if route.path == "/v2/models/{model}/infer")
GENERATE = TRACKED_ROUTES[0]
COMPLETIONS = next(route for route in TRACKED_ROUTES if route.path == "/v1/completions")


def infer_request(text: str, max_tokens: int, **extra: object) -> dict[str, object]:
    """A KServe v2 request to the TRT-LLM ensemble, as tritonclient.http sends it."""
    inputs = [
        {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [[text]]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [[max_tokens]]},
    ]
    inputs += [{"name": k, "datatype": "INT32", "shape": [1, 1], "data": [[v]]} for k, v in extra.items()]
    return {"inputs": inputs, "outputs": [{"name": "text_output"}]}


def infer_answer(text: str, tokens: int | None) -> dict[str, object]:
    outputs: list[dict[str, object]] = [
        {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [text]}
    ]
    if tokens is not None:
        outputs.append({"name": "num_output_tokens", "datatype": "INT32", "shape": [1, 1], "data": [tokens]})
    return {"model_name": "ensemble", "model_version": "1", "outputs": outputs}


def test_an_infer_request_is_sized_from_its_input_tensors():
    facts = read_request(
        INFER, json.dumps(infer_request("x" * 40, 9)).encode(), "ensemble", EstimateCounter(), 1024
    )
    assert (facts.prompt_tokens, facts.max_tokens, facts.parsed) == (10, 9, True)
    tokens = ResponseTokens(INFER, facts, EstimateCounter())
    assert tokens.body(json.dumps(infer_answer(" tok" * 3, 3)).encode()) == 3
    assert tokens.body(json.dumps(infer_answer(" tok" * 3, None)).encode()) == 9  # no count: max_tokens
    assert tokens.body(b'{"error": "failed"}') == 0 and tokens.failed


def test_infer_through_the_gateway_is_admitted_and_its_tokens_counted():
    async def infer(request: web.Request) -> web.Response:
        document = await request.json()
        assert document == infer_request("hello there", 5)
        return web.json_response(infer_answer(" tok" * 4, 4))

    async def scenario() -> None:
        engine = web.Application()
        engine.router.add_post("/v2/models/{model}/infer", infer)
        async with serve(engine) as engine_url, stack(upstream_url=engine_url, max_hold_s=30) as s:
            s.tracker.gating = True
            url = f"{s.url}/v2/models/ensemble/infer"
            pending = asyncio.create_task(s.client.post(url, json=infer_request("hello there", 5)))
            await eventually(lambda: s.tracker.held == 1)
            assert s.tracker.view().queued == 1  # the loop sees it, and holds it
            s.tracker.release_all()
            async with await pending as resp:
                assert resp.status == 200
            assert list(s.tracker.tokens.values()) == [4]
            assert s.tracker.counters.completed == 1
            span = s.only_span()
            assert span.name == "POST /v2/models/{model}/infer"
            assert span.attributes["gen_ai.request.max_tokens"] == 5

    run(scenario)


def test_a_binary_tensor_body_is_sized_from_its_json_header_only():
    header = json.dumps(infer_request("x" * 40, 9)).encode()
    binary = b"[" * 5000 + bytes(range(256)) * 10  # raw tensor bytes: neither JSON nor nesting
    facts = read_request(
        INFER, header + binary, "ensemble", EstimateCounter(), 1024, binary_header_length=str(len(header))
    )
    assert (facts.prompt_tokens, facts.max_tokens, facts.parsed) == (10, 9, True)


def test_tritonclients_binary_tensors_are_read_in_the_request_and_the_answer():
    """tritonclient sends inputs as binary tensor data by default, and asks for binary outputs."""
    text = triton_http.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([["x" * 40]], dtype=object))  # binary_data=True: the default
    max_tokens = triton_http.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[9]], dtype=np.int32))
    body, json_size = triton_http.InferenceServerClient.generate_request_body([text, max_tokens])
    assert json_size is not None and b'"data"' not in body[:json_size]  # the values are binary only
    facts = read_request(
        INFER, body, "ensemble", EstimateCounter(), 1024, binary_header_length=str(json_size)
    )
    assert (facts.prompt_tokens, facts.max_tokens, facts.parsed) == (10, 9, True)

    text_out = "x" * 40 + " tok" * 7
    tensors = [
        ("num_output_tokens", "INT32", np.int32(7).tobytes()),
        ("text_output", "BYTES", len(text_out).to_bytes(4, "little") + text_out.encode()),
    ]
    answer_header = json.dumps(
        {
            "model_name": "ensemble",
            "outputs": [
                {"name": n, "datatype": t, "shape": [1, 1], "parameters": {"binary_data_size": len(d)}}
                for n, t, d in tensors
            ],
        }
    ).encode()
    answer = answer_header + b"".join(d for _, _, d in tensors)
    parsed = triton_http.InferenceServerClient.parse_response_body(answer, header_length=len(answer_header))
    assert parsed.as_numpy("num_output_tokens").tolist() == [[7]]  # the fixture is what Triton sends
    tokens = ResponseTokens(INFER, facts, EstimateCounter())
    assert tokens.body(answer, str(len(answer_header))) == 7
    assert (
        tokens.body(answer[: len(answer_header)] + b"\x07", str(len(answer_header))) == 9
    )  # cut: max_tokens


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (GENERATE, {"text_input": "hi", "max_tokens": 2**63}),
        (GENERATE, {"text_input": "hi", "max_tokens": 2, "prompt_tokens": 2**64}),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 2**63}),
        (INFER, infer_request("hi", 2**31)),
    ],
)
def test_token_counts_beyond_int32_are_malformed(route, body):
    with pytest.raises(MalformedRequestError, match="at most 2147483647"):
        read_request(route, json.dumps(body).encode(), "m", EstimateCounter(), 1024)


def test_json_nested_deeper_than_the_bound_is_malformed_but_brackets_in_strings_do_not_count():
    deep = b'{"prompt": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
    with pytest.raises(MalformedRequestError, match="nests deeper than 128 levels"):
        read_request(COMPLETIONS, deep, None, EstimateCounter(), 1024)
    text = "[{" * 10_000 + '\\"['
    facts = read_request(COMPLETIONS, json.dumps({"prompt": text}).encode(), None, EstimateCounter(), 1024)
    assert facts.parsed and facts.prompt_tokens > 0


def test_huge_counts_and_deep_json_are_400_in_the_routes_shape_not_500():
    async def scenario() -> None:
        async with stack() as s:
            url = f"{s.url}/v2/models/ensemble/generate"
            async with s.client.post(url, json={"text_input": "hi", "max_tokens": 2**63}) as resp:
                assert resp.status == 400 and "max_tokens" in (await resp.json())["error"]
            deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            async with s.client.post(f"{s.url}/v1/completions", data=deep) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["code"] == 400 and error["type"] == "invalid_request_error"
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30}
            async with s.client.post(f"{s.url}/v1/chat/completions", json=chat) as resp:
                assert resp.status == 400
            assert s.engine.received == []
            s.tracker.assert_empty()
            assert [span.attributes["throttllem.outcome"] for span in s.finished()] == ["refused"] * 3

    run(scenario)
