"""The agent's TOML configuration: parsed once, validated completely, refused precisely.

Every error names the file, the section (``[jobs.<name>]``) and the key, and is raised before
the agent touches Consul or Redis (exit code 2).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scheduler.errors import ConfigError, ScheduleError
from scheduler.runs import check_job_name
from scheduler.schedule import validate_timezone
from worker.jobspec import JobSpec as JobSpec  # re-exported: the job noun lives here too
from worker.jobspec import parse_job
from worker.notify import NotifySection, notify_section
from worker.redisconn import RedisSection, redis_section
from worker.secretfiles import secret_sources
from worker.tomlread import Section

# Consul refuses session TTLs outside 10s..24h (agent/structs: SessionTTLMin/Max).
SESSION_TTL_MIN = timedelta(seconds=10)
SESSION_TTL_MAX = timedelta(hours=24)
# Consul caps lock-delay at 60s. We need at least 1s: the leader's local lease is derived from
# min(session_ttl, lock_delay), and with no lock-delay a successor could take the key the
# instant our session dies, leaving no window in which our lease is provably still ours.
LOCK_DELAY_MIN = timedelta(seconds=1)
LOCK_DELAY_MAX = timedelta(seconds=60)
# The TTL check is passed every check_ttl/3; below one second that is a busy loop on Consul.
CHECK_TTL_MIN = timedelta(seconds=1)
# Runs whose lease is not renewed for this long are re-delivered. Shorter than 2 s leaves no room
# for a renewal round trip at visibility/3 intervals.
VISIBILITY_MIN = timedelta(seconds=2)
DEFAULT_CONSUL = "127.0.0.1:8500"
# The dashboard's admin token is a password typed or pasted once; shorter is guessable.
ADMIN_TOKEN_MIN = 16
# SQS queue names: 1-80 characters of A-Z a-z 0-9 _ -, a FIFO queue's ending in ".fifo".
SQS_QUEUE_NAME = re.compile(r"(?=.{1,80}$)[A-Za-z0-9_-]+(\.fifo)?")
# A config (or included) file larger than this is refused before parsing: tomllib holds the
# whole document in memory several times over, and no real schedule comes near it.
MAX_CONFIG_BYTES = 8 * 2**20
# Jobs per node (main file plus includes). Each costs ~0.5 ms to validate and a slot in every
# scheduler pass; 100,000 would take a minute to load. Fan-out belongs in `params`.
MAX_JOBS = 10_000


@dataclass(frozen=True)
class AgentSection:
    node: str
    address: str
    timezone: str
    leader_eligible: bool


@dataclass(frozen=True)
class ConsulSection:
    scheme: str
    host: str
    port: int
    token: str | None = field(repr=False)
    prefix: str
    session_ttl: timedelta
    check_ttl: timedelta
    lock_delay: timedelta

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}/leader"


@dataclass(frozen=True)
class WorkerSection:
    concurrency: int
    visibility_timeout: timedelta
    default_timeout: timedelta
    kill_grace: timedelta
    shutdown_grace: timedelta
    queues: tuple[str, ...]
    queue_concurrency: tuple[tuple[str, int], ...] = ()
    history_retention: timedelta = timedelta(days=7)
    python_workers: int = 0  # warm processes for callable jobs; 0: one per run slot
    python_prefetch: int = 4  # runs one busy warm process may hold queued (short callables)
    python_max_memory_mb: int = 1024  # RLIMIT_DATA of each warm process; 0: no limit


@dataclass(frozen=True)
class SqsSection:
    """``[queue.sqs]``: where each cronsul queue lives in SQS (docs/sqs.md)."""

    region: str
    endpoint_url: str | None
    queues: tuple[tuple[str, str], ...]  # (cronsul queue, SQS queue URL or name)


@dataclass(frozen=True)
class QueueSection:
    """``[queue] backend``: Redis Streams (default) or Amazon SQS. Run state stays in Redis."""

    backend: str = "redis"
    sqs: SqsSection | None = None


@dataclass(frozen=True)
class HttpSection:
    """``[http] listen = "host:port"``: /metrics, /healthz and the dashboard. None (the
    default): no server. ``admin_token_file`` enables the dashboard's actions."""

    listen: str | None = None
    host: str = ""
    port: int = 0
    admin_token_file: str | None = None
    admin_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    path: Path
    agent: AgentSection
    consul: ConsulSection
    redis: RedisSection
    worker: WorkerSection
    jobs: dict[str, JobSpec] = field(default_factory=dict)
    digest: str = ""
    http: HttpSection = field(default_factory=HttpSection)
    queue: QueueSection = field(default_factory=QueueSection)
    # (file, what) for each file holding a secret: see worker/secretfiles.py
    secret_files: tuple[tuple[str, str], ...] = ()
    notify: NotifySection = field(default_factory=NotifySection)

    @property
    def record_ttl(self) -> timedelta:
        """How long a run record lives: ``history_retention``, but at least twice the longest
        catch-up window (a record is also the one-time claim of its run id, which must outlive
        every tick a leader may still enqueue)."""
        windows = [j.catchup_window for j in self.jobs.values()]
        return max([self.worker.history_retention, *(2 * w for w in windows)])

    @property
    def config_hash(self) -> str:
        """Short hash of the job definitions, to spot nodes whose schedules drifted apart."""
        return self.digest[:12]


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    """Read and validate ``path``. Raises ConfigError naming the file, section and key."""
    environ = dict(os.environ) if env is None else env
    file = Path(path)
    raw = _read_capped(file, "config")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"{file}: invalid TOML: nested too deeply") from exc

    top = Section(file, "top level", data)
    agent = _agent(Section(file, "agent", top.table("agent")))
    consul = _consul(Section(file, "consul", top.table("consul")), environ)
    redis = redis_section(Section(file, "redis", top.table("redis")))
    worker = _worker(Section(file, "worker", top.table("worker")))
    http = _http(Section(file, "http", top.table("http")))
    notify = notify_section(Section(file, "notify", top.table("notify")))
    queue_table = top.table("queue")  # parsed after the jobs, whose queues it must map
    sources = [(file, top.table("jobs"))]
    for pattern in top.strings("include") or []:
        sources.extend(_included(file, pattern))
    top.check_unknown()
    total = sum(len(table) if isinstance(table, dict) else 0 for _, table in sources)
    if total > MAX_JOBS:
        raise ConfigError(f"{file}: [jobs]: {total} jobs exceed the limit of {MAX_JOBS} "
                          "(fan one job out with params instead)")
    jobs: dict[str, JobSpec] = {}
    origin: dict[str, Path] = {}
    bodies: dict[str, dict[str, Any]] = {}
    for source, table in sources:
        for name, body in table.items():
            try:
                check_job_name(name)
            except ConfigError as exc:
                raise ConfigError(f"{source}: [jobs.{name}]: {exc}") from exc
            if name in origin:
                raise ConfigError(f"{source}: [jobs.{name}]: already defined in {origin[name]}")
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: [jobs.{name}]: expected a table, got {body!r}")
            jobs[name] = parse_job(Section(source, f"jobs.{name}", body), name, agent.timezone,
                                  worker.default_timeout)
            origin[name] = source
            bodies[name] = body
    digest = _jobs_digest(jobs, bodies)
    queue = _queue(Section(file, "queue", queue_table), worker, jobs)
    return Config(file, agent, consul, redis, worker, jobs, digest, http, queue,
                  secret_sources(file, data), notify)


def _jobs_digest(jobs: Mapping[str, JobSpec], bodies: Mapping[str, Mapping[str, Any]]) -> str:
    """What two nodes must agree on: every key of every job as written (so a change of
    callable, overlap, retries, env, user, ... is drift), plus what a job takes from elsewhere:
    its time zone and timeout (from [agent] / [worker] when it sets none) and its parameter
    sets (which may come from included files)."""
    canonical = {name: {"job": bodies[name], "timezone": spec.timezone,
                        "timeout": str(spec.timeout), "params": list(spec.params)}
                 for name, spec in sorted(jobs.items())}
    text = json.dumps(canonical, sort_keys=True, default=str)  # TOML dates and times as text
    return hashlib.sha256(text.encode()).hexdigest()


def _read_capped(file: Path, what: str) -> bytes:
    """The file's bytes, refusing one larger than MAX_CONFIG_BYTES before parsing it."""
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: {what} file is larger than {MAX_CONFIG_BYTES // 2**20} MiB; "
                          "split the jobs into include files")
    return raw


def _included(main: Path, pattern: str) -> list[tuple[Path, dict[str, Any]]]:
    """Files matched by an `include` glob (relative to the main file's folder), sorted; each
    may hold only [jobs.*] tables, like a cron.d for teams. A glob may match nothing (an empty
    jobs.d); a plain path must exist (as nginx's include): a typo must not silently drop a
    team's jobs."""
    base = pattern if Path(pattern).is_absolute() else str(main.parent / pattern)
    out: list[tuple[Path, dict[str, Any]]] = []
    names = sorted(glob.glob(base))
    if not names and not glob.has_magic(base):
        raise ConfigError(f"{main}: include: {base} does not exist (a glob such as "
                          "jobs.d/*.toml may match nothing; a plain path must exist)")
    for name in names:
        path = Path(name)
        raw = _read_capped(path, "included")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        except RecursionError as exc:
            raise ConfigError(f"{path}: invalid TOML: nested too deeply") from exc
        extra = sorted(set(data) - {"jobs"})
        if extra:
            raise ConfigError(f"{path}: [{extra[0]}]: an included file may only define [jobs.*]")
        jobs = data.get("jobs", {})
        if not isinstance(jobs, dict):
            raise ConfigError(f"{path}: jobs: expected tables [jobs.<name>]")
        out.append((path, jobs))
    return out


def _agent(s: Section) -> AgentSection:
    node = s.string("node") or socket.gethostname()
    try:
        check_job_name(node)
    except ConfigError as exc:
        raise s.fail("node", f"{node!r} is not a valid node name (same alphabet as job names)") \
            from exc
    timezone = s.string("timezone", "UTC") or "UTC"
    try:
        validate_timezone(timezone, job="(agent default)")
    except ScheduleError as exc:
        raise s.fail("timezone", str(exc)) from exc
    out = AgentSection(
        node=node,
        address=s.string("address") or socket.gethostname(),
        timezone=timezone,
        leader_eligible=s.boolean("leader_eligible", True),
    )
    s.check_unknown()
    return out


def _consul(s: Section, env: dict[str, str]) -> ConsulSection:
    address = s.string("address") or env.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL
    scheme, host, port = _parse_address(s, address)
    token = s.string("token")
    token_file = s.string("token_file")
    if token and token_file:
        raise s.fail("token_file", "set token or token_file, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise s.fail("token_file", f"cannot read {token_file}: {exc.strerror}") from exc
    token = token or env.get("CONSUL_HTTP_TOKEN") or None
    prefix = (s.string("prefix", "cronsul") or "cronsul").strip("/")
    out = ConsulSection(
        scheme=scheme, host=host, port=port, token=token, prefix=prefix,
        session_ttl=s.duration("session_ttl", "15s", low=SESSION_TTL_MIN, high=SESSION_TTL_MAX),
        check_ttl=s.duration("check_ttl", "5s", low=CHECK_TTL_MIN),
        lock_delay=s.duration("lock_delay", "5s", low=LOCK_DELAY_MIN, high=LOCK_DELAY_MAX),
    )
    s.check_unknown()
    return out


def _parse_address(s: Section, address: str) -> tuple[str, str, int]:
    text = address if "://" in address else f"http://{address}"
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise s.fail("address", f"{address!r} is not host:port or an http(s) URL")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 8500)
    except ValueError as exc:
        raise s.fail("address", f"{address!r} has an invalid port") from exc
    return parsed.scheme, parsed.hostname, port



def _worker(s: Section) -> WorkerSection:
    queues = s.strings("queues") or ["default"]
    out = WorkerSection(
        concurrency=s.integer("concurrency", 4, low=1, high=1024),
        visibility_timeout=s.duration("visibility_timeout", "30s", low=VISIBILITY_MIN),
        default_timeout=s.duration("default_timeout", "1h", low=timedelta(seconds=1)),
        kill_grace=s.duration("kill_grace", "10s", low=timedelta(0)),
        shutdown_grace=s.duration("shutdown_grace", "30s", low=timedelta(0)),
        queues=tuple(queues),
        queue_concurrency=_queue_limits(s, queues),
        history_retention=s.duration("history_retention", "7d", low=timedelta(hours=1)),
        python_workers=s.integer("python_workers", 0, low=0, high=1024),
        python_prefetch=s.integer("python_prefetch", 4, low=1, high=64),
        python_max_memory_mb=s.integer("python_max_memory_mb", 1024, low=0,
                                       high=1024 * 1024),
    )
    for q in out.queues:
        try:
            check_job_name(q)
        except ConfigError as exc:
            raise s.fail("queues", f"queue name {q!r} is invalid") from exc
    s.check_unknown()
    return out


def _http(s: Section) -> HttpSection:
    listen = s.string("listen")
    token_file = s.string("admin_token_file")
    s.check_unknown()
    token = _admin_token(s, token_file) if token_file is not None else None
    if listen is None:
        return HttpSection(admin_token_file=token_file, admin_token=token)
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")  # "[::1]:9464"
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise s.fail("listen", f"{listen!r} is not host:port (e.g. \"127.0.0.1:9464\")")
    return HttpSection(listen=listen, host=host, port=int(port_text),
                       admin_token_file=token_file, admin_token=token)


def _admin_token(s: Section, token_file: str) -> str:
    """The dashboard's admin token (a relative path is relative to the config file). Refused
    when other users may read or write the file: its reader can run, pause and drain anything."""
    path = Path(token_file) if Path(token_file).is_absolute() else s.path.parent / token_file
    try:
        mode = os.stat(path).st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise s.fail("admin_token_file", f"cannot read {token_file}: {exc.strerror}") from exc
    if mode & 0o007:
        raise s.fail("admin_token_file", f"{token_file} is accessible by other users (mode "
                     f"{mode & 0o777:o}): chmod 600 or 640 it")
    if len(token) < ADMIN_TOKEN_MIN:
        raise s.fail("admin_token_file", f"{token_file}: the token must be at least "
                     f"{ADMIN_TOKEN_MIN} characters (e.g. openssl rand -hex 32)")
    return token


def _queue(s: Section, worker: WorkerSection, jobs: Mapping[str, JobSpec]) -> QueueSection:
    """``[queue]`` and ``[queue.sqs]``; every queue this node serves or a job enqueues on must
    map to an SQS queue (extra entries are allowed: nodes serving other queues may share them)."""
    backend = s.choice("backend", "redis", ("redis", "sqs"))
    raw = s.raw("sqs")
    s.check_unknown()
    if raw is None:
        if backend == "sqs":
            raise s.fail("backend", '"sqs" needs a [queue.sqs] table with region and queues')
        return QueueSection(backend)
    if not isinstance(raw, dict):
        raise s.fail("sqs", "expected a table [queue.sqs]")
    t = Section(s.path, "queue.sqs", raw)
    region = t.string("region")
    if region is None:
        raise t.fail("region", 'is required, e.g. "eu-west-1"')
    endpoint = t.string("endpoint_url")
    if endpoint is not None and (urlparse(endpoint).scheme not in ("http", "https")
                                 or not urlparse(endpoint).hostname):
        raise t.fail("endpoint_url", f"{endpoint!r} is not an http(s) URL")
    mapping = dict(t.table("queues"))
    for q, target in mapping.items():
        if not isinstance(target, str) or not (
                SQS_QUEUE_NAME.fullmatch(target) or (urlparse(target).scheme in ("http", "https")
                and urlparse(target).hostname)):
            raise t.fail("queues", f"{q} = {target!r} is neither an SQS queue URL nor a queue "
                         "name (1-80 of A-Z a-z 0-9 _ -; a FIFO queue's ends in .fifo)")
    needed = list(dict.fromkeys([*worker.queues, *sorted(j.queue for j in jobs.values())]))
    missing = [q for q in needed if q not in mapping]
    if missing:
        raise t.fail("queues", f"no SQS queue for cronsul queue {missing[0]!r} (every queue in "
                     "[worker] queues and every job's queue needs one)")
    t.check_unknown()
    return QueueSection(backend, SqsSection(region, endpoint, tuple(sorted(mapping.items()))))


def _queue_limits(s: Section, queues: list[str]) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for q, n in s.table("queue_concurrency").items():
        if q not in queues:
            raise s.fail("queue_concurrency", f"{q!r} is not in queues {queues}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise s.fail("queue_concurrency", f"{q} must be a positive integer, got {n!r}")
        out.append((q, n))
    return tuple(out)
