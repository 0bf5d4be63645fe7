"""Column-wise parsing of trace timestamps into integer nanoseconds since the Unix epoch (UTC).

The Azure 2023 traces write `2023-11-16 18:15:46.6805900` (seven fractional digits, one more than
`datetime` takes) and the 2024 week-long traces `2024-05-10 00:00:00.00993+00:00` (zero to nine
digits and a UTC offset). Those files hold ~27M rows, so a whole column is parsed at once as a
byte matrix with numpy instead of one `datetime` per row. Integers keep every digit up to the
nanosecond, which float seconds since 1970 would not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FIXED = 19  # "YYYY-MM-DD HH:MM:SS"
FRACTION_DIGITS = 9  # nanoseconds; further digits are dropped
OFFSET = 6  # "+HH:MM"
DIGIT_COLUMNS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
SEPARATORS = {4: b"-", 7: b"-", 13: b":", 16: b":"}
DATE_TIME_SEPARATORS = (ord(" "), ord("T"))
YEARS = (1678, 2261)  # int64 nanoseconds since 1970 cover these
DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
NS_PER_S = 1_000_000_000


def parse_timestamps_ns(values: Sequence[str]) -> np.ndarray:
    """Parse `YYYY-MM-DD[ T]HH:MM:SS[.digits][Z|±HH:MM]` strings to int64 ns since 1970 UTC.

    Naive values are taken as UTC. Raises ValueError naming the first value that does not parse.
    """
    if len(values) == 0:
        return np.empty(0, np.int64)
    try:
        raw = np.array(values, dtype=np.bytes_)
    except UnicodeEncodeError:
        raise ValueError(f"not a timestamp: {next(v for v in values if not v.isascii())!r}") from None
    if raw.ndim != 1:
        raise ValueError("expected a flat sequence of timestamp strings")
    width = raw.dtype.itemsize
    # Zero padding past the longest value, so every lookup below stays inside the matrix.
    chars = np.zeros((len(raw), max(width, FIXED + 1 + FRACTION_DIGITS) + OFFSET + 1), np.uint8)
    chars[:, :width] = raw.view(np.uint8).reshape(len(raw), width)
    digit = (chars >= ord("0")) & (chars <= ord("9"))

    valid = digit[:, DIGIT_COLUMNS].all(axis=1) & np.isin(chars[:, 10], DATE_TIME_SEPARATORS)
    for column, separator in SEPARATORS.items():
        valid &= chars[:, column] == ord(separator)
    year, month, day = _number(chars, 0, 4), _number(chars, 5, 7), _number(chars, 8, 10)
    hour, minute, second = _number(chars, 11, 13), _number(chars, 14, 16), _number(chars, 17, 19)
    valid &= (year >= YEARS[0]) & (year <= YEARS[1]) & (month >= 1) & (month <= 12)
    valid &= (day >= 1) & (day <= _days_in_month(year, month))
    valid &= (hour <= 23) & (minute <= 59) & (second <= 59)

    fraction_ns, end, fraction_ok = _fraction(chars, digit)
    offset_s, offset_ok = _offset(chars, digit, end)
    valid &= fraction_ok & offset_ok
    if not valid.all():
        raise ValueError(f"not a timestamp: {values[int(np.argmin(valid))]!r}")

    seconds = _days_since_epoch(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second
    return (seconds - offset_s) * NS_PER_S + fraction_ns


def _number(chars: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Read the decimal number written in columns [start, stop) of every row."""
    value = np.zeros(len(chars), np.int64)
    for column in range(start, stop):
        value = value * 10 + (chars[:, column].astype(np.int64) - ord("0"))
    return value


def _days_in_month(year: np.ndarray, month: np.ndarray) -> np.ndarray:
    """Length of each (year, month); months outside 1-12 get a harmless placeholder."""
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    return DAYS_IN_MONTH[np.clip(month, 1, 12) - 1] + ((month == 2) & leap)


def _days_since_epoch(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days from 1970-01-01 to each proleptic Gregorian date (H. Hinnant's days_from_civil)."""
    year = year - (month <= 2)
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _fraction(chars: np.ndarray, digit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional seconds in ns, the column where each value continues, and which are well formed."""
    has_dot = chars[:, FIXED] == ord(".")
    # Padding guarantees a non-digit after every value, so argmin finds the end of the digit run.
    run = np.where(has_dot, np.argmin(digit[:, FIXED + 1 :], axis=1), 0)
    fraction_ns = np.zeros(len(chars), np.int64)
    for k in range(FRACTION_DIGITS):
        value = chars[:, FIXED + 1 + k].astype(np.int64) - ord("0")
        fraction_ns += np.where(k < run, value, 0) * 10 ** (FRACTION_DIGITS - 1 - k)
    end = FIXED + np.where(has_dot, run + 1, 0)
    return fraction_ns, end, ~has_dot | (run > 0)


def _offset(chars: np.ndarray, digit: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTC offset in seconds of each value (nothing, `Z` or `±HH:MM` ending at `end`), and which parse."""
    columns = end[:, None] + np.arange(OFFSET + 1)
    tail = np.take_along_axis(chars, columns, axis=1)
    tail_digit = np.take_along_axis(digit, columns, axis=1)
    naive = tail[:, 0] == 0
    zulu = (tail[:, 0] == ord("Z")) & (tail[:, 1] == 0)
    hours, minutes = _number(tail, 1, 3), _number(tail, 4, 6)
    numeric = (
        np.isin(tail[:, 0], (ord("+"), ord("-")))
        & tail_digit[:, [1, 2, 4, 5]].all(axis=1)
        & (tail[:, 3] == ord(":"))
        & (tail[:, OFFSET] == 0)
        & (hours <= 23)
        & (minutes <= 59)
    )
    sign = np.where(tail[:, 0] == ord("-"), -1, 1)
    offset_s = np.where(numeric, sign * (hours * 3_600 + minutes * 60), 0)
    return offset_s, naive | zulu | numeric
