"""Generate requests and responses as Triton and the TensorRT-LLM ensemble shape them."""

import json

import pytest

from agent.twin.server.protocol import (
    BadRequestError,
    ResponseTiming,
    model_metadata,
    parse_generate,
    response_body,
    sse_event,
)

TIMING = ResponseTiming(1, 2, 3, 4)


def body(**keys) -> bytes:
    return json.dumps(keys).encode()


def test_top_level_and_parameters_keys_are_equivalent():
    a = parse_generate(body(text_input="hi there", max_tokens=20, stream=True), "ensemble")
    b = parse_generate(body(text_input="hi there", parameters={"max_tokens": 20, "stream": True}), "ensemble")
    assert a == b
    assert (a.max_tokens, a.stream, a.output_tokens, a.request_id) == (20, True, None, None)


def test_one_element_lists_are_scalars_and_top_level_wins():
    params = parse_generate(body(text_input=["x"], max_tokens=[3], parameters={"max_tokens": 9}), "m")
    assert (params.text_input, params.max_tokens) == ("x", 3)


def test_prompt_length_is_estimated_unless_given():
    assert parse_generate(body(text_input="", max_tokens=1), "m").prompt_tokens == 1
    assert parse_generate(body(text_input="abcd", max_tokens=1), "m").prompt_tokens == 1
    assert parse_generate(body(text_input="abcde", max_tokens=1), "m").prompt_tokens == 2
    assert parse_generate(body(text_input="x" * 4000, max_tokens=1), "m").prompt_tokens == 1000
    given = parse_generate(body(text_input="short", max_tokens=1, prompt_tokens=700, output_tokens=5), "m")
    assert (given.prompt_tokens, given.output_tokens) == (700, 5)


def test_unknown_keys_are_ignored():
    params = parse_generate(body(text_input="a", max_tokens=2, temperature=0.7, foo={"bar": 1}), "m")
    assert params.max_tokens == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "failed to parse the request JSON buffer"),
        (b"[1, 2]", "expected a JSON object"),
        (body(text_input="a"), "missing required input(s) ['max_tokens']"),
        (body(max_tokens=3), "missing required input(s) ['text_input']"),
        (body(text_input="a", max_tokens="3"), "unable to parse input 'max_tokens'"),
        (body(text_input="a", max_tokens=True), "unable to parse input 'max_tokens'"),
        (body(text_input="a", max_tokens=0), "'max_tokens' must be at least 1"),
        (body(text_input="a", max_tokens=[1, 2]), "exactly one element"),
        (body(text_input="a", max_tokens=4, stream="yes"), "unable to parse input 'stream'"),
        (body(text_input="a", max_tokens=4, output_tokens=0), "'output_tokens' must be at least 1"),
        (body(text_input=3, max_tokens=4), "unable to parse input 'text_input'"),
        (body(text_input="a", max_tokens=4, id=7), "'id' must be a string"),
    ],
)
def test_bad_requests_say_what_is_wrong(raw, message):
    with pytest.raises(BadRequestError, match=None) as err:
        parse_generate(raw, "ensemble")
    assert message in str(err.value)


def test_missing_input_message_follows_triton():
    with pytest.raises(BadRequestError) as err:
        parse_generate(body(text_input="a"), "ensemble")
    assert str(err.value).startswith("[request id: <id_unknown>] expected number of inputs between 2 and ")
    assert "for model 'ensemble'. Got input(s) ['text_input']" in str(err.value)


def test_full_response_has_the_ensemble_outputs_sorted_and_the_prompt():
    params = parse_generate(body(text_input="Hello", max_tokens=3, id="42"), "ensemble")
    text = response_body("ensemble", params, 3, TIMING, streamed=False)
    payload = json.loads(text)
    assert list(payload) == sorted(payload)
    assert payload["text_output"] == "Hello tok tok tok"
    assert payload["output_log_probs"] == [0.0, 0.0, 0.0]
    assert (payload["model_name"], payload["model_version"], payload["id"]) == ("ensemble", "1", "42")
    assert " " not in text.replace(" tok", "")  # compact separators
    assert "num_output_tokens" not in payload and "arrival_time_ns" not in payload


def test_streamed_chunk_is_new_text_only_with_scalar_log_prob():
    params = parse_generate(body(text_input="Hello", max_tokens=3, stream=True), "ensemble")
    payload = json.loads(response_body("ensemble", params, 1, TIMING, streamed=True))
    assert payload["text_output"] == " tok"
    assert payload["output_log_probs"] == 0.0


def test_optional_outputs_on_request():
    params = parse_generate(
        body(
            text_input="Hello",
            max_tokens=2,
            exclude_input_in_output=True,
            return_num_input_tokens=True,
            return_num_output_tokens=True,
            return_perf_metrics=True,
            prompt_tokens=9,
        ),
        "ensemble",
    )
    payload = json.loads(response_body("ensemble", params, 2, TIMING, streamed=False))
    assert payload["text_output"] == " tok tok"
    assert (payload["num_input_tokens"], payload["num_output_tokens"]) == (9, 2)
    assert [payload[k] for k in ("arrival_time_ns", "first_scheduled_time_ns")] == [1, 2]
    assert [payload[k] for k in ("first_token_time_ns", "last_token_time_ns")] == [3, 4]


def test_sse_framing_and_model_metadata_shapes():
    assert sse_event('{"a":1}') == b'data: {"a":1}\n\n'
    meta = model_metadata("ensemble")
    assert list(meta) == ["name", "versions", "platform", "inputs", "outputs"]
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["text_input"] == {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]}
    assert inputs["max_tokens"]["datatype"] == "INT32"
    assert {t["name"] for t in meta["outputs"]} >= {"text_output", "num_output_tokens"}
