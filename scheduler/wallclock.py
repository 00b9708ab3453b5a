"""Time zones and the DST policy: turning a local wall-clock time into one UTC instant.

The policy (documented for users in docs/schedules.md):

* A wall-clock time that does not exist (it falls in the spring-forward gap) fires once, at the
  instant the gap ends. Every non-existent time of one gap maps to that same instant, so they
  collapse into a single fire (also with the wall time right after the gap, when that is a fire
  time as well).
* A wall-clock time that exists twice (the fall-back overlap) fires once, at its first
  occurrence (``fold=0``).

Schedules iterate over naive local wall-clock times and resolve each candidate with
:func:`resolve_wall_time`; that resolution is monotonic (a later wall time never resolves to an
earlier instant), which is what lets callers stop at the first candidate past ``after``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.errors import ScheduleError

# Zone names that load fine but mean different things on different hosts: every node must
# compute the same fire times, so they are refused.
HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules", "Factory"})

# DST transitions (and every offset change in the tz database) happen on whole seconds, so the
# transition search works on integer epoch seconds.
_SECOND = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def schedule_error(job: str, expression: str, problem: str) -> ScheduleError:
    """The one message shape for a bad schedule: job, expression (quoted), what is wrong."""
    return ScheduleError(f"job {job!r}: schedule {expression!r}: {problem}")


def validate_timezone(name: str, *, job: str, expression: str | None = None) -> ZoneInfo:
    """Load an IANA zone such as ``Europe/Berlin``; ScheduleError naming the job if unknown.

    With ``expression``, the message also quotes the schedule that asked for the zone.
    """
    try:
        return _load_zone(name)
    except _ZoneProblem as exc:
        if expression is not None:
            raise schedule_error(job, expression, str(exc)) from exc.__cause__
        raise ScheduleError(f"job {job!r}: {exc}") from exc.__cause__


class _ZoneProblem(Exception):
    """Internal: what is wrong with a zone name, before job and expression are added."""


def _load_zone(name: str) -> ZoneInfo:
    example = "an IANA name such as 'UTC' or 'Europe/Berlin'"
    if not isinstance(name, str) or not name.strip():
        raise _ZoneProblem(f"time zone {name!r} is empty; use {example}")
    if name in HOST_DEPENDENT_ZONES:
        raise _ZoneProblem(f"time zone {name!r} depends on the host; use {example} so every "
                           f"node agrees")
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError as exc:
        raise _ZoneProblem(f"unknown time zone {name!r} (expected {example})") from exc
    except (ValueError, OSError) as exc:  # malformed keys ("../x", "a//b") or unreadable files
        raise _ZoneProblem(f"invalid time zone {name!r}: {exc}") from exc


def require_aware(value: datetime, what: str) -> datetime:
    """Return ``value`` in UTC; naive datetimes are a programming error (ValueError)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def local_wall_time(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock time shown in ``zone`` at ``instant`` (keeps ``fold``)."""
    return instant.astimezone(zone).replace(tzinfo=None)


def resolve_wall_time(wall: datetime, zone: ZoneInfo) -> datetime:
    """The aware UTC instant at which naive ``wall`` fires in ``zone`` under the DST policy."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if local_wall_time(first, zone) == wall:
        return first  # exists (once, or twice and this is its first occurrence)
    # Non-existent: with fold=0 the pre-transition offset is used, which lands after the
    # transition; with fold=1 the post-transition offset, which lands before it.
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    return _transition(zone, min(before, first), max(before, first))


def is_ambiguous(wall: datetime, zone: ZoneInfo) -> bool:
    """True when naive ``wall`` happens twice in ``zone`` (the repeated fall-back stretch)."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return False
    return (local_wall_time(first.astimezone(UTC), zone) == wall
            and local_wall_time(second.astimezone(UTC), zone) == wall)


def transition(zone: ZoneInfo, low: datetime, high: datetime) -> datetime:
    """First whole-second UTC instant in (low, high] whose offset differs from low's."""
    return _transition(zone, low, high)


def overlap_end(instant: datetime, zone: ZoneInfo) -> datetime | None:
    """If ``instant`` is the second occurrence of a repeated wall time, the naive wall time at
    which the repeated stretch ends (the first wall time that is unambiguous again); else None.

    Every wall time in the repeated stretch already fired at its first occurrence, so a
    schedule asked for the next fire after such an instant can skip straight to this point.
    """
    local = instant.astimezone(zone)
    if local.fold == 0:
        return None
    wall = local.replace(tzinfo=None)
    first_offset = wall.replace(tzinfo=zone, fold=0).utcoffset()
    second_offset = local.utcoffset()
    if first_offset is None or second_offset is None or first_offset <= second_offset:
        return None
    span = first_offset - second_offset
    utc = instant.astimezone(UTC)
    change = _transition(zone, utc - span, utc)
    return change.replace(tzinfo=None) + first_offset


def _transition(zone: ZoneInfo, low: datetime, high: datetime) -> datetime:
    """First whole-second UTC instant in (low, high] whose offset differs from low's."""
    low_s = (low - _EPOCH) // _SECOND
    high_s = -((_EPOCH - high) // _SECOND)  # ceiling
    base = _offset_at(zone, low_s)
    if _offset_at(zone, high_s) == base:
        return _EPOCH + high_s * _SECOND  # no change found: be conservative, use the end
    while high_s - low_s > 1:
        middle = (low_s + high_s) // 2
        if _offset_at(zone, middle) == base:
            low_s = middle
        else:
            high_s = middle
    return _EPOCH + high_s * _SECOND


def _offset_at(zone: ZoneInfo, epoch_seconds: int) -> timedelta | None:
    return (_EPOCH + epoch_seconds * _SECOND).astimezone(zone).utcoffset()
