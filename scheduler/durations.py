"""Durations written with units ("500ms", "30s", "5m", "1h30m", "2d"), as everywhere in cronsul.

The grammar is deliberately small: one or more ``<whole number><unit>`` parts, units in
descending order, each unit at most once, no spaces, no sign, no fractions. Anything else is
refused with a message that quotes the text, because a silently misread duration (a timeout of
"5" meaning 5 ms or 5 h?) is worse than a refused config.
"""

from __future__ import annotations

import re
from datetime import timedelta

from scheduler.errors import ScheduleError

# Unit -> length. Order matters: parts must appear in this (descending) order. Months and years
# are not units: their length varies, which a duration must not.
UNITS: dict[str, timedelta] = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}

# "ms" must be tried before "m" and "s" so that "500ms" is one part, not "500m" + garbage.
_PART = re.compile(r"(\d+)(ms|d|h|m|s)", re.ASCII)
_UNIT_RANK = {unit: rank for rank, unit in enumerate(UNITS)}
_EXAMPLES = '"500ms", "30s", "5m", "1h30m", "2d"'


class DurationError(ScheduleError, ValueError):
    """A duration string cannot be understood.

    A :class:`~scheduler.errors.ScheduleError` (so a ConfigError: exit code 2) and a
    ValueError (so generic parsing code can catch it as one). Callers that know the file, job
    or key add it with ``raise ConfigError(...) from exc``.
    """


def parse_duration(text: str) -> timedelta:
    """Parse ``"1h30m"`` and friends into a timedelta (zero, "0s", is allowed)."""
    if not isinstance(text, str):
        raise DurationError(f"invalid duration {text!r}: expected a string such as {_EXAMPLES}")
    body = text.strip()
    if not body:
        raise DurationError(f"invalid duration {text!r}: empty (use e.g. {_EXAMPLES})")
    if body[0] in "+-":
        raise DurationError(f"invalid duration {text!r}: durations cannot be signed or negative")
    total = timedelta(0)
    position = 0
    last_rank = -1
    while position < len(body):
        match = _PART.match(body, position)
        if match is None:
            raise DurationError(_describe_garbage(text, body, position))
        number, unit = match.groups()
        rank = _UNIT_RANK[unit]
        if rank <= last_rank:
            raise DurationError(
                f"invalid duration {text!r}: unit {unit!r} repeated or out of order "
                f"(write largest unit first, each once: e.g. \"1h30m\")"
            )
        last_rank = rank
        total += int(number) * UNITS[unit]
        position = match.end()
    return total


def _describe_garbage(text: str, body: str, position: int) -> str:
    rest = body[position:]
    digits = re.match(r"\d+", rest, re.ASCII)
    if digits is not None and digits.end() == len(rest):
        problem = f"number {rest!r} has no unit"
    elif re.match(r"\d*\.\d", rest, re.ASCII):
        problem = "fractions are not allowed (write \"1h30m\", not \"1.5h\")"
    elif digits is not None:
        unit = re.match(r"\D+", rest[digits.end():])
        shown = unit.group(0) if unit is not None else rest[digits.end():]
        problem = f"unknown unit {shown!r}"
    else:
        problem = f"cannot read {rest!r}"
    return f"invalid duration {text!r}: {problem} (units: ms, s, m, h, d; e.g. {_EXAMPLES})"


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole milliseconds: ``5400s`` -> ``"1h30m"``."""
    if value < timedelta(0):
        raise ValueError(f"cannot format negative duration {value!r}")
    remaining = value // UNITS["ms"]
    if remaining * UNITS["ms"] != value:
        raise ValueError(f"duration {value!r} is not a whole number of milliseconds")
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, length in UNITS.items():
        count, remaining = divmod(remaining, length // UNITS["ms"])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
