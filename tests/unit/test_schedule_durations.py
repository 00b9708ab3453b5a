"""Durations with units: "500ms", "30s", "5m", "1h30m", "2d"."""

from __future__ import annotations

from datetime import timedelta

import pytest

from scheduler.durations import DurationError, format_duration, parse_duration
from scheduler.errors import ScheduleError

GOOD: list[tuple[str, timedelta]] = [
    ("500ms", timedelta(milliseconds=500)),
    ("30s", timedelta(seconds=30)),
    ("5m", timedelta(minutes=5)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("2d", timedelta(days=2)),
    ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
    ("90m", timedelta(minutes=90)),
    ("0s", timedelta(0)),
    (" 10s ", timedelta(seconds=10)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


BAD: list[tuple[str, str]] = [
    ("", "empty"),
    ("5", "has no unit"),
    ("-5m", "negative"),
    ("+5m", "signed"),
    ("1.5h", "fractions"),
    ("5x", "unknown unit 'x'"),
    ("5 m", "unknown unit"),
    ("5M", "unknown unit 'M'"),
    ("30m1h", "out of order"),
    ("5m5m", "repeated"),
    ("abc", "cannot read 'abc'"),
    ("1h30", "'30' has no unit"),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_refused_naming_the_text(text: str, problem: str) -> None:
    with pytest.raises(DurationError) as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)
    assert problem in str(caught.value)


def test_duration_error_is_both_a_value_error_and_a_schedule_error() -> None:
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ScheduleError):
        parse_duration("soon")


@pytest.mark.parametrize(("value", "text"), [
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(0), "0s"),
    (timedelta(days=2, milliseconds=500), "2d500ms"),
])
def test_format_round_trips(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value
