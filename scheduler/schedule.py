"""Schedules: when a job fires. Pure math, no clock: callers pass ``after`` explicitly.

Forms (one per line; see docs/schedules.md for the user reference):

* cron, 5 fields ``*/5 * * * *`` or 6 with seconds first ``*/10 * * * * *``, names, L/#/W,
  aliases ``@hourly`` .. ``@yearly`` (plain cron meaning);
* Jenkins ``H`` hashed from the job name, and Jenkins multi-line specs: one spec per line
  (their union), ``#`` comments, blank lines, an optional leading ``TZ=<zone>`` line;
* ``@every 30s`` / ``@every 1h from 00:15``: elapsed time, epoch- or anchor-aligned;
* ``@at 2026-12-01T09:00:00+09:00``: once.

All fire times are aware UTC datetimes. Wall-clock forms follow the DST policy in
:mod:`scheduler.wallclock`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from scheduler.cronexpr import CronSchedule, parse_cron_line
from scheduler.durations import DurationError, format_duration, parse_duration
from scheduler.errors import ScheduleError
from scheduler.interval import IntervalSchedule, OneShotSchedule, parse_at, parse_every
from scheduler.wallclock import require_aware, schedule_error, validate_timezone

__all__ = [
    "CronSchedule",
    "DurationError",
    "IntervalSchedule",
    "OneShotSchedule",
    "Schedule",
    "UnionSchedule",
    "fire_times",
    "format_duration",
    "jitter_offset",
    "parse_duration",
    "parse_schedule",
    "validate_timezone",
]

# Jenkins lets a spec start with a line "TZ=<zone>" that overrides the job's zone.
_TZ_PREFIX = "TZ="
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_MICROSECOND = timedelta(microseconds=1)
# Default cap for fire_times: a day of a one-second job is 86,400 ticks; anything far beyond is
# a caller asking for an unbounded catch-up window, which must be an error, not a silent cut.
DEFAULT_FIRE_TIMES_LIMIT = 100_000


class Schedule(Protocol):
    """When a job fires. Read-only attributes, so frozen dataclasses satisfy it."""

    @property
    def expression(self) -> str:
        """The original text."""
        ...

    @property
    def timezone(self) -> str:
        """IANA name actually used (after any Jenkins ``TZ=`` line)."""
        ...

    def next_fire(self, after: datetime) -> datetime | None:
        """First fire time strictly after ``after`` (aware, any zone), as aware UTC; None when
        the schedule will never fire again."""
        ...


@dataclass(frozen=True)
class UnionSchedule:
    """A multi-line (Jenkins-style) spec: fires whenever any of its lines fires, once per
    instant even when several lines agree."""

    expression: str
    timezone: str
    job: str
    parts: tuple[Schedule, ...]

    def next_fire(self, after: datetime) -> datetime | None:
        fires = [fire for part in self.parts if (fire := part.next_fire(after)) is not None]
        return min(fires) if fires else None


def parse_schedule(expression: str, *, job: str, timezone: str = "UTC") -> Schedule:
    """Parse any supported form; ScheduleError naming job, expression and the problem."""
    if not isinstance(expression, str):
        raise schedule_error(job, str(expression), "a schedule must be a string")
    lines = expression.splitlines()
    meaningful = [(number, line.strip()) for number, line in enumerate(lines, start=1)
                  if line.strip() and not line.strip().startswith("#")]
    if meaningful and meaningful[0][1].startswith(_TZ_PREFIX):
        timezone = meaningful[0][1][len(_TZ_PREFIX):].strip()
        meaningful = meaningful[1:]
    zone = validate_timezone(timezone, job=job, expression=expression)
    if not meaningful:
        raise schedule_error(job, expression, "no schedule (only blank, comment or TZ= lines)")
    simple = len(lines) == 1 and len(meaningful) == 1
    if simple:
        return _parse_line(expression, job=job, timezone=timezone, zone=zone)
    parts: list[Schedule] = []
    for number, line in meaningful:
        if line.startswith(_TZ_PREFIX):
            raise schedule_error(job, expression, f"line {number} {line!r}: TZ= is only "
                                 f"allowed before the first schedule line")
        try:
            parts.append(_parse_line(line, job=job, timezone=timezone, zone=zone))
        except ScheduleError as exc:
            raise ScheduleError(f"{exc} (line {number} of the multi-line schedule "
                                f"{expression!r})") from exc
    return UnionSchedule(expression=expression, timezone=timezone, job=job, parts=tuple(parts))


def _parse_line(line: str, *, job: str, timezone: str, zone: ZoneInfo) -> Schedule:
    keyword = line.strip().split(maxsplit=1)[0].lower() if line.strip() else ""
    if keyword == "@every":
        return parse_every(line, job=job, timezone=timezone, zone=zone)
    if keyword == "@at":
        return parse_at(line, job=job, timezone=timezone, zone=zone)
    return parse_cron_line(line, job=job, timezone=timezone, zone=zone)


def fire_times(
    schedule: Schedule,
    after: datetime,
    until: datetime,
    limit: int = DEFAULT_FIRE_TIMES_LIMIT,
) -> list[datetime]:
    """Every fire time in ``(after, until]``, aware UTC, ascending.

    More than ``limit`` fire times in the window is a ScheduleError (never a silent cut: the
    caller is asking for an unbounded catch-up and must narrow the window).
    """
    start = require_aware(after, "after")
    end = require_aware(until, "until")
    found: list[datetime] = []
    cursor = start
    while True:
        fire = schedule.next_fire(cursor)
        if fire is None or fire > end:
            return found
        if fire <= cursor:
            raise ScheduleError(f"schedule {schedule.expression!r}: next_fire({cursor.isoformat()})"
                                f" returned {fire.isoformat()}, which is not later")
        if len(found) >= limit:
            raise ScheduleError(
                f"schedule {schedule.expression!r}: more than {limit} fire times between "
                f"{start.isoformat()} and {end.isoformat()}; narrow the window")
        found.append(fire)
        cursor = fire


def jitter_offset(job: str, tick: datetime, max_jitter: timedelta) -> timedelta:
    """A deterministic delay in ``[0, max_jitter)`` for this job's tick (zero if max is zero).

    Derived from SHA-256 of ``<job> NUL <tick as UTC epoch ms>``, so every node and every
    restart computes the same delay, and ticks of one job (and jobs at one tick) spread out.
    Microsecond resolution.
    """
    if max_jitter < timedelta(0):
        raise ScheduleError(f"job {job!r}: jitter {max_jitter} is negative")
    span = max_jitter // _MICROSECOND
    if span == 0:
        return timedelta(0)
    epoch_ms = (require_aware(tick, "tick") - _EPOCH) // _MILLISECOND
    digest = hashlib.sha256(f"{job}\x00{epoch_ms}".encode()).digest()
    # Scale a uniform 64-bit number into [0, span): unbiased enough (< 2**-40 for a day) and
    # never reaches span itself.
    draw = int.from_bytes(digest[:8], "big")
    return (draw * span >> 64) * _MICROSECOND
