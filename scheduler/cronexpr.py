"""Cron lines: 5 fields, 6 fields with seconds first, names, L/#/W, aliases and Jenkins ``H``.

croniter does the field math, always on NAIVE local wall-clock times (its own time-zone
handling has had DST bugs); :mod:`scheduler.wallclock` turns each candidate into UTC under the
DST policy. The expression is expanded once, at parse time; ``next_fire`` only iterates.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, CroniterError, croniter

from scheduler.wallclock import (
    is_ambiguous,
    local_wall_time,
    overlap_end,
    require_aware,
    resolve_wall_time,
    schedule_error,
    transition,
)

# Plain cron meaning, whatever hashing is in use: "@hourly" is minute 0, not a hashed minute as
# in Jenkins (write "H * * * *" for that). croniter's own alias table is bypassed on purpose,
# because it switches to hashed forms as soon as a hash_id is given.
ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

MINUTE_FIELDS = 5  # minute hour day-of-month month day-of-week
SECOND_FIELDS = 6  # second minute hour day-of-month month day-of-week (seconds FIRST)
_DOM_INDEX = {MINUTE_FIELDS: 2, SECOND_FIELDS: 3}
_UNIX_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
FIELD_NAMES = {MINUTE_FIELDS: _UNIX_NAMES, SECOND_FIELDS: ("second", *_UNIX_NAMES)}

# Jenkins hashes H in day-of-month over 1-28 so that the day exists in every month; croniter
# would use 1-31 (and a job hashed to the 30th would skip February). Rewrite to match Jenkins.
_BARE_DOM_HASH = re.compile(r"^[hH](/\d+)?$", re.ASCII)
# croniter's R (random) differs per process: two leaders would disagree on the fire times.
_RANDOM_ITEM = re.compile(r"(^|,)[rR]($|[(/,])", re.ASCII)
_FIELDS = re.compile(r"\S+", re.ASCII)

# A fixed, arbitrary start for the parse-time "does this ever fire?" probe, so that parsing
# stays pure (no clock) and gives the same verdict on every node.
_PROBE_START = datetime(2000, 1, 1)
# Safety net for the resolve loop in next_fire: by the policy's monotonicity the first candidate
# past the start resolves after `after` in every zone tested; this only bounds the unforeseen
# (an error then, never a silent "no more fires").
_MAX_CANDIDATES = 10_000


@dataclass(frozen=True)
class CronSchedule:
    """One cron line in one zone. Satisfies :class:`scheduler.schedule.Schedule`."""

    expression: str
    timezone: str
    job: str
    zone: ZoneInfo = field(repr=False)
    # The hour field is "*" or "*/n": the job is interval-like and keeps running through a
    # repeated (fall-back) hour, as Vixie cron does for wildcard jobs. Fixed-hour jobs fire a
    # repeated wall time once, at its first occurrence.
    hour_wildcard: bool = field(default=False, repr=False)
    # The expanded expression (croniter instance, never advanced itself: each call works on a
    # shallow copy so that concurrent callers cannot disturb each other).
    _prototype: croniter = field(default=None, repr=False, compare=False)

    def next_fire(self, after: datetime) -> datetime | None:
        after_utc = require_aware(after, "after")
        if self.hour_wildcard:
            return self._next_elapsed(after_utc)
        start = overlap_end(after_utc, self.zone)
        if start is None:
            start = local_wall_time(after_utc, self.zone)
        else:
            start -= timedelta(seconds=1)  # so that the end of the overlap is itself a candidate
        # Candidates are whole seconds: dropping the fraction keeps croniter's float timestamps
        # exact and cannot skip one (a candidate > start is > the fractional time as well).
        start = start.replace(microsecond=0, fold=0)
        iterator = copy.copy(self._prototype)
        try:
            for _ in range(_MAX_CANDIDATES):
                candidate: datetime = iterator.get_next(datetime, start_time=start)
                fire = resolve_wall_time(candidate, self.zone)
                if fire > after_utc:
                    return fire
                start = candidate
        except (CroniterBadDateError, OverflowError):
            return None  # no further match before the end of the calendar
        raise schedule_error(self.job, self.expression, f"no fire time found after "
                             f"{after_utc.isoformat()} within {_MAX_CANDIDATES} candidates")


    def _next_elapsed(self, after_utc: datetime) -> datetime | None:
        """Wildcard-hour jobs: every real instant whose wall time matches, both passes of a
        repeated hour included; non-existent (spring-forward) times still collapse into one
        fire right after the gap."""
        zone = self.zone
        local = after_utc.astimezone(zone)
        second_pass = local.fold == 1 and is_ambiguous(local.replace(tzinfo=None, fold=0), zone)
        start = local.replace(tzinfo=None, microsecond=0, fold=0)
        iterator = copy.copy(self._prototype)
        try:
            if not second_pass:
                # Fast path, nearly always taken: no offset change between `after` and the
                # first candidate means no gap and no repeated stretch in between.
                first: datetime = iterator.get_next(datetime, start_time=start)
                quick = first.replace(tzinfo=zone).astimezone(UTC)
                if (quick > after_utc and quick.astimezone(zone).utcoffset() == local.utcoffset()
                        and local_wall_time(quick, zone) == first):
                    return quick
                iterator = copy.copy(self._prototype)
            for _ in range(_MAX_CANDIDATES):
                candidate: datetime = iterator.get_next(datetime, start_time=start)
                if is_ambiguous(candidate, zone):
                    fold = 1 if second_pass else 0
                    fire = candidate.replace(tzinfo=zone, fold=fold).astimezone(UTC)
                else:
                    fire = resolve_wall_time(candidate, zone)
                    if not second_pass:
                        fire = min(fire, self._second_pass_start(after_utc, fire) or fire)
                if fire > after_utc:
                    return fire
                start = candidate
        except (CroniterBadDateError, OverflowError):
            return None
        raise schedule_error(self.job, self.expression, f"no fire time found after "
                             f"{after_utc.isoformat()} within {_MAX_CANDIDATES} candidates")

    def _second_pass_start(self, after_utc: datetime, fire: datetime) -> datetime | None:
        """If the clocks go back between ``after`` and ``fire``, the first fire of the
        repeated stretch's second pass (it comes before ``fire`` in real time)."""
        before, later = after_utc.astimezone(self.zone).utcoffset(), fire.astimezone(
            self.zone).utcoffset()
        if before is None or later is None or later >= before:
            return None
        change = transition(self.zone, after_utc, fire)
        wall = local_wall_time(change, self.zone).replace(fold=0)
        candidate: datetime = copy.copy(self._prototype).get_next(
            datetime, start_time=wall - timedelta(seconds=1))
        if not is_ambiguous(candidate, self.zone):
            return None
        second = candidate.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        return second if after_utc < second < fire else None


def parse_cron_line(line: str, *, job: str, timezone: str, zone: ZoneInfo) -> CronSchedule:
    """Parse one cron line (or alias); ScheduleError naming job and line on any problem."""
    text = line.strip()
    lowered = text.lower()
    if lowered.startswith("@"):
        if lowered not in ALIASES:
            known = ", ".join([*ALIASES, "@every", "@at"])
            raise schedule_error(job, line, f"unknown alias {text!r} (known: {known})")
        text = ALIASES[lowered]
    fields = _FIELDS.findall(text)
    if len(fields) not in (MINUTE_FIELDS, SECOND_FIELDS):
        raise schedule_error(
            job, line,
            f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 fields "
            f"(second minute hour day-of-month month day-of-week), got {len(fields)}")
    for item in fields:
        if _RANDOM_ITEM.search(item):
            raise schedule_error(
                job, line, f"field {item!r}: R (random) is not supported because every node "
                f"must compute the same times; use H (hashed from the job name)")
    dom = _DOM_INDEX[len(fields)]
    if _BARE_DOM_HASH.match(fields[dom]):
        fields[dom] = "H(1-28)" + fields[dom][1:]
    normalized = " ".join(fields)
    try:
        prototype = croniter(
            normalized,
            _PROBE_START,
            ret_type=datetime,
            # Only H fields use it (aliases were expanded above, so croniter's hashed alias
            # table never applies): crc32 of the job name, stable across processes.
            hash_id=job.encode("utf-8"),
            second_at_beginning=len(fields) == SECOND_FIELDS,
            # Both day fields restricted: a day matches either (OR), except when one of them
            # starts with '*' (`*/2`), which Vixie cron and cronie count as unrestricted (AND):
            # `0 0 */2 * 1` is the odd-numbered Mondays there, and crontabs move here as written.
            implement_cron_bug=True,
        )
    except (CroniterError, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = _bad_field(fields, job) or _croniter_reason(exc)
        raise schedule_error(job, line, f"invalid cron expression: {reason}") from exc
    try:
        copy.copy(prototype).get_next(datetime, start_time=_PROBE_START)
    except CroniterBadDateError as exc:
        raise schedule_error(job, line, "never fires (no date matches all fields)") from exc
    hour = fields[1 if len(fields) == MINUTE_FIELDS else 2]
    return CronSchedule(
        expression=line,
        timezone=timezone,
        job=job,
        zone=zone,
        hour_wildcard=hour == "*" or hour.startswith("*/"),
        _prototype=prototype,
    )


def _bad_field(fields: list[str], job: str) -> str | None:
    """Name the first field croniter refuses on its own, e.g. "hour field '25': ..."."""
    names = FIELD_NAMES[len(fields)]
    for index, item in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[index] = item
        try:
            croniter(" ".join(probe), _PROBE_START, hash_id=job.encode("utf-8"),
                     second_at_beginning=len(fields) == SECOND_FIELDS)
        except (CroniterError, ValueError, KeyError, IndexError, TypeError) as exc:
            return f"{names[index]} field {item!r}: {_croniter_reason(exc)}"
    return None


def _croniter_reason(exc: Exception) -> str:
    """croniter's message without the traceback it sometimes embeds, nor the expression it
    quotes ("[* 24 * * *] is not acceptable": the probe _bad_field built, not the user's)."""
    lines = [part.strip() for part in str(exc).strip().splitlines() if part.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", reason) or reason
