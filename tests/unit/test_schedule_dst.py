"""The DST policy, in Europe/Berlin, America/New_York, Australia/Lord_Howe and Asia/Tokyo.

* A wall time that does not exist (spring-forward gap) fires once, at the instant the gap ends;
  several such times collapse into that one fire (also with the time right after the gap).
* A wall time that exists twice (fall-back overlap) fires once, at its first occurrence, for
  fixed-hour jobs; jobs whose hour field is a wildcard keep their interval through both passes.

2026 transitions used below:
  Europe/Berlin       2026-03-29 01:00Z  02:00 CET  -> 03:00 CEST (+1 -> +2)
                      2026-10-25 01:00Z  03:00 CEST -> 02:00 CET  (02:00-02:59 twice)
  America/New_York    2026-03-08 07:00Z  02:00 EST  -> 03:00 EDT  (-5 -> -4)
                      2026-11-01 06:00Z  02:00 EDT  -> 01:00 EST  (01:00-01:59 twice)
  Australia/Lord_Howe 2026-04-04 15:00Z  02:00 +11  -> 01:30 +1030 (01:30-01:59 twice, Apr 5)
                      2026-10-03 15:30Z  02:00 +1030 -> 02:30 +11  (02:00-02:29 missing, Oct 4)
  Asia/Tokyo          none (UTC+9 all year)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from scheduler.schedule import fire_times, parse_schedule


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"
TOKYO = "Asia/Tokyo"

# (expression, zone, after, expected)
CASES: list[tuple[str, str, datetime, datetime]] = [
    # ---- Europe/Berlin, spring forward 2026-03-29 ----
    # 02:30 does not exist: runs once when the gap ends, 03:00 CEST = 01:00Z
    ("30 2 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 29, 1, 0)),
    # ... and not again that day: next is 02:30 CEST on 03-30 = 00:30Z
    ("30 2 * * *", BERLIN, utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)),
    # 03:00 exists: 01:00Z, the same instant as the collapsed gap times
    ("0 3 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 29, 1, 0)),
    # 02:00, 02:15, 02:30, 02:45 all collapse into 01:00Z, then nothing until the next day
    ("*/15 2 * * *", BERLIN, utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 1, 0)),
    ("*/15 2 * * *", BERLIN, utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 0)),
    # 01:59 CET = 00:59Z is still before the gap
    ("59 1 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 29, 0, 59)),
    # seconds: 01:59:50 CET (00:59:50Z) -> 02:00:00 missing -> gap end 01:00:00Z
    ("*/10 * * * * *", BERLIN, utc(2026, 3, 29, 0, 59, 50), utc(2026, 3, 29, 1, 0, 0)),
    # ... then 03:00:10 CEST = 01:00:10Z
    ("*/10 * * * * *", BERLIN, utc(2026, 3, 29, 1, 0, 0), utc(2026, 3, 29, 1, 0, 10)),
    # ---- Europe/Berlin, fall back 2026-10-25 ----
    # 02:30 happens twice; first (CEST) at 00:30Z
    ("30 2 * * *", BERLIN, utc(2026, 10, 24, 12), utc(2026, 10, 25, 0, 30)),
    # not at the second 02:30 (CET, 01:30Z): next is 02:30 CET on 10-26 = 01:30Z
    ("30 2 * * *", BERLIN, utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)),
    # asked from inside the repeated hour (02:15 CET = 01:15Z): same answer
    ("30 2 * * *", BERLIN, utc(2026, 10, 25, 1, 15), utc(2026, 10, 26, 1, 30)),
    # wildcard hour (interval-like, Vixie cron's rule): the second pass of the repeated hour
    # runs too. hourly: 02:00 CEST (00:00Z) -> 02:00 CET = 01:00Z
    ("0 * * * *", BERLIN, utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 1, 0)),
    # ... -> 03:00 CET = 02:00Z
    ("0 * * * *", BERLIN, utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 2, 0)),
    # a fixed hour is not: "0 2 * * *" 02:00 CEST (00:00Z) -> next day 02:00 CET = 01:00Z
    ("0 2 * * *", BERLIN, utc(2026, 10, 25, 0, 0), utc(2026, 10, 26, 1, 0)),
    # seconds: 02:59:50 CEST (00:59:50Z) -> 02:00:00 CET = 01:00:00Z
    ("*/10 * * * * *", BERLIN, utc(2026, 10, 25, 0, 59, 50), utc(2026, 10, 25, 1, 0, 0)),
    # from inside the repeated hour (02:30 CET = 01:30Z) -> 02:30:10 CET = 01:30:10Z
    ("*/10 * * * * *", BERLIN, utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 1, 30, 10)),
    # from the last second of the repeated hour (02:59:59 CET = 01:59:59Z)
    ("*/10 * * * * *", BERLIN, utc(2026, 10, 25, 1, 59, 59), utc(2026, 10, 25, 2, 0, 0)),
    # 03:00 CET exactly (02:00Z) -> 03:00:10 CET
    ("*/10 * * * * *", BERLIN, utc(2026, 10, 25, 2, 0, 0), utc(2026, 10, 25, 2, 0, 10)),
    # ---- America/New_York, spring forward 2026-03-08 ----
    # 02:30 does not exist: gap end 03:00 EDT = 07:00Z
    ("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 8, 7, 0)),
    # next day 02:30 EDT = 06:30Z
    ("30 2 * * *", NEW_YORK, utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)),
    # 01:30 EST = 06:30Z, before the gap
    ("30 1 * * *", NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 8, 6, 30)),
    # ---- America/New_York, fall back 2026-11-01 ----
    # 01:30 twice: first at 01:30 EDT = 05:30Z
    ("30 1 * * *", NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 1, 5, 30)),
    # not at 01:30 EST (06:30Z): next day 01:30 EST = 06:30Z on 11-02
    ("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)),
    # every 30 min: 01:30 EDT (05:30Z) -> 01:00 EST = 06:00Z (wildcard hour: second pass runs)
    ("*/30 * * * *", NEW_YORK, utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 0)),
    # 6 fields: 01:59:59 EDT (05:59:59Z) -> 01:00:00 EST = 06:00:00Z
    ("* * * * * *", NEW_YORK, utc(2026, 11, 1, 5, 59, 59), utc(2026, 11, 1, 6, 0, 0)),
    # fixed hours: "*/30 1 * * *" 01:30 EDT (05:30Z) -> next day 01:00 EST = 06:00Z on 11-02
    ("*/30 1 * * *", NEW_YORK, utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 0)),
    # ---- Australia/Lord_Howe (30-minute shift), forward on local 2026-10-04 ----
    # 02:15 does not exist (02:00-02:29 skipped): gap end 02:30 +11 = 2026-10-03 15:30Z
    ("15 2 * * *", LORD_HOWE, utc(2026, 10, 3, 0), utc(2026, 10, 3, 15, 30)),
    # 02:30 exists and is the same instant: one fire
    ("30 2 * * *", LORD_HOWE, utc(2026, 10, 3, 0), utc(2026, 10, 3, 15, 30)),
    # next day 02:15 +11 = 2026-10-04 15:15Z
    ("15 2 * * *", LORD_HOWE, utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 15)),
    # every minute at second 0: 01:59 +1030 (15:29Z) -> gap end 15:30Z -> 02:31 +11 (15:31Z)
    ("0 * * * * *", LORD_HOWE, utc(2026, 10, 3, 15, 29), utc(2026, 10, 3, 15, 30)),
    ("0 * * * * *", LORD_HOWE, utc(2026, 10, 3, 15, 30), utc(2026, 10, 3, 15, 31)),
    # ---- Australia/Lord_Howe, back on local 2026-04-05 ----
    # 01:45 twice: first at +11 = 2026-04-04 14:45Z (second would be 15:15Z)
    ("45 1 * * *", LORD_HOWE, utc(2026, 4, 4, 0), utc(2026, 4, 4, 14, 45)),
    # next is 2026-04-06 01:45 +1030 = 2026-04-05 15:15Z
    ("45 1 * * *", LORD_HOWE, utc(2026, 4, 4, 14, 45), utc(2026, 4, 5, 15, 15)),
    # from inside the repeat (01:40 +1030 = 15:10Z): 01:45 +1030 = 15:15Z (wildcard hour)
    ("*/5 * * * *", LORD_HOWE, utc(2026, 4, 4, 15, 10), utc(2026, 4, 4, 15, 15)),
    # fixed hour from inside the repeat: "*/5 1 * * *" -> 02:00? no: next day 01:00 +1030
    ("*/5 1 * * *", LORD_HOWE, utc(2026, 4, 4, 15, 10), utc(2026, 4, 5, 14, 30)),
    # ---- Asia/Tokyo: nothing special on Europe's or America's DST days ----
    ("30 2 * * *", TOKYO, utc(2026, 3, 28, 12), utc(2026, 3, 28, 17, 30)),
    ("30 1 * * *", TOKYO, utc(2026, 10, 31, 12), utc(2026, 10, 31, 16, 30)),
    ("*/10 * * * * *", TOKYO, utc(2026, 10, 25, 0, 59, 50), utc(2026, 10, 25, 1, 0, 0)),
]


@pytest.mark.parametrize(("expression", "zone", "after", "expected"), CASES)
def test_dst_policy(expression: str, zone: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(expression, job="dst", timezone=zone).next_fire(after) == expected


def test_gap_times_and_the_time_after_the_gap_are_one_fire() -> None:
    # Berlin 02:30 (missing) and 03:00 (exists) both land on 01:00Z: fired once.
    schedule = parse_schedule("30 2 * * *\n0 3 * * *", job="dst", timezone=BERLIN)
    fires = fire_times(schedule, utc(2026, 3, 28, 22), utc(2026, 3, 29, 22))
    assert fires == [utc(2026, 3, 29, 1, 0)]


# (expression, zone, local day, expected number of fires that local day)
DAY_COUNTS: list[tuple[str, str, tuple[int, int, int], int]] = [
    # 96 quarter hours; 02:00-02:45 missing and collapsed into 03:00's fire -> 92
    ("*/15 * * * *", BERLIN, (2026, 3, 29), 92),
    # a 25-hour day: 100 real quarter hours (the repeated 02:xx run in both passes)
    ("*/15 * * * *", BERLIN, (2026, 10, 25), 100),
    ("0 * * * *", BERLIN, (2026, 3, 29), 23),
    ("0 * * * *", BERLIN, (2026, 10, 25), 25),
    ("*/15 * * * *", NEW_YORK, (2026, 3, 8), 92),
    ("*/15 * * * *", NEW_YORK, (2026, 11, 1), 100),
    # Lord Howe skips only 02:00 and 02:15 (collapsed into 02:30's fire) -> 94
    ("*/15 * * * *", LORD_HOWE, (2026, 10, 4), 94),
    # a 24.5-hour day: 98 real quarter hours
    ("*/15 * * * *", LORD_HOWE, (2026, 4, 5), 98),
    # fixed hours keep "first occurrence only": 01:xx on a fall-back day runs 4 times, not 8
    ("*/15 1 * * *", NEW_YORK, (2026, 11, 1), 4),
    ("*/15 * * * *", TOKYO, (2026, 3, 29), 96),
    # seconds: 8640 ten-second slots; the 360 in 02:00-02:59:50 collapse into 03:00:00's
    ("*/10 * * * * *", BERLIN, (2026, 3, 29), 8640 - 360),
    ("*/10 * * * * *", BERLIN, (2026, 10, 25), 8640 + 360),
]


def local_day_window(zone: str, day: tuple[int, int, int]) -> tuple[datetime, datetime]:
    """(start of day - 1 µs, end of day - 1 µs] in UTC, so fire_times returns that local day."""
    tz = ZoneInfo(zone)
    start = datetime(*day, tzinfo=tz).astimezone(UTC)
    end = (datetime(*day, tzinfo=tz) + timedelta(days=1)).replace(tzinfo=tz).astimezone(UTC)
    tick = timedelta(microseconds=1)
    return start - tick, end - tick


@pytest.mark.parametrize(("expression", "zone", "day", "count"), DAY_COUNTS)
def test_transition_day_has_no_double_and_no_missing_run(
    expression: str, zone: str, day: tuple[int, int, int], count: int
) -> None:
    schedule = parse_schedule(expression, job="dst", timezone=zone)
    after, until = local_day_window(zone, day)
    fires = fire_times(schedule, after, until)
    assert len(fires) == count
    assert fires == sorted(set(fires))  # no instant twice
    if not parse_wildcard_hour(expression):
        wall_times = [f.astimezone(ZoneInfo(zone)).replace(tzinfo=None, fold=0) for f in fires]
        assert len(set(wall_times)) == count  # a fixed wall-clock time never runs twice


def parse_wildcard_hour(expression: str) -> bool:
    fields = expression.split()
    hour = fields[1] if len(fields) == 5 else fields[2]
    return hour == "*" or hour.startswith("*/")


def test_berlin_fall_back_keeps_the_interval_of_wildcard_jobs() -> None:
    schedule = parse_schedule("*/15 * * * *", job="dst", timezone=BERLIN)
    fires = fire_times(schedule, utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2, 15))
    # 02:45 CEST (00:45Z), then the repeated 02:00-02:45 CET (01:00Z-01:45Z), then 03:00 CET:
    # every real quarter hour, never a silent hour
    assert fires == [utc(2026, 10, 25, 0, 45) + timedelta(minutes=15 * i) for i in range(7)]


def test_berlin_fall_back_fixed_hour_runs_at_the_first_occurrence_only() -> None:
    schedule = parse_schedule("*/15 2 * * *", job="dst", timezone=BERLIN)
    fires = fire_times(schedule, utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2, 15))
    assert fires == [utc(2026, 10, 25, 0, 45)]  # 02:45 CEST; no second pass


def reference_fires(
    matches: Callable[[datetime], bool], zone: str, after: datetime, until: datetime,
    step: timedelta, every_occurrence: bool = False,
) -> list[datetime]:
    """The policy by brute force: walk real time in `step`s and read the wall clock."""
    tz = ZoneInfo(zone)
    walk: list[tuple[datetime, datetime]] = []  # (instant, wall time), in instant order
    instant = after.replace(second=0, microsecond=0) - timedelta(hours=4)
    while instant <= until + timedelta(hours=4):
        walk.append((instant, instant.astimezone(tz).replace(tzinfo=None, fold=0)))
        instant += step
    first_seen: dict[datetime, datetime] = {}
    seen: dict[datetime, list[datetime]] = {}
    for instant, wall in walk:
        first_seen.setdefault(wall, instant)
        seen.setdefault(wall, []).append(instant)
    fires: set[datetime] = set()
    wall, last_wall = min(first_seen), max(first_seen)
    position = 0  # walk index of the latest wall time seen so far (the walk jumps at a gap)
    while wall <= last_wall:
        while walk[position][1] < wall:
            position += 1
        if matches(wall):
            if wall in first_seen and every_occurrence:
                fires.update(seen[wall])  # wildcard hour: every real instant showing it
            elif wall in first_seen:
                fires.add(first_seen[wall])  # exists: first occurrence
            else:  # missing: the first instant whose wall time is past it (end of the gap)
                fires.add(walk[position][0])
        wall += step
    return sorted(fire for fire in fires if after < fire <= until)


BRUTE_FORCE: list[tuple[str, Callable[[datetime], bool]]] = [
    ("*/15 * * * *", lambda wall: wall.minute % 15 == 0),
    ("30 2 * * *", lambda wall: (wall.hour, wall.minute) == (2, 30)),
    ("15 2 * * *", lambda wall: (wall.hour, wall.minute) == (2, 15)),
    ("45 1 * * *", lambda wall: (wall.hour, wall.minute) == (1, 45)),
    ("0 * * * *", lambda wall: wall.minute == 0),
    ("*/7 1-3 * * *", lambda wall: wall.minute % 7 == 0 and 1 <= wall.hour <= 3),
]
TRANSITION_DAYS = [
    (BERLIN, (2026, 3, 29)), (BERLIN, (2026, 10, 25)),
    (NEW_YORK, (2026, 3, 8)), (NEW_YORK, (2026, 11, 1)),
    (LORD_HOWE, (2026, 4, 5)), (LORD_HOWE, (2026, 10, 4)),
    (TOKYO, (2026, 3, 29)),
]


@pytest.mark.parametrize(("zone", "day"), TRANSITION_DAYS)
@pytest.mark.parametrize(("expression", "matches"), BRUTE_FORCE)
def test_matches_brute_force_reference_by_the_minute(
    expression: str, matches: Callable[[datetime], bool], zone: str, day: tuple[int, int, int]
) -> None:
    after, until = local_day_window(zone, day)
    after, until = after - timedelta(days=1), until + timedelta(days=1)
    schedule = parse_schedule(expression, job="dst", timezone=zone)
    expected = reference_fires(matches, zone, after, until, timedelta(minutes=1),
                               every_occurrence=parse_wildcard_hour(expression))
    assert fire_times(schedule, after, until) == expected


@pytest.mark.parametrize(("zone", "transition"), [
    (BERLIN, utc(2026, 3, 29, 1)), (BERLIN, utc(2026, 10, 25, 1)),
    (LORD_HOWE, utc(2026, 4, 4, 15)), (LORD_HOWE, utc(2026, 10, 3, 15, 30)),
])
def test_matches_brute_force_reference_by_the_second(zone: str, transition: datetime) -> None:
    after, until = transition - timedelta(hours=2), transition + timedelta(hours=2)
    schedule = parse_schedule("*/10 * * * * *", job="dst", timezone=zone)
    expected = reference_fires(lambda wall: wall.second % 10 == 0, zone, after, until,
                               timedelta(seconds=1), every_occurrence=True)
    assert fire_times(schedule, after, until) == expected


def test_asking_from_inside_the_repeated_hour_is_not_slow() -> None:
    # Without skipping the repeated stretch, each call would step through up to 3,600
    # candidates that already fired; 1,000 such calls would take minutes.
    schedule = parse_schedule("* * 2 * * *", job="dst", timezone=BERLIN)
    after = utc(2026, 10, 25, 1, 0, 1)  # 02:00:01 CET, the second pass: already fired
    started = time.perf_counter()
    for _ in range(1000):
        assert schedule.next_fire(after) == utc(2026, 10, 26, 1, 0, 0)
    assert time.perf_counter() - started < 5.0
