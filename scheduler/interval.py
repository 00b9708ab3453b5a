"""Elapsed-time schedules: ``@every <duration> [from HH:MM[:SS]]`` and one-shot ``@at <time>``.

Intervals ignore DST: they step in real elapsed time. Their phase is fixed so that every node
and every future leader computes the same ticks without shared state:

* unanchored: fire times are ``1970-01-01T00:00:00Z + k * interval`` for every integer k;
* anchored (``from 00:15``): fire times are ``anchor + k * interval`` where anchor is that
  wall-clock time on :data:`ANCHOR_DATE` in the job's zone (resolved with the DST policy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from scheduler.durations import DurationError, parse_duration
from scheduler.wallclock import require_aware, resolve_wall_time, schedule_error

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The date on which an anchor's time-of-day is read in the job's zone. Any fixed date works;
# a recent one means the zone's current rules (not 1970's) decide the offset. Never change it:
# that would move every anchored job's ticks.
ANCHOR_DATE = date(2024, 1, 1)
# Below one second, a cluster scheduler (fenced enqueue per tick, run ids in ms) cannot keep
# up, and cron's finest resolution is a second anyway.
MIN_INTERVAL = timedelta(seconds=1)

_EVERY = re.compile(r"^@every\s+(\S+)(?:\s+from\s+(\S+))?$", re.IGNORECASE | re.ASCII)
_AT = re.compile(r"^@at\s+(\S+(?:[ T]\S+)?)$", re.IGNORECASE | re.ASCII)
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$", re.ASCII)


@dataclass(frozen=True)
class IntervalSchedule:
    """Every ``interval`` of elapsed time, phase-aligned to ``anchor``."""

    expression: str
    timezone: str
    job: str
    interval: timedelta
    anchor: datetime = field(default=EPOCH)

    def next_fire(self, after: datetime) -> datetime | None:
        after_utc = require_aware(after, "after")
        # timedelta // timedelta is exact integer (microsecond) floor division, also before
        # the anchor, so ticks are the same whatever `after` a caller starts from.
        steps = (after_utc - self.anchor) // self.interval + 1
        try:
            return self.anchor + steps * self.interval
        except OverflowError:
            return None


@dataclass(frozen=True)
class OneShotSchedule:
    """Fires once at ``at`` (aware UTC); afterwards ``next_fire`` returns None."""

    expression: str
    timezone: str
    job: str
    at: datetime

    def next_fire(self, after: datetime) -> datetime | None:
        return self.at if self.at > require_aware(after, "after") else None


def parse_every(line: str, *, job: str, timezone: str, zone: ZoneInfo) -> IntervalSchedule:
    match = _EVERY.match(line.strip())
    if match is None:
        raise schedule_error(job, line, "expected '@every <duration>' or "
                             "'@every <duration> from HH:MM[:SS]', e.g. '@every 1h from 00:15'")
    duration_text, anchor_text = match.groups()
    try:
        interval = parse_duration(duration_text)
    except DurationError as exc:
        raise schedule_error(job, line, str(exc)) from exc
    if interval < MIN_INTERVAL:
        raise schedule_error(job, line, f"interval {duration_text!r} is shorter than the "
                             f"minimum of 1s")
    anchor = EPOCH
    if anchor_text is not None:
        time_match = _TIME_OF_DAY.match(anchor_text)
        if time_match is None:
            raise schedule_error(job, line, f"anchor {anchor_text!r} is not a time of day "
                                 f"HH:MM or HH:MM:SS (00:00 to 23:59:59)")
        hour, minute, second = (int(part or 0) for part in time_match.groups())
        wall = datetime.combine(ANCHOR_DATE, time(hour, minute, second))
        anchor = resolve_wall_time(wall, zone)
    return IntervalSchedule(expression=line, timezone=timezone, job=job, interval=interval,
                            anchor=anchor)


def parse_at(line: str, *, job: str, timezone: str, zone: ZoneInfo) -> OneShotSchedule:
    match = _AT.match(line.strip())
    if match is None:
        raise schedule_error(job, line, "expected '@at <ISO 8601 date-time>', e.g. "
                             "'@at 2026-12-01T09:00:00+09:00'")
    text = match.group(1)
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise schedule_error(job, line, f"{text!r} is not an ISO 8601 date-time such as "
                             f"2026-12-01T09:00:00+09:00") from exc
    # Without an offset the time is local to the job's zone, and the DST policy applies.
    at = resolve_wall_time(when, zone) if when.tzinfo is None else when.astimezone(UTC)
    return OneShotSchedule(expression=line, timezone=timezone, job=job, at=at)
