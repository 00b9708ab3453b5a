"""Refused schedules: every message names the job, quotes the expression, says what is wrong."""

from __future__ import annotations

import pytest

from scheduler.errors import ConfigError, ScheduleError
from scheduler.schedule import parse_schedule, validate_timezone

# (expression, zone, fragment of the message saying what is wrong)
BAD: list[tuple[str, str, str]] = [
    ("* * * *", "UTC", "expected 5 fields"),
    ("* * * * * * *", "UTC", "got 7"),
    ("", "UTC", "no schedule"),
    ("# only a comment\n\n", "UTC", "no schedule"),
    ("0 25 * * *", "UTC", "hour field '25'"),
    ("60 * * * *", "UTC", "minute field '60'"),
    ("61 * * * * *", "UTC", "second field '61'"),
    ("0 0 32 * *", "UTC", "day-of-month field '32'"),
    ("0 0 * FOO *", "UTC", "month field 'FOO'"),
    ("0 0 * * MON#9", "UTC", "day-of-week field 'MON#9'"),
    ("*/0 * * * *", "UTC", "minute field '*/0'"),
    ("H(0-99) * * * *", "UTC", "minute field 'H(0-99)'"),
    ("0 0 30 2 *", "UTC", "never fires"),
    ("R * * * *", "UTC", "R (random) is not supported"),
    ("0 R(0-3) * * *", "UTC", "R (random) is not supported"),
    ("@reboot", "UTC", "unknown alias '@reboot'"),
    ("@fortnightly", "UTC", "unknown alias"),
    ("@every", "UTC", "expected '@every <duration>'"),
    ("@every 5", "UTC", "has no unit"),
    ("@every 5x", "UTC", "unknown unit 'x'"),
    ("@every -5m", "UTC", "negative"),
    ("@every 1.5h", "UTC", "fractions"),
    ("@every 0s", "UTC", "shorter than the minimum of 1s"),
    ("@every 500ms", "UTC", "shorter than the minimum of 1s"),
    ("@every 1h from 25:00", "UTC", "anchor '25:00'"),
    ("@every 1h from noon", "UTC", "anchor 'noon'"),
    ("@every 1h until 3", "UTC", "expected '@every <duration>'"),
    ("@at", "UTC", "expected '@at <ISO 8601 date-time>'"),
    ("@at tomorrow", "UTC", "'tomorrow' is not an ISO 8601 date-time"),
    ("@at 2026-13-01T00:00:00Z", "UTC", "is not an ISO 8601 date-time"),
    ("* * * * *", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
    ("* * * * *", "", "time zone '' is empty"),
    ("* * * * *", "localtime", "depends on the host"),
    ("* * * * *", "../../etc/passwd", "time zone '../../etc/passwd'"),
    ("TZ=Mars/Base\n* * * * *", "UTC", "unknown time zone 'Mars/Base'"),
    ("0 9 * * *\nTZ=Asia/Tokyo", "UTC", "TZ= is only allowed before the first schedule line"),
    ("H 2 * * *\nH 25 * * *", "UTC", "line 2 of the multi-line schedule"),
]


@pytest.mark.parametrize(("expression", "zone", "problem"), BAD)
def test_refused_with_job_expression_and_reason(expression: str, zone: str, problem: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(expression, job="nightly-backup", timezone=zone)
    message = str(caught.value)
    assert "'nightly-backup'" in message
    assert problem in message
    assert repr(expression.strip().splitlines()[-1] if expression.strip() else expression)[1:-1] \
        in message
    # Never the probe expression built to find the bad field (the user never wrote it).
    assert "[* " not in message and "* *]" not in message, message


def test_schedule_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_schedule("nonsense", job="nightly-backup")


def test_validate_timezone_returns_the_zone() -> None:
    assert validate_timezone("Australia/Lord_Howe", job="j").key == "Australia/Lord_Howe"


def test_validate_timezone_names_job_and_zone() -> None:
    with pytest.raises(ScheduleError, match=r"job 'nightly-backup': unknown time zone 'Nowhere'"):
        validate_timezone("Nowhere", job="nightly-backup")
