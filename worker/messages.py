"""Run messages: the versioned format a worker accepts, and its validation.

A message names a job defined in the node's own config and carries parameters; it never
carries a command. Anything else is refused with a reason that becomes the dead letter's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduler.errors import ConfigError, MessageError, NotRunnableHere
from scheduler.runs import iso_utc
from worker.config import JobSpec
from worker.params import check_value, placeholders

# A run message is a few hundred bytes; anything this large is not ours (or is an attack).
MAX_PAYLOAD_BYTES = 64 * 1024
# A run is scheduled when it is enqueued (ticks, `cronsul run`, events), so a scheduled_at far
# ahead of the consumer's clock comes from a sender, not from cronsul: refused, or the window a
# run a node cannot run is handed back for (worker.consumer.HAND_BACK_WINDOW_S, counted from
# scheduled_at) never ends (a security review's "9999-12-31" was queued again every 5 s). An
# hour leaves room for any clock a node still runs jobs with.
SCHEDULED_AHEAD_MAX = timedelta(hours=1)
# Parameter names become environment variable names: keep them to this alphabet.
PARAM_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
# What may follow "<job>@" in a run id: the tick's epoch ms, "manual-<hex>", "event-<id>", and
# "#<param key>". Run ids become Redis keys and log fields; no whitespace, NUL or "/" there.
RUN_ID_TAIL = re.compile(r"[A-Za-z0-9_.:#-]{1,190}")
# How long one XREADGROUP blocks; bounds how long shutdown waits for the fetch loop.
FETCH_BLOCK_MS = 1000


# scheduler.runs.iso_utc's output: the form the scheduler writes, reused as it is when it comes.
CANONICAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.(?!000)\d{3})?Z")


@dataclass(frozen=True)
class RunMessage:
    run_id: str
    job: str
    scheduled_at: datetime
    params: Mapping[str, str]
    scheduled_iso: str = ""  # scheduled_at as iso_utc writes it (CRONSUL_SCHEDULED_AT, logs)

    def __post_init__(self) -> None:
        if not self.scheduled_iso:
            object.__setattr__(self, "scheduled_iso", iso_utc(self.scheduled_at))


def payload_field(payload: bytes | None, name: str) -> str | None:
    """A string field of a queued payload, or None when the payload is not a JSON object with
    it (undecodable, hostile, or not ours): for logs, listings and lookups, never to run."""
    try:
        body = json.loads(payload or b"")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str):
        return None
    try:
        value.encode()  # JSON's "\ud800" decodes to a lone surrogate: not text, and no key
    except UnicodeEncodeError:
        return None
    return value


def payload_params(payload: bytes | str | None) -> dict[str, str]:
    """A payload's parameters ({} when it has none or is not ours): for listings and notices,
    never to run (parse_message checks them)."""
    try:
        body = json.loads(payload or b"{}")
    except (ValueError, RecursionError):
        return {}
    params = body.get("params") if isinstance(body, dict) else None
    return {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else {}


def is_version_1(body: Mapping[str, object]) -> bool:
    """``"v": 1`` exactly: the integer (JSON ``true`` and ``1.0`` compare equal to 1 in
    Python, and are not the documented format)."""
    v = body.get("v")
    return type(v) is int and v == 1


def parse_message(payload: bytes | None, jobs: Mapping[str, JobSpec],
                  now: datetime | None = None) -> RunMessage:
    """Decode and check a queued run. Raises MessageError with the reason (for the DLQ).

    Anything a message can make go wrong here is a MessageError ("malformed: ..."), whatever
    the exception: a security review's lone surrogate in a parameter raised UnicodeEncodeError,
    which took a run slot per delivery until the node ran nothing."""
    try:
        msg = _parse_message(payload, jobs)
    except MessageError:  # NotRunnableHere too
        raise
    except Exception as exc:
        text = str(exc)[:200].encode("utf-8", "backslashreplace").decode()  # storable as is
        raise MessageError(f"malformed: {type(exc).__name__}: {text}") from exc
    if now is not None and msg.scheduled_at > now + SCHEDULED_AHEAD_MAX:
        raise MessageError(f"malformed: scheduled_at {iso_utc(msg.scheduled_at)} is more than "
                           f"{SCHEDULED_AHEAD_MAX} ahead of this node's clock")
    return msg


def _refuse_option_values(spec: JobSpec, used: set[str], params: Mapping[str, str]) -> None:
    """A value that becomes a whole argv element and starts with "-" is an option to the
    program, not data: a security review's ``{"file": "-o/tmp/pwned"}`` made ``sort
    {param.file}`` write a file as the job's user (tar, git, rsync... have worse options).
    Refused unless the job sets ``allow_option_values = true`` or the value is one of its
    declared sets' (the operator wrote those)."""
    for name in sorted(used):
        value = params.get(name, "")
        if value.startswith("-") and all(p.get(name) != value for p in spec.params):
            raise MessageError(
                f"bad params: {name}={value[:100]!r} starts with '-' and would be an option to "
                f"{spec.command[0]!r}, not a value (set allow_option_values = true on job "
                f"{spec.name!r} if it may be)")


def _parse_message(payload: bytes | None, jobs: Mapping[str, JobSpec]) -> RunMessage:
    if payload is None:
        raise MessageError("malformed: entry has no payload field")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"oversized: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"undecodable: {exc}") from exc
    except RecursionError as exc:  # json recurses into nested arrays: "[[[[..." of 64 KiB
        raise MessageError("undecodable: nested too deeply") from exc
    if not isinstance(body, dict) or not is_version_1(body):
        raise MessageError("malformed: not a version 1 run message (\"v\": 1, an integer)")
    run_id, job, when, params = (body.get(k) for k in ("run_id", "job", "scheduled_at", "params"))
    if not isinstance(job, str) or job not in jobs:
        raise NotRunnableHere(f"unknown job: {job!r} is not defined in this node's config")
    if not isinstance(run_id, str) or not run_id.startswith(f"{job}@"):
        raise MessageError(f"malformed: run_id {str(run_id)[:200]!r} does not start with "
                           f"{job + '@'!r}")
    if not RUN_ID_TAIL.fullmatch(run_id[len(job) + 1:]):
        raise MessageError(f"malformed: run_id {run_id[:200]!r}: after {job + '@'!r} it must be "
                           "1 to 190 of A-Z a-z 0-9 _ . : # -")
    try:
        scheduled = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    except ValueError as exc:
        raise MessageError(f"malformed: scheduled_at {when!r}") from exc
    if scheduled.tzinfo is None:
        raise MessageError(f"malformed: scheduled_at {when!r} has no time zone")
    params = params or {}
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and set(k) <= PARAM_NAME_CHARS
        for k, v in params.items()
    ):
        raise MessageError("malformed: params must map [A-Za-z0-9_] names to strings")
    spec = jobs[job]
    undeclared = sorted(set(params) - spec.param_names)
    if undeclared:
        raise NotRunnableHere(f"bad params: {undeclared[0]!r} is not a parameter of job "
                              f"{job!r}")
    try:
        for k, v in params.items():
            check_value(k, v, f"job {job!r}")
    except ConfigError as exc:
        raise MessageError(f"bad params: {exc}") from exc
    used = placeholders(spec.command, job)
    missing = sorted(used - set(params))
    if missing:
        raise NotRunnableHere(f"bad params: command needs {missing[0]!r}")
    if not spec.option_values:
        _refuse_option_values(spec, used, params)
    iso = when if isinstance(when, str) and CANONICAL_TIME.fullmatch(when) else ""
    return RunMessage(run_id, job, scheduled, params, iso)
