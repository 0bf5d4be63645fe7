"""Sizes read from LLM requests, tokens counted from their answers, errors in each API's shape."""

import json

import pytest

from agent.sidecar.llm_protocol import (
    CHAT_TOKENS_PER_MESSAGE,
    TRACKED_ROUTES,
    Api,
    Kind,
    RequestFacts,
    ResponseTokens,
    api_for_path,
    error_body,
    read_request,
)
from agent.sidecar.prompt_tokens import EstimateCounter

ROUTES = {(route.kind, "versions" in route.path): route for route in TRACKED_ROUTES}
GENERATE, STREAM = ROUTES[(Kind.GENERATE, False)], ROUTES[(Kind.GENERATE_STREAM, False)]
COMPLETIONS, CHAT = ROUTES[(Kind.COMPLETIONS, False)], ROUTES[(Kind.CHAT, False)]
COUNTER = EstimateCounter()  # 4 characters per token


def read(route, document, model=None, default=1024):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return read_request(route, body, model, COUNTER, default)


def test_triton_reads_top_level_or_parameters_with_top_level_winning():
    facts = read(GENERATE, {"text_input": "x" * 9, "parameters": {"max_tokens": 5, "stream": True}}, "ens")
    assert facts == RequestFacts("ens", True, 3, 5, parsed=True)
    both = read(GENERATE, {"text_input": ["abcd"], "max_tokens": [7], "parameters": {"max_tokens": 5}})
    assert (both.prompt_tokens, both.max_tokens, both.stream) == (1, 7, False)


def test_triton_llmapi_max_tokens_twin_prompt_tokens_and_the_default():
    assert read(GENERATE, {"text_input": "hi", "sampling_param_max_tokens": 9}).max_tokens == 9
    assert read(STREAM, {"text_input": "hi" * 50, "prompt_tokens": 700}).prompt_tokens == 700
    assert read(STREAM, {"text_input": "hi"}, default=333).max_tokens == 333
    assert read(STREAM, {"text_input": "hi", "max_tokens": True}, default=333).max_tokens == 333


def test_openai_completions_default_to_16_tokens_and_count_every_prompt_form():
    assert read(COMPLETIONS, {"model": "m", "prompt": "abcdefgh"}) == RequestFacts("m", False, 2, 16, True)
    assert read(COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 4, "stream": True}).prompt_tokens == 3
    assert read(COMPLETIONS, {"prompt": ["abcd", "abcdefgh"]}).prompt_tokens == 3
    assert read(COMPLETIONS, {"prompt": [[1, 2], [3]]}).prompt_tokens == 3
    assert read(COMPLETIONS, {"prompt": "x", "max_tokens": None}).max_tokens == 16


def test_chat_counts_message_text_and_prefers_max_completion_tokens():
    messages = [
        {"role": "system", "content": "abcdefgh"},
        {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]},
    ]
    facts = read(CHAT, {"messages": messages, "max_tokens": 50, "max_completion_tokens": 20}, default=99)
    assert facts.prompt_tokens == 2 + 1 + 2 * CHAT_TOKENS_PER_MESSAGE
    assert facts.max_tokens == 20
    assert read(CHAT, {"messages": messages}, default=99).max_tokens == 99


def test_a_body_that_is_not_a_json_object_is_sized_from_its_raw_text():
    facts = read(COMPLETIONS, b"x" * 41, model="p")
    assert facts == RequestFacts("p", False, 11, 16, parsed=False)
    assert read(GENERATE, b"[1, 2]", default=77).max_tokens == 77


def tokens(route, **request):
    return ResponseTokens(route, read(route, {"text_input": "hi", "max_tokens": 10, **request}), COUNTER)


def test_triton_events_are_one_token_each_unless_they_say_how_many():
    counter = tokens(STREAM, stream=True)
    assert counter.event(b'{"text_output":" a"}') == 1
    assert counter.event(b'{"text_output":" a b","num_output_tokens":2}') == 2
    assert counter.event(b"not json") == 1
    assert counter.total == 4 and not counter.failed


def test_a_triton_stream_without_streaming_is_one_event_holding_the_whole_answer():
    assert tokens(STREAM).event(b'{"text_output":"..."}') == 10


def test_a_triton_error_event_counts_nothing_and_marks_the_response_failed():
    counter = tokens(STREAM, stream=True)
    assert counter.event(b'{"error":"boom"}') == 0
    assert counter.failed
    assert counter.event(b'{"text_output":" a"}') == 1  # later events still count


def test_triton_bodies_count_max_tokens_unless_they_say_otherwise():
    assert tokens(GENERATE).body(b'{"text_output":"..."}') == 10
    assert tokens(GENERATE).body(b'{"text_output":"...","num_output_tokens":[4]}') == 4
    failed = tokens(GENERATE)
    assert failed.body(b'{"error":"x"}') == 0 and failed.failed


def test_openai_events_count_non_empty_choices_and_usage_corrects_the_total():
    counter = tokens(CHAT)
    assert counter.event(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}') == 0
    assert counter.event(b'{"choices":[{"delta":{"content":"Hi"}}]}') == 1
    assert counter.event(b'{"choices":[{"delta":{"reasoning_content":"hm"}}]} ') == 1
    assert counter.event(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}') == 0
    assert counter.event(b'{"choices":[],"usage":{"completion_tokens":5}}') == 3
    assert counter.event(b'{"choices":[],"usage":{"completion_tokens":1}}') == 0  # never backwards
    assert counter.event(b"[DONE]") == 0
    assert counter.total == 5


def test_openai_events_with_token_ids_count_them():
    counter = tokens(COMPLETIONS)
    assert counter.event(b'{"choices":[{"text":"ab","token_ids":[5,6]},{"text":"c"}]}') == 3


def test_openai_error_events_mark_the_response_failed():
    for error in (b'{"error":{"message":"x"}}', b'{"object":"error","message":"x"}'):
        counter = tokens(COMPLETIONS)
        assert counter.event(error) == 0 and counter.failed


def test_openai_bodies_count_usage_else_the_text():
    assert tokens(COMPLETIONS).body(b'{"choices":[{"text":"abc"}],"usage":{"completion_tokens":9}}') == 9
    assert tokens(CHAT).body(b'{"choices":[{"message":{"content":"abcdefgh"}}]}') == 2
    assert tokens(CHAT).body(b"oops") == 0


@pytest.mark.parametrize(
    ("api", "expected"),
    [
        (Api.TRITON, {"error": "full"}),
        (Api.OPENAI, {"error": {"message": "full", "type": "hold_queue_full", "param": None, "code": 429}}),
    ],
)
def test_error_bodies_take_each_apis_shape(api, expected):
    assert json.loads(error_body(api, 429, "full")) == expected


def test_untracked_paths_under_v1_speak_openai():
    assert api_for_path("/v1/models") is Api.OPENAI
    assert api_for_path("/v2/health/ready") is Api.TRITON
