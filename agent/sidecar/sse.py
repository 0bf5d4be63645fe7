"""An incremental `text/event-stream` parser: the gateway counts tokens from events it relays.

Upstream chunks do not respect event boundaries (TCP and the server's buffering decide), so
bytes are fed as they arrive and each event's data comes out once its blank line has been
seen. Follows the WHATWG "event stream interpretation": lines end in CRLF, LF or CR; `data:`
lines of one event join with LF; one space after the colon is dropped; comment lines (`:`)
and other fields are ignored. Lenient at end of stream: a last event without its blank line
still counts (`close`).
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseParser:
    """Feed bytes, get back the data of every event completed by them."""

    def __init__(self) -> None:
        self._pending = b""  # an unfinished line
        self._data: list[bytes] = []  # data lines of the unfinished event

    def feed(self, chunk: bytes) -> list[bytes]:
        """Data of the events that `chunk` completes, in order."""
        buffer = self._pending + chunk
        events: list[bytes] = []
        start = 0
        while (end := _LINE_END.search(buffer, start)) is not None:
            if end.group() == b"\r" and end.end() == len(buffer):
                break  # the LF of a CRLF may be in the next chunk
            self._line(buffer[start : end.start()], events)
            start = end.end()
        self._pending = buffer[start:]
        return events

    def close(self) -> list[bytes]:
        """The stream ended: the data of an event left without its blank line, if any."""
        events: list[bytes] = []
        if self._pending.rstrip(b"\r"):
            self._line(self._pending.rstrip(b"\r"), events)
        self._pending = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if field == b"data":
            self._data.append(value.removeprefix(b" "))
