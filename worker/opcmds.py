"""Operator commands that change cluster state: pause, resume, and enqueuing manual runs."""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from datetime import UTC, datetime

import redis

from scheduler.errors import ConfigError, ConnectionFailure, CronsulError
from scheduler.runs import Run, epoch_ms, iso_utc
from worker.config import Config
from worker.consulapi import CALL_TIMEOUT_S, CONSUL_ERRORS, make_clients
from worker.keys import Keys
from worker.params import check_value, placeholders
from worker.redisconn import connect
from worker.runstate import TERMINAL, RunState
from worker.sink import run_payload

# `cronsul run --wait` polls the run record this often.
WAIT_POLL_S = 0.2

# Create the record (state queued) and enqueue in one step, so `history` and `--wait` see the
# run before any worker does.
ENQUEUE_MANUAL = """
if redis.call('HSETNX', KEYS[1], 'state', 'queued') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'scheduled_ms', ARGV[2], 'run_id', ARGV[3],
           'queue', ARGV[4], 'enqueued_ms', ARGV[2], 'payload', ARGV[5], 'manual', '1')
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[7] == 'outbox' then
  redis.call('RPUSH', KEYS[2], ARGV[4] .. '|' .. ARGV[5])  -- the SQS backend's outbox
else
  redis.call('XADD', KEYS[2], '*', 'p', ARGV[5])
end
return 1
"""


def _job(cfg: Config, job: str) -> None:
    if job not in cfg.jobs:
        raise ConfigError(f"{cfg.path}: no job named {job!r} "
                          f"(jobs: {', '.join(sorted(cfg.jobs)) or 'none'})")


def pause(cfg: Config, job: str, reason: str) -> int:
    _job(cfg, job)
    key = f"{cfg.consul.prefix}/paused/{job}"
    if not reason:  # pausing again without a reason keeps the one given (a ticket number...)
        try:
            _, entry = make_clients(cfg.consul, CALL_TIMEOUT_S).call.kv.get(key)
        except CONSUL_ERRORS as exc:
            raise ConnectionFailure(f"cannot reach Consul: {exc}") from exc
        if entry is not None:
            try:
                earlier = json.loads(entry.get("Value") or b"{}")
            except ValueError:
                earlier = {}
            if isinstance(earlier, dict) and earlier.get("reason"):
                print(f"{job} is already paused: {earlier['reason']} "
                      f"(by {earlier.get('by', '?')} at {earlier.get('at', '?')})")
                return 0
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    value = json.dumps({"reason": reason, "by": who, "at": iso_utc(datetime.now(UTC))})
    _consul_put(cfg, key, value)
    print(f"paused {job}: {reason or '(no reason given)'}")
    return 0


def resume(cfg: Config, job: str) -> int:
    _job(cfg, job)
    c = make_clients(cfg.consul, CALL_TIMEOUT_S).call
    key = f"{cfg.consul.prefix}/paused/{job}"
    try:
        _, entry = c.kv.get(key)
        c.kv.delete(key)
    except CONSUL_ERRORS as exc:
        raise ConnectionFailure(f"cannot reach Consul: {exc}") from exc
    print(f"resumed {job}" if entry is not None else f"{job} was not paused (nothing to do)")
    return 0


def stop(cfg: Config, run_id: str, reason: str) -> int:
    """`cronsul stop RUN_ID`: ask the node running it to stop it, as a timeout does (TERM to
    its process group, KILL after kill_grace; a callable's worker is killed). It is recorded
    failed with who stopped it and why, and not retried."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    why = f"{who}: {reason}" if reason else who
    ttl_ms = int(cfg.worker.visibility_timeout.total_seconds() * 2000)  # seen by a renewal
    with connect(cfg.redis, cfg.path) as r:
        state = RunState(r, Keys(cfg.redis.key_prefix), "cli", 0).request_stop(run_id, why,
                                                                              ttl_ms)
    if state is None:
        raise ConfigError(f"no run {run_id!r} in Redis at {cfg.redis.where}")
    if state != "running":
        print(f"{run_id} is {state}, not running: nothing to stop")
        return 1
    renew_s = cfg.worker.visibility_timeout.total_seconds() / 3
    print(f"asked the node running {run_id} to stop it: it sees this within about "
          f"{renew_s:.0f}s (TERM, then KILL after kill_grace); `cronsul logs {run_id}` shows "
          "the result")
    return 0


def _consul_put(cfg: Config, key: str, value: str) -> None:
    c = make_clients(cfg.consul, CALL_TIMEOUT_S).call
    try:
        c.kv.put(key, value)
    except CONSUL_ERRORS as exc:
        raise ConnectionFailure(f"cannot reach Consul: {exc}") from exc


def parse_params(cfg: Config, job: str, pairs: list[str]) -> dict[str, str]:
    spec = cfg.jobs[job]
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE")
        if key not in spec.param_names:
            declared = ", ".join(sorted(spec.param_names)) or "none"
            raise ConfigError(f"--param {key}: job {job!r} has no such parameter "
                              f"(declared: {declared})")
        if key in values:
            raise ConfigError(f"--param {key} is given twice ({values[key]!r} and {value!r})")
        check_value(key, value, f"--param {key}")
        values[key] = value
    if spec.params:
        values = _declared_set(spec.params, values, job)
    missing = sorted(placeholders(spec.command, job) - set(values))
    if missing:
        raise ConfigError(f"job {job!r} needs --param {missing[0]}=VALUE")
    return values


def _declared_set(sets: tuple[dict[str, str], ...], given: dict[str, str],
                  job: str) -> dict[str, str]:
    """A manual run of a job with parameter sets: the one declared set the given values pick
    (completed from it: --param tenant=acme brings acme's region too), or values for every
    parameter the sets declare (an ad-hoc set). Otherwise ConfigError: a run with no or half
    its parameters may mean "everything" to the script (a sync with an empty tenant)."""
    matching = [s for s in sets if all(s.get(k) == v for k, v in given.items())]
    listing = "; ".join(" ".join(f"{k}={v}" for k, v in s.items()) for s in sets[:10]) + (
        f"; ... ({len(sets)} sets)" if len(sets) > 10 else "")
    if len(matching) == 1:
        return dict(matching[0])
    names = sorted({k for s in sets for k in s})
    if not given:
        raise ConfigError(f"job {job!r} runs once per parameter set: name one with --param "
                          f"(declared: {listing})")
    if len(matching) > 1:
        raise ConfigError(f"--param {' '.join(f'{k}={v}' for k, v in given.items())} matches "
                          f"{len(matching)} declared sets of job {job!r}: add --param to pick "
                          f"one (declared: {listing})")
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"job {job!r}: no declared parameter set has "
                          f"{' '.join(f'{k}={v}' for k, v in given.items())}; give every "
                          f"parameter for a set of your own (missing --param {missing[0]}=...) "
                          f"or pick a declared one ({listing})")
    return given


def enqueue(cfg: Config, job: str, pairs: list[str], wait: bool,
            timeout_s: float | None = None) -> int:
    _job(cfg, job)
    params = parse_params(cfg, job, pairs)
    spec = cfg.jobs[job]
    with connect(cfg.redis, cfg.path) as r:
        run_id = enqueue_manual(cfg, r, job, params)
        print(run_id, flush=True)
        if not wait:
            return 0
        keys = Keys(cfg.redis.key_prefix)
        return _follow(r, keys, run_id, timeout_s or spec.timeout.total_seconds() * 3 + 60)


def enqueue_manual(cfg: Config, r: redis.Redis, job: str, params: dict[str, str]) -> str:
    """Create a manual run's record (queued) and enqueue it in one step; its run id. On the
    SQS backend it goes to the outbox, which every node's drainer sends to SQS (the Redis
    stream is not read there). `cronsul run` and the dashboard's Run now both come here."""
    spec = cfg.jobs[job]
    now = datetime.now(UTC)
    run = Run(f"{job}@manual-{uuid.uuid4().hex}", job, now, params)
    keys = Keys(cfg.redis.key_prefix)
    sqs = cfg.queue.backend == "sqs"
    r.eval(ENQUEUE_MANUAL, 2, keys.run(run.run_id),
           keys.outbox if sqs else keys.stream(spec.queue), job,
           epoch_ms(now), run.run_id, spec.queue,
           run_payload(run.run_id, job, now, params), int(cfg.record_ttl.total_seconds()),
           "outbox" if sqs else "stream")
    return run.run_id


def _follow(r: redis.Redis, keys: Keys, run_id: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    last = note = ""
    while time.monotonic() < deadline:
        raw: dict[bytes, bytes] = r.hgetall(keys.run(run_id))  # type: ignore[assignment]
        record = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        state = record.get("state", "")
        if state != last and state not in TERMINAL:  # the end has its own line, below
            print(f"{run_id}: {state}" + (f" on {record['node']}" if record.get("node") else ""),
                  flush=True)
        last = state
        if record.get("handed_back", note) != note and state not in TERMINAL:
            note = record["handed_back"]
            print(f"{run_id}: waiting: {note}", flush=True)
        if state in TERMINAL:
            if record.get("output"):
                print(record["output"], end="" if record["output"].endswith("\n") else "\n")
            how = (" timed out" if record.get("timed_out") in ("1", "True") else "") + (
                f" signal={record['signal']}" if record.get("signal") else "")
            print(f"{run_id}: {state}" + (f" on {record['node']}" if record.get("node") else "")
                  + f" exit_code={record.get('exit_code') or '-'}{how} "
                  f"duration_ms={record.get('duration_ms', '-')}")
            if record.get("error"):
                print(f"{run_id}: error: {record['error']}")
            return 0 if state == "succeeded" else 1
        time.sleep(WAIT_POLL_S)
    raise CronsulError(f"{run_id}: still {last or 'unknown'} after {timeout_s:.0f}s")
