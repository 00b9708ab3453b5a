"""@every intervals (elapsed time, epoch or anchor aligned) and @at one-shots."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.schedule import IntervalSchedule, OneShotSchedule, fire_times, parse_schedule


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


# (expression, zone, after, expected)
CASES: list[tuple[str, str, datetime, datetime | None]] = [
    # epoch-aligned: every 30 s -> :00 and :30 of every minute
    ("@every 30s", "UTC", utc(2026, 1, 1, 0, 0, 10), utc(2026, 1, 1, 0, 0, 30)),
    ("@every 30s", "UTC", utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1, 0, 1, 0)),
    ("@every 5m", "UTC", utc(2026, 1, 1, 10, 2, 30), utc(2026, 1, 1, 10, 5)),
    # 90 min: 2026-01-01T00:00Z is 1767225600 s = 327264 * 5400 s, a tick; next 01:30
    ("@every 1h30m", "UTC", utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 1, 30)),
    # 7 min: 1767225600 = 4207680 * 420, so 00:00Z is a tick too; next 00:07
    ("@every 7m", "UTC", utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 7)),
    # 1500 ms: 1767225600 s = 1178150400 * 1.5 s -> 00:00:00, 00:00:01.5, ...
    ("@every 1500ms", "UTC", utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 1, 500_000)),
    ("@every 2d", "UTC", utc(2026, 1, 1, 0, 0), utc(2026, 1, 3, 0, 0)),  # 20454 days is even
    # the zone does not matter for unanchored intervals
    ("@every 5m", "Asia/Tokyo", utc(2026, 1, 1, 10, 2, 30), utc(2026, 1, 1, 10, 5)),
    # DST ignored: hourly in Berlin across spring forward is every 60 real minutes
    ("@every 1h", "Europe/Berlin", utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0)),
    ("@every 1h", "Europe/Berlin", utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 2, 0)),
    # anchored: 00:15 on 2024-01-01 in Berlin (CET) is 2023-12-31T23:15Z -> :15 past every hour
    ("@every 1h from 00:15", "Europe/Berlin", utc(2026, 7, 1, 10, 0), utc(2026, 7, 1, 10, 15)),
    # 09:00 CET on 2024-01-01 = 08:00Z, then 24 h steps: 08:00Z = 10:00 CEST in summer
    ("@every 24h from 09:00", "Europe/Berlin", utc(2026, 7, 1, 0, 0), utc(2026, 7, 1, 8, 0)),
    ("@every 24h from 09:00", "Europe/Berlin", utc(2026, 1, 10, 0, 0), utc(2026, 1, 10, 8, 0)),
    # Lord Howe: 06:00 +11 on 2024-01-01 = 2023-12-31T19:00Z; 12 h steps -> 07:00Z, 19:00Z
    ("@every 12h from 06:00", "Australia/Lord_Howe", utc(2026, 7, 1, 0, 0),
     utc(2026, 7, 1, 7, 0)),
    # New York: 00:00 EST on 2024-01-01 = 05:00Z; 6 h steps -> 05, 11, 17, 23Z
    ("@every 6h from 00:00", "America/New_York", utc(2026, 6, 1, 12, 0), utc(2026, 6, 1, 17, 0)),
    # Tokyo: 00:00:30 JST = 15:00:30Z the day before; minute steps -> :30 of every minute
    ("@every 1m from 00:00:30", "Asia/Tokyo", utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 0, 30)),
    # case-insensitive keywords
    ("@EVERY 5m FROM 00:01", "UTC", utc(2026, 1, 1, 10, 2, 30), utc(2026, 1, 1, 10, 6)),
    # ---- @at ----
    ("@at 2026-12-01T09:00:00+09:00", "UTC", utc(2026, 1, 1), utc(2026, 12, 1, 0, 0)),
    ("@at 2026-12-01T09:00:00+09:00", "UTC", utc(2026, 12, 1, 0, 0), None),  # strictly after
    ("@at 2026-12-01T09:00:00Z", "Asia/Tokyo", utc(2026, 1, 1), utc(2026, 12, 1, 9, 0)),
    # no offset: the job's zone; 09:00 CEST = 07:00Z
    ("@at 2026-07-01T09:00:00", "Europe/Berlin", utc(2026, 1, 1), utc(2026, 7, 1, 7, 0)),
    ("@at 2026-07-01 09:00", "UTC", utc(2026, 1, 1), utc(2026, 7, 1, 9, 0)),
    # DST policy applies: 02:30 does not exist in Berlin on 03-29 -> 03:00 CEST = 01:00Z
    ("@at 2026-03-29T02:30:00", "Europe/Berlin", utc(2026, 1, 1), utc(2026, 3, 29, 1, 0)),
    # 02:30 twice on 10-25 -> the first, CEST, 00:30Z
    ("@at 2026-10-25T02:30:00", "Europe/Berlin", utc(2026, 1, 1), utc(2026, 10, 25, 0, 30)),
    # in the past: parses fine, never fires
    ("@at 2020-01-01T00:00:00Z", "UTC", utc(2026, 1, 1), None),
]


@pytest.mark.parametrize(("expression", "zone", "after", "expected"), CASES)
def test_next_fire(expression: str, zone: str, after: datetime, expected: datetime | None) -> None:
    assert parse_schedule(expression, job="sync", timezone=zone).next_fire(after) == expected


def test_interval_ticks_are_the_same_from_any_starting_point() -> None:
    schedule = parse_schedule("@every 7m", job="sync")
    whole = fire_times(schedule, utc(2026, 1, 1), utc(2026, 1, 1, 3))
    from_middle = fire_times(schedule, utc(2026, 1, 1, 1, 23, 45), utc(2026, 1, 1, 3))
    assert whole[-len(from_middle):] == from_middle
    assert all(b - a == timedelta(minutes=7) for a, b in itertools.pairwise(whole))


def test_interval_before_the_epoch_and_anchor_still_aligned() -> None:
    schedule = parse_schedule("@every 1h from 00:15", job="sync", timezone="UTC")
    assert schedule.next_fire(utc(1969, 6, 1, 10, 20)) == utc(1969, 6, 1, 11, 15)


def test_interval_across_fall_back_keeps_elapsed_time() -> None:
    schedule = parse_schedule("@every 30m", job="sync", timezone="Europe/Berlin")
    fires = fire_times(schedule, utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 2, 0))
    assert fires == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 0),
                     utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 2, 0)]


def test_parsed_types_and_attributes() -> None:
    every = parse_schedule("@every 1h30m", job="sync", timezone="Asia/Tokyo")
    assert isinstance(every, IntervalSchedule)
    assert every.interval == timedelta(hours=1, minutes=30)
    assert (every.expression, every.timezone) == ("@every 1h30m", "Asia/Tokyo")
    once = parse_schedule("@at 2026-12-01T09:00:00+09:00", job="sync")
    assert isinstance(once, OneShotSchedule)
    assert once.at == utc(2026, 12, 1, 0, 0)


def test_one_shot_fires_exactly_once_in_fire_times() -> None:
    schedule = parse_schedule("@at 2026-12-01T09:00:00+09:00", job="sync")
    assert fire_times(schedule, utc(2026, 1, 1), utc(2027, 1, 1)) == [utc(2026, 12, 1)]
