"""Jenkins specs pasted unchanged: H hashed from the job name, multi-line, comments, TZ=."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler.schedule import UnionSchedule, fire_times, parse_schedule

REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 1, 1, tzinfo=UTC)
HOUR_LATER = START + timedelta(hours=1)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


def minutes_in_first_hour(expression: str, job: str) -> list[int]:
    schedule = parse_schedule(expression, job=job)
    return [fire.minute for fire in fire_times(schedule, START - timedelta(microseconds=1),
                                               HOUR_LATER - timedelta(microseconds=1))]


def test_h_is_the_same_minute_for_the_same_job() -> None:
    first = parse_schedule("H * * * *", job="nightly-backup").next_fire(START)
    again = parse_schedule("H * * * *", job="nightly-backup").next_fire(START)
    assert first == again


def test_h_is_stable_in_a_fresh_process_with_another_hash_seed() -> None:
    code = (
        "from datetime import datetime, UTC\n"
        "from scheduler.schedule import parse_schedule\n"
        "s = parse_schedule('H H * * *', job='nightly-backup')\n"
        "print(s.next_fire(datetime(2026, 1, 1, tzinfo=UTC)).isoformat())\n"
    )
    here = parse_schedule("H H * * *", job="nightly-backup").next_fire(START)
    assert here is not None
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=60)
        assert out.stdout.strip() == here.isoformat()


def test_h_spreads_jobs_over_the_hour() -> None:
    minutes = {minutes_in_first_hour("H * * * *", f"job-{i}")[0] for i in range(100)}
    # 100 jobs over 60 minutes: a uniform hash hits ~48 distinct minutes; 30 is a loose floor
    assert len(minutes) >= 30


def test_h_fires_once_an_hour() -> None:
    assert len(minutes_in_first_hour("H * * * *", "nightly-backup")) == 1


def test_h_step_fires_every_step_from_a_hashed_offset() -> None:
    minutes = minutes_in_first_hour("H/15 * * * *", "nightly-backup")
    assert len(minutes) == 4
    assert minutes[0] < 15
    assert [b - a for a, b in itertools.pairwise(minutes)] == [15, 15, 15]


def test_h_range_step_stays_in_the_range() -> None:
    minutes = minutes_in_first_hour("H(0-29)/10 * * * *", "nightly-backup")
    assert len(minutes) == 3
    assert minutes[0] < 10
    assert all(0 <= minute <= 29 for minute in minutes)
    assert [b - a for a, b in itertools.pairwise(minutes)] == [10, 10]


def test_h_in_hour_field_gives_a_fixed_daily_time() -> None:
    schedule = parse_schedule("H 2 * * *", job="nightly-backup")
    fires = fire_times(schedule, START, START + timedelta(days=3))
    assert len(fires) == 3
    assert {(fire.hour, fire.minute) for fire in fires} == {(2, fires[0].minute)}


def test_h_in_day_of_month_uses_days_every_month_has() -> None:
    days = {parse_schedule("0 0 H * *", job=f"job-{i}").next_fire(START).day  # type: ignore[union-attr]
            for i in range(200)}
    assert days <= set(range(1, 29))  # like Jenkins: 1-28, so February never skips the job
    assert len(days) > 14


def test_h_in_seconds_field() -> None:
    schedule = parse_schedule("H * * * * *", job="nightly-backup")
    fires = fire_times(schedule, START, START + timedelta(minutes=3))
    assert len(fires) == 3
    assert len({fire.second for fire in fires}) == 1


def test_aliases_keep_cron_meaning_not_jenkins_hashing() -> None:
    # In Jenkins @hourly means "H * * * *"; in cronsul it is minute 0 (write H for spreading).
    assert parse_schedule("@hourly", job="nightly-backup").next_fire(START) == utc(2026, 1, 1, 1)
    assert parse_schedule("@daily", job="nightly-backup").next_fire(START) == utc(2026, 1, 2)


MULTI_LINE = """\
TZ=Asia/Tokyo
# Jenkins build triggers, pasted unchanged
0 9 * * MON-FRI

# and late evenings
0 21 * * *
"""


def test_multi_line_spec_is_the_union_of_its_lines() -> None:
    schedule = parse_schedule(MULTI_LINE, job="build", timezone="Europe/Berlin")
    assert isinstance(schedule, UnionSchedule)
    assert schedule.timezone == "Asia/Tokyo"  # TZ= overrides the job's zone
    assert schedule.expression == MULTI_LINE
    fires = fire_times(schedule, utc(2026, 1, 2, 0, 0), utc(2026, 1, 4, 0, 0))
    assert fires == [
        utc(2026, 1, 2, 12, 0),  # Fri 21:00 JST
        utc(2026, 1, 3, 12, 0),  # Sat 21:00 JST (09:00 is weekdays only)
    ]
    # Mon 2026-01-05 09:00 JST is 00:00Z
    assert schedule.next_fire(utc(2026, 1, 4, 12, 0)) == utc(2026, 1, 5, 0, 0)


def test_lines_that_agree_fire_once() -> None:
    schedule = parse_schedule("0 3 * * *\n0 3 * * *\n0 */3 * * *", job="build")
    fires = fire_times(schedule, START, START + timedelta(days=1))
    assert len(fires) == 8  # 00:00 (next day), 03:00, ..., 21:00: 03:00 only once
    assert fires == sorted(set(fires))


def test_windows_line_endings_and_indentation_are_accepted() -> None:
    schedule = parse_schedule("  # nightly\r\n  H 2 * * *\r\n", job="build")
    assert schedule.next_fire(START) == parse_schedule("H 2 * * *", job="build").next_fire(START)


def test_multi_line_spec_can_mix_forms() -> None:
    schedule = parse_schedule("@every 6h\n@at 2026-01-01T01:30:00Z", job="build")
    assert fire_times(schedule, START, START + timedelta(hours=12)) == [
        utc(2026, 1, 1, 1, 30), utc(2026, 1, 1, 6), utc(2026, 1, 1, 12)]


def test_union_that_can_never_fire_again_returns_none() -> None:
    schedule = parse_schedule("@at 2026-01-01T01:00:00Z\n@at 2026-01-01T02:00:00Z", job="b")
    assert schedule.next_fire(utc(2026, 1, 1, 2)) is None


@pytest.mark.parametrize(("job", "other"), [("a", "b"), ("backup-db", "backup-web")])
def test_different_jobs_usually_differ(job: str, other: str) -> None:
    # Not guaranteed for any two names, but holds for these: a check that H uses the name.
    first = parse_schedule("H H * * *", job=job).next_fire(START)
    second = parse_schedule("H H * * *", job=other).next_fire(START)
    assert first != second
