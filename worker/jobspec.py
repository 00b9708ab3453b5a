"""Job definitions: one `[jobs.<name>]` table parsed into a JobSpec, every refusal naming the
file, the job and the key (split from worker.config, which reads the rest of the file)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, ScheduleError
from scheduler.runs import check_job_name
from scheduler.schedule import Schedule, parse_schedule, validate_timezone
from scheduler.ticker import CatchUp, ScheduledJob
from worker.params import load_params_file, normalise_sets, placeholders
from worker.pyjobs import validate_target
from worker.tomlread import Section


@dataclass(frozen=True)
class JobSpec:
    """A job as the operator defined it."""

    name: str
    schedule: Schedule
    timezone: str
    command: tuple[str, ...]
    timeout: timedelta
    catchup: CatchUp
    catchup_window: timedelta
    jitter: timedelta
    queue: str
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    params: tuple[dict[str, str], ...] = ()
    param_names: frozenset[str] = frozenset()
    overlap: str = "allow"
    lock_key: str | None = None  # "{param.NAME}": one lock per value instead of per job
    retries: int = 0
    retry_backoff: timedelta = timedelta(seconds=10)
    retry_backoff_max: timedelta = timedelta(minutes=10)
    on_lost: str = "retry"
    shell: bool = False
    user: str | None = None
    allow_root: bool = False
    output_limit: int = 64 * 1024
    callable: str | None = None  # "package.module:function", run in the warm Python pool
    notify: bool = True  # false: no [notify] command for this job's failures
    # A run message's value for a {param.NAME} argv element may start with "-" (an option to
    # the program) only if the job says so, or if it is one of the declared sets' values.
    option_values: bool = False

    def lock_name(self, params: Mapping[str, str]) -> str:
        """The overlap lock this run takes: the job's, or one per lock_key parameter value."""
        if self.lock_key is None:
            return self.name
        value = params.get(self.lock_key[len("{param."):-1], "")
        return f"{self.name}:{hashlib.sha256(value.encode()).hexdigest()[:16]}"

    def scheduled(self) -> ScheduledJob:
        return ScheduledJob(
            name=self.name, schedule=self.schedule, queue=self.queue, catchup=self.catchup,
            catchup_window=self.catchup_window, jitter=self.jitter, params=self.params,
        )



def env_table(s: Section, key: str = "env") -> dict[str, str]:
    """An ``env = { NAME = "value" }`` table, checked as a process environment needs it."""
    env: dict[str, Any] = dict(s.table(key))
    for name, value in env.items():
        if not isinstance(value, str):
            raise s.fail(key, f"value of {name!r} must be a string")
        if not name or "=" in name or "\0" in name:
            raise s.fail(key, f"{name!r} is not a valid environment variable name")
        if "\0" in value:
            raise s.fail(key, f"value of {name!r} contains a NUL character, which no process "
                         "environment can hold")
    return env


def parse_job(s: Section, name: str, default_timezone: str, default_timeout: timedelta) -> JobSpec:
    """One [jobs.<name>] table; ConfigError naming the file, the job and the key."""
    expr = s.string("schedule")
    if expr is None:
        raise s.fail("schedule", "is required")
    timezone = s.string("timezone", default_timezone) or default_timezone
    try:
        validate_timezone(timezone, job=name)
    except ScheduleError as exc:
        raise s.fail("timezone", str(exc)) from exc
    try:
        schedule = parse_schedule(expr, job=name, timezone=timezone)
    except ScheduleError as exc:
        raise s.fail("schedule", str(exc)) from exc
    shell = s.boolean("shell", False)
    target = s.string("callable")
    if target is not None:
        if "command" in s.data or shell:
            raise s.fail("callable", "set command (a program) or callable (a Python function), "
                         "not both")
        try:
            validate_target(target)
        except ConfigError as exc:
            raise s.fail("callable", str(exc)) from exc
        if "working_dir" in s.data:
            raise s.fail("working_dir", "applies to command jobs only: a callable runs in a "
                         "warm Python process shared by runs (use absolute paths, or chdir in "
                         "the function)")
        command: list[str] = []
    elif shell:
        text = s.string("command")
        if text is None:
            raise s.fail("command", "is required: with shell = true, one string for /bin/sh -c")
        if "{param." in text:
            raise s.fail("command", "with shell = true parameters arrive only as "
                         "CRONSUL_PARAM_<NAME> variables, never spliced into the string")
        command = ["/bin/sh", "-c", text]
    else:
        command = s.strings("command") or []
    if not command and target is None:
        raise s.fail("command", "is required: a non-empty list of strings (argv, no shell), "
                     "or set callable = \"package.module:function\"")
    env = env_table(s)
    queue = s.string("queue", "default") or "default"
    try:
        check_job_name(queue)
    except ConfigError as exc:
        raise s.fail("queue", f"queue name {queue!r} is invalid") from exc
    catchup = s.choice("catchup", "all", ("all", "latest", "none"))
    params = _params(s)
    names = frozenset(k for p in params for k in p)
    used = placeholders(command, f"{s.path}: [{s.where}] command")
    for p in params:
        missing = used - set(p)
        if missing:
            raise s.fail("params", f"parameter set {p} lacks {sorted(missing)[0]!r}, used in "
                         "command as {param." + sorted(missing)[0] + "}")
    if used and not params:
        raise s.fail("command", "uses {param.NAME} but the job has no params")
    out = JobSpec(
        name=name,
        schedule=schedule,
        timezone=schedule.timezone,
        command=tuple(command),
        timeout=s.duration("timeout", f"{int(default_timeout.total_seconds())}s",
                           low=timedelta(milliseconds=100)),
        catchup=catchup,  # type: ignore[arg-type]  # checked against the Literal's values above
        catchup_window=s.duration("catchup_window", "5m", low=timedelta(seconds=1)),
        jitter=s.duration("jitter", "0s", low=timedelta(0)),
        queue=queue,
        env=tuple(sorted(env.items())),
        working_dir=s.string("working_dir"),
        params=params,
        param_names=names,
        overlap=s.choice("overlap", "allow", ("allow", "skip", "queue", "replace")),
        lock_key=_lock_key(s, names),
        retries=s.integer("retries", 0, low=0, high=100),
        retry_backoff=s.duration("retry_backoff", "10s", low=timedelta(0)),
        retry_backoff_max=s.duration("retry_backoff_max", "10m", low=timedelta(0)),
        on_lost=s.choice("on_lost", "retry", ("retry", "fail")),
        shell=shell,
        user=s.string("user"),
        allow_root=s.boolean("allow_root", False),
        notify=s.boolean("notify", True),
        option_values=s.boolean("allow_option_values", False),
        output_limit=s.integer("output_limit", 64 * 1024, low=0, high=16 * 1024 * 1024),
        callable=target,
    )
    if out.lock_key is not None and out.overlap == "allow":
        raise s.fail("lock_key", "only means something with overlap = skip, queue or replace")
    s.check_unknown()
    return out


def _lock_key(s: Section, names: frozenset[str]) -> str | None:
    text = s.string("lock_key")
    if text is None:
        return None
    if not (text.startswith("{param.") and text.endswith("}")) or text[7:-1] not in names:
        raise s.fail("lock_key", f"{text!r} must be {{param.NAME}} with NAME one of the job's "
                     f"params ({', '.join(sorted(names)) or 'none declared'})")
    return text


def _params(s: Section) -> tuple[dict[str, str], ...]:
    inline = s.raw("params")
    path_text = s.string("params_file")
    if inline is not None and path_text is not None:
        raise s.fail("params_file", "set params or params_file, not both")
    if path_text is not None:
        path = Path(path_text)
        if not path.is_absolute():
            path = s.path.parent / path
        return load_params_file(path, f"{s.path}: [{s.where}]")
    if inline is not None:
        return normalise_sets(inline, f"{s.path}: [{s.where}] params")
    return ()
