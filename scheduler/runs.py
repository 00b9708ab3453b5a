"""Run identities: the one name every node agrees on for a (job, tick, parameter set)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from scheduler.errors import ConfigError

# Job names end up in run ids, Redis keys, Consul keys and file names. Keeping them to this
# alphabet means none of those places ever needs escaping (and `@`/`#` stay free as separators).
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_job_name(name: str) -> str:
    """Return ``name`` if it is a valid job name, else raise ConfigError naming it."""
    if not JOB_NAME.match(name):
        raise ConfigError(
            f"job name {name!r} is invalid: use 1-100 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def epoch_ms(when: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    if when.tzinfo is None:
        raise ValueError("epoch_ms needs an aware datetime")
    return round(when.timestamp() * 1000)


def from_epoch_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def iso_utc(when: datetime) -> str:
    """ISO 8601 in UTC with a trailing ``Z``; milliseconds only when not zero."""
    utc = when.astimezone(UTC)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def param_key(params: Mapping[str, str]) -> str:
    """A stable, short key for one parameter set (order of keys does not matter)."""
    canonical = json.dumps(dict(sorted(params.items())), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def make_run_id(job: str, scheduled_at: datetime, pkey: str | None = None) -> str:
    """``<job>@<scheduled time, UTC, ms>[#<param key>]``."""
    base = f"{job}@{epoch_ms(scheduled_at)}"
    return f"{base}#{pkey}" if pkey else base


@dataclass(frozen=True)
class Run:
    """One execution request: what the leader enqueues and a worker runs."""

    run_id: str
    job: str
    scheduled_at: datetime
    params: Mapping[str, str] = field(default_factory=dict)
    # Not started before this (a fan-out's jitter spreads its parameter sets); None: at once.
    not_before: datetime | None = None

    @classmethod
    def for_tick(
        cls, job: str, scheduled_at: datetime, params: Mapping[str, str] | None = None
    ) -> Run:
        params = dict(params or {})
        pkey = param_key(params) if params else None
        return cls(make_run_id(job, scheduled_at, pkey), job, scheduled_at, params)
