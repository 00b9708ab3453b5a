"""jitter_offset (deterministic delay per job and tick) and fire_times limits."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from scheduler.errors import ScheduleError
from scheduler.schedule import fire_times, jitter_offset, parse_schedule

REPO = Path(__file__).resolve().parents[2]
TICK = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MAX = timedelta(seconds=30)


def test_jitter_is_deterministic() -> None:
    assert jitter_offset("backup", TICK, MAX) == jitter_offset("backup", TICK, MAX)


def test_jitter_is_the_same_in_a_fresh_process_with_another_hash_seed() -> None:
    code = (
        "from datetime import datetime, timedelta, UTC\n"
        "from scheduler.schedule import jitter_offset\n"
        "print(jitter_offset('backup', datetime(2026, 3, 1, 12, tzinfo=UTC),"
        " timedelta(seconds=30)) // timedelta(microseconds=1))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "777", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    assert int(out.stdout) == jitter_offset("backup", TICK, MAX) // timedelta(microseconds=1)


def test_jitter_stays_in_range_and_spreads() -> None:
    offsets = [jitter_offset("backup", TICK + timedelta(minutes=i), MAX) for i in range(2000)]
    assert all(timedelta(0) <= offset < MAX for offset in offsets)
    # spread over the range: every 3-second bucket of the 30 s range is used
    assert {offset // timedelta(seconds=3) for offset in offsets} == set(range(10))


def test_jitter_differs_between_jobs_at_one_tick() -> None:
    offsets = {jitter_offset(f"job-{i}", TICK, MAX) for i in range(100)}
    assert len(offsets) > 90


def test_jitter_depends_on_the_instant_not_its_zone_or_sub_millisecond_part() -> None:
    tokyo = TICK.astimezone(timezone(timedelta(hours=9)))
    assert jitter_offset("backup", tokyo, MAX) == jitter_offset("backup", TICK, MAX)
    nudged = TICK + timedelta(microseconds=999)  # same UTC millisecond
    assert jitter_offset("backup", nudged, MAX) == jitter_offset("backup", TICK, MAX)


def test_zero_jitter_is_zero() -> None:
    assert jitter_offset("backup", TICK, timedelta(0)) == timedelta(0)


def test_tiny_jitter_is_below_its_maximum() -> None:
    assert jitter_offset("backup", TICK, timedelta(microseconds=1)) == timedelta(0)


def test_negative_jitter_is_refused_naming_the_job() -> None:
    with pytest.raises(ScheduleError, match="job 'backup'"):
        jitter_offset("backup", TICK, timedelta(seconds=-1))


def test_naive_tick_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="aware"):
        jitter_offset("backup", TICK.replace(tzinfo=None), MAX)


def test_fire_times_is_empty_for_an_empty_window() -> None:
    schedule = parse_schedule("* * * * * *", job="poll")
    assert fire_times(schedule, TICK, TICK) == []
    assert fire_times(schedule, TICK, TICK - timedelta(hours=1)) == []


def test_fire_times_refuses_more_than_the_limit() -> None:
    schedule = parse_schedule("* * * * * *", job="poll")
    assert len(fire_times(schedule, TICK, TICK + timedelta(seconds=10), limit=10)) == 10
    with pytest.raises(ScheduleError, match="more than 10 fire times"):
        fire_times(schedule, TICK, TICK + timedelta(seconds=11), limit=10)


def test_fire_times_needs_aware_datetimes() -> None:
    schedule = parse_schedule("* * * * *", job="poll")
    with pytest.raises(ValueError, match="until"):
        fire_times(schedule, TICK, datetime(2026, 3, 2))
