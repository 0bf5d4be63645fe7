"""parse_request: every malformed, hostile or unknown line is a ProtocolError with a reason."""

import json

import pytest

from agent.gpus.node_agent import PodIdentity
from agent.node.protocol import (
    MAX_LINE_BYTES,
    Acquire,
    Hello,
    Plain,
    ProtocolError,
    SetClock,
    SetPowerLimit,
    encode,
    parse_request,
)

UID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_valid_requests_parse():
    hello = {"op": "hello", "pod_namespace": "serving", "pod_name": "llm-0", "pod_uid": UID}
    assert parse_request(line(hello)) == Hello(PodIdentity("serving", "llm-0", UID))
    assert parse_request(line({"op": "hello"})) == Hello(PodIdentity())  # single host: no pod
    assert parse_request(line({"op": "acquire"})) == Acquire(None)
    assert parse_request(line({"op": "acquire", "gpus": ["GPU-a", "GPU-b"]})) == Acquire(("GPU-a", "GPU-b"))
    assert parse_request(line({"op": "set_clock", "mhz": 1050})) == SetClock(1050)
    assert parse_request(line({"op": "set_power_limit", "watts": 250})) == SetPowerLimit(250.0)
    for op in ("reset", "heartbeat", "release", "status", "clock"):
        assert parse_request(line({"op": op})) == Plain(op)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json\n", "not a JSON object"),
        (b"\xff\xfe\n", "not a JSON object"),  # not UTF-8
        (b"[" * 5000 + b"]" * 5000, "not a JSON object"),  # nesting past the recursion limit
        (b'{"op": "set_clock", "mhz": ' + b"9" * 5000 + b"}", "not a JSON object"),  # int too long to parse
        (line([1, 2]), "must be a JSON object"),
        (line({"mhz": 1050}), "unknown op 'None'"),
        (line({"op": "format_disk"}), "unknown op 'format_disk'"),
        (line({"op": 7}), "unknown op '7'"),
        (line({"op": "set_clock", "mhz": "1050"}), "mhz must be an integer"),
        (line({"op": "set_clock", "mhz": True}), "mhz must be an integer"),
        (line({"op": "set_clock", "mhz": 2**63}), "mhz must be an integer"),
        (line({"op": "set_clock", "mhz": -5}), "mhz must be an integer"),
        (line({"op": "set_power_limit", "watts": 0}), "watts must be"),
        (line({"op": "set_power_limit"}), "watts must be"),
        (b'{"op": "set_power_limit", "watts": NaN}', "watts must be"),
        (b'{"op": "set_power_limit", "watts": 1e300}', "watts must be"),
        (line({"op": "acquire", "gpus": "GPU-a"}), "gpus must be a list"),
        (line({"op": "acquire", "gpus": []}), "gpus must be a list"),
        (line({"op": "acquire", "gpus": ["MIG-1234"]}), "gpus must be a list"),
        (line({"op": "acquire", "gpus": ["GPU-a"] * 65}), "gpus must be a list"),
        (line({"op": "acquire", "gpus": ["GPU-a", "GPU-a"]}), "lists a GPU twice"),
        (line({"op": "hello", "pod_uid": "not-a-uid"}), "pod_uid must be"),
        (line({"op": "hello", "pod_name": "Bad_Name"}), "pod_name must be"),
        (line({"op": "hello", "pod_namespace": {"x": 1}}), "pod_namespace must be"),
    ],
)
def test_bad_lines_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_request(raw)


def test_replies_are_one_line_each():
    reply = encode({"ok": True, "clock_mhz": 1050})
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1 and len(reply) < MAX_LINE_BYTES
