import calendar
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.workloads import parse_timestamps_ns


def utc_ns(*fields: int, ns: int = 0) -> int:
    """Reference value from the standard library: ns since 1970 for a UTC wall-clock time."""
    return int(datetime(*fields, tzinfo=UTC).timestamp()) * 1_000_000_000 + ns


def test_azure_2023_seven_digit_fraction_is_exact_to_the_100_ns() -> None:
    parsed = parse_timestamps_ns(["2023-11-16 18:15:46.6805900", "2023-11-16 18:15:50.9951697"])
    assert parsed.tolist() == [
        utc_ns(2023, 11, 16, 18, 15, 46, ns=680_590_000),
        utc_ns(2023, 11, 16, 18, 15, 50, ns=995_169_700),
    ]
    assert parsed.dtype == np.int64


@pytest.mark.parametrize(
    ("text", "fraction_ns"),
    [
        ("2024-05-10 00:00:00+00:00", 0),
        ("2024-05-10 00:00:00.009+00:00", 9_000_000),
        ("2024-05-10 00:00:00.009930+00:00", 9_930_000),
        ("2024-05-10 00:00:00.009930123+00:00", 9_930_123),
        ("2024-05-10 00:00:00.0099301239+00:00", 9_930_123),  # a tenth digit is below 1 ns: dropped
    ],
)
def test_azure_2024_mixed_fraction_digits_with_offset(text: str, fraction_ns: int) -> None:
    assert parse_timestamps_ns([text]).tolist() == [utc_ns(2024, 5, 10, ns=fraction_ns)]


def test_one_column_may_mix_every_style() -> None:
    texts = [
        "2024-05-10 00:00:01",
        "2024-05-10T00:00:01.5Z",
        "2024-05-10 02:00:01.25+02:00",
        "2024-05-09 18:30:01.125-05:30",
    ]
    assert parse_timestamps_ns(texts).tolist() == [
        utc_ns(2024, 5, 10, 0, 0, 1, ns=ns) for ns in (0, 500_000_000, 250_000_000, 125_000_000)
    ]


def test_leap_days_and_epoch() -> None:
    texts = ["2024-02-29 12:00:00", "2000-02-29 00:00:00", "1970-01-01 00:00:00"]
    assert parse_timestamps_ns(texts).tolist() == [utc_ns(2024, 2, 29, 12), utc_ns(2000, 2, 29), 0]


def test_empty_column() -> None:
    parsed = parse_timestamps_ns([])
    assert parsed.dtype == np.int64
    assert parsed.size == 0


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "2024-05-10",
        "2024-05-10 00:00",
        "2023-02-29 00:00:00",
        "1900-02-29 00:00:00",
        "2100-02-29 00:00:00",
        "2024-13-01 00:00:00",
        "2024-04-31 00:00:00",
        "2024-05-00 00:00:00",
        "2024-05-10 24:00:00",
        "2024-05-10 00:60:00",
        "2024-05-10 00:00:60",
        "2024/05/10 00:00:00",
        "2024-05-10_00:00:00",
        " 2024-05-10 00:00:00",
        "2024-05-10 00:00:00 ",
        "2024-05-10 00:00:00.",
        "2024-05-10 00:00:00.12x",
        "2024-05-10 00:00:00+0000",
        "2024-05-10 00:00:00+00:00x",
        "2024-05-10 00:00:00+24:00",
        "2024-05-10 00:00:00ZZ",
        "2024-05-10 00:00:0é",
        "9999-01-01 00:00:00",
    ],
)
def test_rejects_malformed_and_names_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="not a timestamp") as info:
        parse_timestamps_ns(["2024-05-10 00:00:00", bad, "also bad"])
    assert repr(bad) in str(info.value)


@given(
    moment=st.datetimes(min_value=datetime(1700, 1, 1), max_value=datetime(2250, 12, 31)),
    extra_ns=st.integers(0, 999),
    digits=st.integers(0, 9),
    separator=st.sampled_from(" T"),
    offset_minutes=st.one_of(st.none(), st.just("Z"), st.integers(-23 * 60 - 59, 23 * 60 + 59)),
)
def test_agrees_with_the_standard_library(
    moment: datetime, extra_ns: int, digits: int, separator: str, offset_minutes: int | str | None
) -> None:
    fraction = f"{moment.microsecond * 1000 + extra_ns:09d}"[:digits]
    text = moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + (f".{fraction}" if digits else "")
    offset_s = 0
    if offset_minutes == "Z":
        text += "Z"
    elif isinstance(offset_minutes, int):
        sign = "-" if offset_minutes < 0 else "+"
        text += f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
        offset_s = offset_minutes * 60
    expected_s = calendar.timegm(moment.timetuple()) - offset_s
    expected = expected_s * 1_000_000_000 + (int(fraction.ljust(9, "0")) if digits else 0)
    assert parse_timestamps_ns([text]).tolist() == [expected]
