"""Cron lines: 5 fields, 6 fields (seconds first), names, L/#/W, aliases. Zones without DST."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from scheduler.schedule import CronSchedule, Schedule, fire_times, parse_schedule


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


# (expression, zone, after, expected first fire strictly after `after`)
CASES: list[tuple[str, str, datetime, datetime]] = [
    # every 5 minutes: 10:02:30 -> the next multiple of 5 is 10:05
    ("*/5 * * * *", "UTC", utc(2026, 1, 15, 10, 2, 30), utc(2026, 1, 15, 10, 5)),
    # strictly after: sitting exactly on a fire time gives the following one
    ("*/5 * * * *", "UTC", utc(2026, 1, 15, 10, 5), utc(2026, 1, 15, 10, 10)),
    # a microsecond before a fire time still gives that fire time
    ("*/5 * * * *", "UTC", utc(2026, 1, 15, 10, 4, 59) + timedelta(microseconds=999_999),
     utc(2026, 1, 15, 10, 5)),
    # 6 fields, SECONDS FIRST: every 10 seconds
    ("*/10 * * * * *", "UTC", utc(2026, 1, 15, 10, 0, 0), utc(2026, 1, 15, 10, 0, 10)),
    ("*/10 * * * * *", "UTC", utc(2026, 1, 15, 10, 0, 5, 500_000), utc(2026, 1, 15, 10, 0, 10)),
    # every second
    ("* * * * * *", "UTC", utc(2026, 1, 15, 10, 0, 59), utc(2026, 1, 15, 10, 1, 0)),
    # second 30 of every minute: 10:00:31 is past it, so 10:01:30
    ("30 * * * * *", "UTC", utc(2026, 1, 15, 10, 0, 31), utc(2026, 1, 15, 10, 1, 30)),
    # second 0 of minute 0 of 09:xx: "0 0 9 * * *" is 09:00:00 daily
    ("0 0 9 * * *", "UTC", utc(2026, 1, 15, 9, 0, 0), utc(2026, 1, 16, 9, 0, 0)),
    # names: weekdays only; Fri 2026-01-16 10:00 -> Mon 2026-01-19 09:00
    ("0 9 * * MON-FRI", "UTC", utc(2026, 1, 16, 10), utc(2026, 1, 19, 9)),
    # names are case-insensitive
    ("0 9 * * mon-fri", "UTC", utc(2026, 1, 16, 10), utc(2026, 1, 19, 9)),
    # month names: the first of January, a year on
    ("0 0 1 JAN *", "UTC", utc(2026, 1, 1), utc(2027, 1, 1)),
    # 7 is Sunday too: Mon 2026-03-02 -> Sun 2026-03-08
    ("0 0 * * 7", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 8)),
    # day-of-month OR day-of-week (classic cron): 1st of month or any Monday -> Mon 03-09
    ("0 9 1 * MON", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 9, 9)),
    # ... but a day field that starts with * (*/2) counts as unrestricted, as in Vixie cron and
    # cronie: AND. Odd-numbered days that are Mondays: after Tue 2026-11-24 -> Mon 12-07
    ("0 0 */2 * 1", "UTC", utc(2026, 11, 24), utc(2026, 12, 7)),
    # the 1st to the 7th that are Sun, Tue, Thu or Sat: after Thu 2026-01-01 -> Sat 01-03
    ("0 0 1-7 * */2", "UTC", utc(2026, 1, 1), utc(2026, 1, 3)),
    # ? is accepted as * in day fields
    ("0 9 ? * MON", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 9, 9)),
    # L: last day of the month (February 2026 has 28 days)
    ("0 12 L * *", "UTC", utc(2026, 2, 1), utc(2026, 2, 28, 12)),
    # #: third Friday of February 2026 (Fridays: 6, 13, 20)
    ("0 12 * * FRI#3", "UTC", utc(2026, 2, 1), utc(2026, 2, 20, 12)),
    # L in day-of-week: last Friday of February 2026 is the 27th
    ("0 12 * * L5", "UTC", utc(2026, 2, 1), utc(2026, 2, 27, 12)),
    # W: weekday nearest the 15th; 2026-02-15 is a Sunday -> Monday the 16th
    ("0 0 15W * *", "UTC", utc(2026, 2, 1), utc(2026, 2, 16)),
    # leap day: next 29 February after 2026 is in 2028
    ("0 0 29 2 *", "UTC", utc(2026, 1, 1), utc(2028, 2, 29)),
    # aliases keep their plain cron meaning
    ("@yearly", "UTC", utc(2026, 3, 1), utc(2027, 1, 1)),
    ("@annually", "UTC", utc(2026, 3, 1), utc(2027, 1, 1)),
    ("@monthly", "UTC", utc(2026, 3, 1), utc(2026, 4, 1)),
    ("@weekly", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 8)),  # Sunday 00:00
    ("@daily", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 3)),
    ("@midnight", "UTC", utc(2026, 3, 2, 10), utc(2026, 3, 3)),
    ("@hourly", "UTC", utc(2026, 3, 2, 10, 1), utc(2026, 3, 2, 11)),
    ("@HOURLY", "UTC", utc(2026, 3, 2, 10, 1), utc(2026, 3, 2, 11)),
    # Asia/Tokyo (UTC+9, no DST): 09:00 JST is 00:00Z
    ("0 9 * * *", "Asia/Tokyo", utc(2026, 5, 31, 23, 59), utc(2026, 6, 1, 0, 0)),
    ("0 9 * * *", "Asia/Tokyo", utc(2026, 6, 1, 0, 0), utc(2026, 6, 2, 0, 0)),
    # 02:30 JST on 2026-03-29 is 2026-03-28 17:30Z: nothing special happens in Tokyo
    ("30 2 * * *", "Asia/Tokyo", utc(2026, 3, 28, 12), utc(2026, 3, 28, 17, 30)),
    # a weekday in the job's zone, not in UTC: Mon 09:00 JST is Mon 00:00Z
    ("0 9 * * MON", "Asia/Tokyo", utc(2026, 3, 1), utc(2026, 3, 2, 0)),
    # Mon 08:00 JST is still Sunday 23:00Z
    ("0 8 * * MON", "Asia/Tokyo", utc(2026, 3, 1), utc(2026, 3, 1, 23)),
]


@pytest.mark.parametrize(("expression", "zone", "after", "expected"), CASES)
def test_next_fire(expression: str, zone: str, after: datetime, expected: datetime) -> None:
    schedule = parse_schedule(expression, job="report", timezone=zone)
    fire = schedule.next_fire(after)
    assert fire == expected
    assert fire is not None and fire.tzinfo is UTC


def test_after_in_any_zone_means_the_same_instant() -> None:
    schedule = parse_schedule("*/5 * * * *", job="report")
    plus_nine = timezone(timedelta(hours=9))
    # 19:02:30 at +09:00 is 10:02:30Z
    assert schedule.next_fire(datetime(2026, 1, 15, 19, 2, 30, tzinfo=plus_nine)) == utc(
        2026, 1, 15, 10, 5)


def test_naive_after_is_a_programming_error() -> None:
    schedule = parse_schedule("*/5 * * * *", job="report")
    with pytest.raises(ValueError, match="aware"):
        schedule.next_fire(datetime(2026, 1, 15, 10, 0))


def test_attributes_keep_original_text_and_zone() -> None:
    schedule = parse_schedule("0 9 * * MON-FRI", job="report", timezone="Asia/Tokyo")
    assert schedule.expression == "0 9 * * MON-FRI"
    assert schedule.timezone == "Asia/Tokyo"
    assert isinstance(schedule, CronSchedule)


def test_same_text_parses_to_equal_schedules() -> None:
    first = parse_schedule("*/5 * * * *", job="report", timezone="Asia/Tokyo")
    second = parse_schedule("*/5 * * * *", job="report", timezone="Asia/Tokyo")
    assert first == second
    assert first != parse_schedule("*/5 * * * *", job="report", timezone="UTC")


def test_fire_times_every_ten_seconds_for_a_minute() -> None:
    schedule = parse_schedule("*/10 * * * * *", job="poll")
    fires = fire_times(schedule, utc(2026, 1, 15, 10, 0, 0), utc(2026, 1, 15, 10, 1, 0))
    # (after, until]: 10:00:00 excluded, 10:01:00 included
    assert fires == [utc(2026, 1, 15, 10, 0, s) for s in (10, 20, 30, 40, 50)] + [
        utc(2026, 1, 15, 10, 1, 0)]


def test_concurrent_callers_do_not_disturb_each_other() -> None:
    schedule: Schedule = parse_schedule("* * * * * *", job="poll")
    starts = [utc(2026, 1, 15, 10, 0, 0) + timedelta(seconds=i * 97) for i in range(8)]
    wrong: list[datetime] = []

    def worker(start: datetime) -> None:
        for _ in range(300):
            if schedule.next_fire(start) != start + timedelta(seconds=1):
                wrong.append(start)

    threads = [threading.Thread(target=worker, args=(start,)) for start in starts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
