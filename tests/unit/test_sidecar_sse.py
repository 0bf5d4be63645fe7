"""The SSE parser: events come out whole however the bytes were cut."""

import pytest

from agent.sidecar.sse import SseParser

STREAM = (
    b": a comment\n"
    b'data: {"text_output":"a"}\n\n'
    b"event: message\r\n"
    b"id: 7\r\n"
    b"data:[DONE]\r\n\r\n"
    b"data: first line\r"
    b"data:  second line\r\r"
    b'data: {"x": 1} \n\n'
)
EVENTS = [b'{"text_output":"a"}', b"[DONE]", b"first line\n second line", b'{"x": 1} ']


def feed_in_pieces(data: bytes, size: int) -> list[bytes]:
    parser = SseParser()
    events = []
    for i in range(0, len(data), size):
        events += parser.feed(data[i : i + size])
    return events + parser.close()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_events_are_the_same_whatever_the_chunk_size(size):
    assert feed_in_pieces(STREAM, size) == EVENTS


def test_an_event_comes_out_only_when_its_blank_line_arrives():
    parser = SseParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.feed(b"\n") == [b"one"]
    assert parser.feed(b"data: two\r") == []  # CR may be the first half of CRLF
    assert parser.feed(b"\n\r\n") == [b"two"]


def test_a_last_event_without_its_blank_line_still_counts_at_the_end():
    parser = SseParser()
    assert parser.feed(b"data: a\n\ndata: b") == [b"a"]
    assert parser.close() == [b"b"]
    assert parser.close() == []


def test_empty_data_is_an_event_but_a_lone_blank_line_is_not():
    parser = SseParser()
    assert parser.feed(b"\n\n: keepalive\n\ndata\n\n") == [b""]
