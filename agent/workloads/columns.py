"""Read chosen columns of a large headered CSV into numpy arrays, one chunk of lines at a time.

The week-long Azure traces have ~27M rows: rows are split with plain string operations (neither
Azure nor BurstGPT quotes fields; a chunk that does contain quotes goes through the `csv` module),
each chunk is converted column-wise, and only numpy arrays are kept. A malformed row is reported
with its file and line number.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

import numpy as np

Converter = Callable[[list[str]], np.ndarray]  # element-wise; raises ValueError on a bad value
CHUNK_BYTES = 1 << 22
FIRST_DATA_LINE = 2  # line 1 is the header


class TraceFormatError(ValueError):
    """A trace file is not in a format we read, or one of its rows is malformed."""


def read_header(stream: TextIO, source: str) -> list[str]:
    """Column names from the first line, stripped of surrounding blanks."""
    line = stream.readline()
    if not line.strip():
        raise TraceFormatError(f"{source}: empty file, expected a CSV header line")
    return [name.strip() for name in next(csv.reader([line]))]


def read_columns(
    stream: TextIO, source: str, header: Sequence[str], converters: Mapping[str, Converter]
) -> dict[str, np.ndarray]:
    """Convert the named columns of the rest of `stream`; blank lines are skipped."""
    positions = {name: list(header).index(name) for name in converters}
    parts = {name: [convert([])] for name, convert in converters.items()}
    line = FIRST_DATA_LINE
    while lines := stream.readlines(CHUNK_BYTES):
        fields, numbers = _split(lines, len(header), line, source)
        for name, convert in converters.items():
            parts[name].append(_convert(convert, fields[positions[name]], numbers, source, name))
        line += len(lines)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _split(
    lines: list[str], width: int, first_line: int, source: str
) -> tuple[list[list[str]], Sequence[int]]:
    """Split `lines` into columns of fields; also return the line number of each row."""
    text = "".join(lines)
    text += "" if text.endswith("\n") else "\n"
    if '"' not in text and _commas_per_line_are(text, width - 1):
        flat = text.replace("\n", ",").split(",")
        return [flat[k:-1:width] for k in range(width)], range(first_line, first_line + len(lines))
    try:
        rows = [(first_line + i, row) for i, row in enumerate(csv.reader(lines)) if row]
    except csv.Error as err:
        raise TraceFormatError(f"{source}: {err}") from None
    for number, row in rows:
        if len(row) != width:
            raise TraceFormatError(f"{source}:{number}: expected {width} fields, found {len(row)}")
    return [[row[k] for _, row in rows] for k in range(width)], [number for number, _ in rows]


def _commas_per_line_are(text: str, commas: int) -> bool:
    """Tell whether every line of `text` (which ends with a newline) has exactly `commas` commas."""
    data = np.frombuffer(text.encode(), np.uint8)
    commas_before_end = np.searchsorted(np.flatnonzero(data == ord(",")), np.flatnonzero(data == ord("\n")))
    return bool(np.all(np.diff(commas_before_end, prepend=0) == commas))


def _convert(
    convert: Converter, values: list[str], numbers: Sequence[int], source: str, name: str
) -> np.ndarray:
    """`convert(values)`, or an error naming the file, line and column of the first bad value."""
    with contextlib.suppress(ValueError, OverflowError):
        return convert(values)
    lo, hi = 0, len(values)
    while hi - lo > 1:  # bisect: the converter is element-wise, so one half holds the first bad value
        mid = (lo + hi) // 2
        if _rejection(convert, values[lo:mid]) is None:
            lo = mid
        else:
            hi = mid
    raise TraceFormatError(f"{source}:{numbers[lo]}: column {name!r}: {_rejection(convert, values[lo:hi])}")


def _rejection(convert: Converter, values: list[str]) -> ValueError | OverflowError | None:
    """Return the error `convert` raises on `values`, or None."""
    try:
        convert(values)
    except (ValueError, OverflowError) as err:
        return err
    return None
