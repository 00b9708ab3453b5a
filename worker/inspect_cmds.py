"""Operator inspection commands: ``cronsul history``, ``cronsul logs`` and ``cronsul dlq``.

They read the keys described in docs/architecture.md ("Consul and Redis keys"). Only
``dlq retry`` and ``dlq purge`` write, each dead letter in one atomic step. The Redis URL is
never printed with its password (see :func:`redact`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from scheduler.durations import format_duration
from scheduler.errors import ConfigError, MessageError, QueueError
from scheduler.runs import JOB_NAME, check_job_name, from_epoch_ms, iso_utc
from worker.cliargs import MAX_LISTED, count
from worker.config import Config
from worker.keys import GROUP, Keys
from worker.messages import parse_message, payload_field, payload_params
from worker.redisconn import connect
from worker.runstate import ATTEMPT_FIELD, ATTEMPT_META, OUTPUT_FIELD
from worker.secretfiles import redact as redact  # re-exported: tests and callers use it

COMMANDS = ("history", "logs", "dlq")
# States of a run that has not finished an attempt yet (see the state machine in
# worker/runstate.py); `history` lists those above the finished ones.
LIVE = ("queued", "running", "retrying")
# `history` looks at this many of the job queue's pending and undelivered entries for runs
# that are queued or running right now: bounded, and one stream read each, never a key scan.
IN_FLIGHT_LOOK = 1000
# Dead letters read per round trip by `dlq retry --all`.
DLQ_BATCH = 100
# A stream entry id as Redis writes it: <ms>-<seq>.
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

# Re-enqueue one dead letter and delete it, in one step and only if it is still there (two
# operators retrying the same entry enqueue it once). A run that finished is refused: a worker
# would ack it without running it. A run that is `dead` (it exhausted its retries) goes back to
# `queued`, so it gets one more attempt, and its last attempt is kept (attempt:<n>, output:<n>).
# KEYS: dead letters, target stream or outbox, record; ARGV: entry id, payload, "stream" or
# "outbox", queue, the kept attempt's field names (JSON list: worker.runstate.ATTEMPT_META).
RETRY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {'gone', ''} end
local st = redis.call('HGET', KEYS[3], 'state')
if st == 'succeeded' or st == 'failed' or st == 'skipped' then return {'done', st} end
if st == 'dead' then
  -- Its last attempt is kept (see worker.runstate.ATTEMPT_FIELD): the one more would replace it.
  local n = tonumber(redis.call('HGET', KEYS[3], 'attempt'))
  if n and n > 0 and redis.call('HEXISTS', KEYS[3], 'attempt:' .. n) == 0 then
    local names = cjson.decode(ARGV[5])
    local values = redis.call('HMGET', KEYS[3], unpack(names))
    local meta = {}
    for i, name in ipairs(names) do meta[name] = values[i] or '' end
    redis.call('HSET', KEYS[3], 'attempt:' .. n, cjson.encode(meta),
               'output:' .. n, redis.call('HGET', KEYS[3], 'output') or '')
  end
  redis.call('HSET', KEYS[3], 'state', 'queued')
  redis.call('HDEL', KEYS[3], 'retry_at_ms')
end
local id = 'outbox'
if ARGV[3] == 'outbox' then
  redis.call('RPUSH', KEYS[2], ARGV[4] .. '|' .. ARGV[2])  -- the SQS backend's outbox
else
  id = redis.call('XADD', KEYS[2], '*', 'p', ARGV[2])
end
redis.call('XDEL', KEYS[1], ARGV[1])
return {'ok', id}
"""

RUN_JSON = """\
run object (--json): {"run_id", "job", "state", "queue", "scheduled_at", "enqueued_at",
  "started_at", "finished_at", "node", "attempt", "exit_code", "signal", "timed_out",
  "duration_ms", "start_lag_ms", "output_bytes", "error", "manual"}. Times are ISO 8601 UTC
  strings; state is queued|running|retrying|succeeded|failed|dead|skipped, or expired (the
  record is gone, only the history entry is left); a value not recorded is null."""
HISTORY_EPILOG = f"""\
Finished runs come from <prefix>:hist:<job> (newest first). Runs queued or running right now
are listed above them, found on the job's queue stream (its pending and undelivered entries, at
most {IN_FLIGHT_LOOK} of each, no key scan). --json prints {{"job", "runs": [run, ...]}}.
{RUN_JSON}"""
LOGS_EPILOG = f"""\
Prints the run's captured output tail to stdout exactly as recorded, its metadata to stderr.
A retried run keeps each attempt's tail: without --attempt the latest is shown (stderr says
which earlier ones are kept), --attempt N shows attempt N's.
--follow (-f) prints a running run's output as it is produced (published once a second for runs
running 1 s or more), waits for a queued run to start, follows it through its retries and ends
with the same status line; exit 0 if the run succeeded, 1 if not, 130 on Ctrl-C.
--json prints one run object with an extra "output" string and "attempts_kept" (the earlier
attempts kept, a list of numbers). {RUN_JSON}"""
DLQ_JSON = """\
dead letter (--json): {"entry_id", "dead_at", "reason", "error", "queue", "source_entry_id",
  "node", "job", "run_id", "payload_bytes"} (job and run_id: null when the payload does not
  say); `dlq show --json` adds "payload" (a string, undecodable bytes replaced).
`dlq list --json` prints {"total", "entries": [dead letter, ...]} newest first."""


def add_parsers(sub: Any, with_config: Callable[[argparse.ArgumentParser],
                                                argparse.ArgumentParser]) -> None:
    """The subcommands, added to cronsul's subparsers by worker/cli.py."""
    fmt = argparse.RawDescriptionHelpFormatter
    hi = with_config(sub.add_parser("history", help="a job's recent runs, newest first",
                                    epilog=HISTORY_EPILOG, formatter_class=fmt))
    hi.add_argument("job")
    hi.add_argument("-n", type=count(MAX_LISTED), default=20,
                    help="finished runs to show (default 20)")
    hi.add_argument("--json", action="store_true")
    hi.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="only runs with this parameter value (repeatable): one tenant's runs")
    lg = with_config(sub.add_parser("logs", help="one run's record and output tail",
                                    epilog=LOGS_EPILOG, formatter_class=fmt))
    lg.add_argument("run_id")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--attempt", type=attempt_number, metavar="N",
                    help="attempt N's output and result (a retried run keeps each attempt's)")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="print the output as the run produces it (waiting for a queued run to "
                         "start, through its retries); exit 0 if it succeeded, 1 if not")
    dq = sub.add_parser("dlq", help="dead letters: list, show, retry, purge",
                        epilog=DLQ_JSON, formatter_class=fmt)
    dsub = dq.add_subparsers(dest="dlq_command", required=True)
    ls = with_config(dsub.add_parser("list", help="newest dead letters first",
                                     epilog=DLQ_JSON, formatter_class=fmt))
    ls.add_argument("-n", type=count(MAX_LISTED), default=50, help="entries to show (default 50)")
    ls.add_argument("--json", action="store_true")
    sh = with_config(dsub.add_parser("show", help="one dead letter with its payload",
                                     epilog=DLQ_JSON, formatter_class=fmt))
    sh.add_argument("entry_id")
    sh.add_argument("--json", action="store_true")
    rt = with_config(dsub.add_parser(
        "retry", help="re-enqueue onto its original queue, then delete the dead letter; "
                      "refused unless the payload is a valid run of a job in this config"))
    pu = with_config(dsub.add_parser("purge", help="delete dead letters (--all needs --yes)"))
    for sp in (rt, pu):
        which = sp.add_mutually_exclusive_group(required=True)
        which.add_argument("entry_id", nargs="?")
        which.add_argument("--all", action="store_true", help="every dead letter")
    pu.add_argument("--yes", action="store_true", help="confirm purge --all")


def dispatch(cfg: Config, args: argparse.Namespace) -> int:
    if args.command == "history":
        return history(cfg, args.job, args.n, args.json, _param_filter(args.param))
    if args.command == "logs":
        if args.follow:
            if args.json or args.attempt is not None:
                raise ConfigError("logs --follow: not with "
                                  + ("--json" if args.json else "--attempt")
                                  + " (it follows the run's latest attempt as text)")
            from worker.follow import follow

            return follow(cfg, args.run_id)
        return logs(cfg, args.run_id, args.json, args.attempt)
    if args.dlq_command == "list":
        return dlq_list(cfg, args.n, args.json)
    if args.dlq_command == "show":
        return dlq_show(cfg, args.entry_id, args.json)
    if args.dlq_command == "retry":
        return dlq_retry(cfg, None if args.all else args.entry_id)
    return dlq_purge(cfg, None if args.all else args.entry_id, args.yes)


def attempt_number(text: str) -> int:
    """An argparse type for --attempt: a whole number from 1 (exit 2 naming it otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: attempts are numbered from 1")
    return value


attempt_number.__name__ = "attempt"


@contextmanager
def _connect(cfg: Config) -> Iterator[redis.Redis]:
    with connect(cfg.redis, cfg.path) as client:
        yield client


# -- history and logs ---------------------------------------------------------------------------

def _param_filter(pairs: list[str]) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE")
        wanted[key] = value
    return wanted


def history(cfg: Config, job: str, n: int, as_json: bool,
            params: dict[str, str] | None = None) -> int:
    check_job_name(job)
    keys = Keys(cfg.redis.key_prefix)

    def wanted(view: dict[str, Any]) -> bool:
        return all(view["params"].get(k) == v for k, v in (params or {}).items())

    with _connect(cfg) as r:
        if job not in cfg.jobs and not r.exists(keys.history(job)):
            raise ConfigError(f"{cfg.path}: no job named {job!r} and no history for it "
                              f"(jobs: {', '.join(sorted(cfg.jobs)) or 'none'})")
        # Filtered: the whole index (at most HISTORY_PER_JOB), then the newest n that match.
        finished: Any = r.zrevrange(keys.history(job), 0, -1 if params else n - 1,
                                    withscores=True)
        ids = [_s(rid) for rid, _ in finished]
        views = [v for v in (_run_view(rec, rid, int(score))
                             for rec, rid, (_, score) in zip(_records(r, keys, ids), ids,
                                                             finished, strict=True))
                 if wanted(v)][:n]
        if job in cfg.jobs:
            views = [v for v in _in_flight(r, keys, job, cfg.jobs[job].queue, set(ids))
                     if wanted(v)][:n] + views
    if as_json:
        print(json.dumps({"job": job, "runs": views}, indent=2))
        return 0
    if not views:
        print(f"no runs of {job} recorded" + (" with " + " ".join(
            f"{k}={v}" for k, v in params.items()) if params else ""))
        return 0
    with_params = any(v["params"] for v in views)
    rows = [[v["run_id"], v["scheduled_at"] or "-", v["state"], v["node"] or "-",
             str(v["attempt"]), _exit(v), _ms(v["duration_ms"]), _ms(v["start_lag_ms"]),
             *([_params_text(v["params"])] if with_params else [])]
            for v in views]
    _table(["RUN", "SCHEDULED (UTC)", "STATE", "NODE", "ATTEMPT", "EXIT", "DURATION", "LAG",
            *(["PARAMS"] if with_params else [])], rows)
    return 0


def _params_text(params: dict[str, str], width: int = 60) -> str:
    text = " ".join(f"{k}={v}" for k, v in params.items()) or "-"
    return text if len(text) <= width else text[:width - 3] + "..."


def _in_flight(r: redis.Redis, keys: Keys, job: str, queue: str,
               finished: set[str]) -> list[dict[str, Any]]:
    """Runs of ``job`` still on its queue stream: delivered and unacked, or not yet delivered."""
    stream = keys.stream(queue)
    try:
        groups: Any = r.xinfo_groups(stream)
    except redis.ResponseError:
        return []  # no such stream: nothing was ever enqueued on this queue
    group = next((g for g in groups if _s(g["name"]) == GROUP), None)
    entries: list[Any] = []
    if group is not None:
        pending: Any = r.xpending_range(stream, GROUP, "-", "+", IN_FLIGHT_LOOK)
        pipe = r.pipeline(transaction=False)
        for item in pending:
            pipe.xrange(stream, item["message_id"], item["message_id"])
        entries = [e for found in pipe.execute() for e in found]
    after = f"({_s(group['last-delivered-id'])}" if group is not None else "-"
    undelivered: Any = r.xrange(stream, after, "+", count=IN_FLIGHT_LOOK)
    entries += undelivered
    ids: list[str] = []
    for _, fields in entries:
        run_id, of = (payload_field(fields.get(b"p"), k) for k in ("run_id", "job"))
        if run_id and of == job and run_id not in finished and run_id not in ids:
            ids.append(run_id)
    views = [_run_view(rec, rid, None) for rec, rid in zip(_records(r, keys, ids), ids,
                                                            strict=True)]
    live = [v for v in views if v["state"] in LIVE]
    return sorted(live, key=lambda v: v["scheduled_at"] or "", reverse=True)


def logs(cfg: Config, run_id: str, as_json: bool, attempt: int | None = None) -> int:
    keys = Keys(cfg.redis.key_prefix)
    with _connect(cfg) as r:
        raw: Any = r.hgetall(keys.run(run_id))
    if not raw:
        raise ConfigError(no_run(cfg, run_id))
    if as_json:
        kept = kept_attempts(raw)
        raw = attempt_record(raw, run_id, attempt, latest_attempt(raw), kept)
        view = _run_view(raw, run_id, None)
        print(json.dumps({**view, "output": raw.get(b"output", b"").decode("utf-8", "replace"),
                          "attempts_kept": kept}, indent=2))
        return 0
    show_run(run_id, raw, attempt)
    return 0


def show_run(run_id: str, raw: dict[bytes, bytes], attempt: int | None = None
             ) -> dict[str, Any]:
    """What `logs` prints of a record: which earlier attempts it keeps (stderr), the output
    tail of the latest attempt or of ``attempt`` (stdout), the status line (stderr). The view
    of what was shown."""
    kept, latest = kept_attempts(raw), latest_attempt(raw)
    raw = attempt_record(raw, run_id, attempt, latest, kept)
    view = _run_view(raw, run_id, None)
    earlier = [n for n in kept if n < latest and n != attempt]
    if earlier:
        print(f"[cronsul: attempt{'s' if len(earlier) > 1 else ''} {_spans(earlier)} kept too: "
              "--attempt N]", file=sys.stderr, flush=True)
    print_output(raw.get(b"output", b""), view["output_bytes"] or 0)
    print(status_line(run_id, view, attempt is not None and attempt < latest), file=sys.stderr,
          flush=True)
    return view


def latest_attempt(raw: dict[bytes, bytes]) -> int:
    """The record's latest attempt (0: none started)."""
    return _int(raw.get(b"attempt", b"").decode(errors="replace")) or 0


def no_run(cfg: Config, run_id: str) -> str:
    return (f"no run {run_id!r} in Redis at {cfg.redis.where} "
            f"(run records are kept {format_duration(cfg.record_ttl)})")


def print_output(output: bytes, total: int) -> None:
    """A recorded tail on stdout as it is (bytes), after a note on stderr when it is cut."""
    if total > len(output):  # the tail starts mid-way: say so before it
        print(f"[cronsul: output was {total} bytes; the last {len(output)} are kept "
              f"(output_limit)]", file=sys.stderr, flush=True)
    write_raw(output)


def write_raw(data: bytes) -> None:
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def status_line(run_id: str, view: dict[str, Any], earlier: bool = False) -> str:
    """The line `logs` ends with (stderr): state, node, attempt, timings, error."""
    state = view["state"]
    if earlier:  # an attempt another followed: say so, not what the run was then
        state = {"retrying": "failed (retried)", "dead": "dead (retried by cronsul dlq retry)"
                 }.get(state, state)
    return (f"{run_id}: {state} on {view['node'] or '-'}, attempt {view['attempt']}, "
            f"scheduled {view['scheduled_at'] or '-'}, exit {_exit(view)}, "
            f"duration {_ms(view['duration_ms'])}, lag {_ms(view['start_lag_ms'])}, "
            f"output {view['output_bytes'] if view['output_bytes'] is not None else 0} bytes"
            + (f", error: {view['error']}" if view["error"] else "")
            + (f", waiting: {view['waiting']}" if view["waiting"] else ""))


def kept_attempts(raw: dict[bytes, bytes]) -> list[int]:
    """The attempts a record keeps besides its latest (worker.runstate.ATTEMPT_FIELD)."""
    prefix = ATTEMPT_FIELD.encode()
    return sorted(n for n in (_int(k[len(prefix):].decode(errors="replace"))
                              for k in raw if k.startswith(prefix)) if n is not None)


def attempt_record(raw: dict[bytes, bytes], run_id: str, attempt: int | None, latest: int,
                   kept: list[int]) -> dict[bytes, bytes]:
    """The record as attempt ``attempt`` (None: the latest) left it (ConfigError, exit 2, when
    there is none): the latest attempt's is the record itself, less the result fields while
    it runs (they are the previous attempt's until it ends); an earlier one's is kept in it."""
    if attempt is None or (attempt == latest and latest > 0):
        if raw.get(b"state") != b"running":
            return raw
        return {k: v for k, v in raw.items() if k not in RESULT_FIELDS}
    if attempt not in kept:
        known = sorted({*kept, *([latest] if latest else [])})
        if not known:
            raise ConfigError(f"--attempt {attempt}: run {run_id} has not started an attempt "
                              "yet")
        if attempt > latest:
            raise ConfigError(f"--attempt {attempt}: run {run_id} has had {latest} "
                              f"attempt{'s' if latest > 1 else ''} (--attempt 1 to {latest})")
        raise ConfigError(f"--attempt {attempt}: attempt {attempt} of run {run_id} left no "
                          "record (it ended without finishing: its node stopped renewing its "
                          "lease; or it ran before cronsul kept earlier attempts); kept: "
                          f"{_spans(known)}")
    try:
        meta = json.loads(raw[f"{ATTEMPT_FIELD}{attempt}".encode()])
    except ValueError:
        meta = {}
    fields = {**raw, **{k.encode(): str(v).encode() for k, v in
                        (meta.items() if isinstance(meta, dict) else ())}}
    fields[b"attempt"] = str(attempt).encode()
    fields[b"output"] = raw.get(f"{OUTPUT_FIELD}{attempt}".encode(), b"")
    for name in (b"retry_at_ms", b"waiting_for", b"handed_back"):  # the run's, not this one's
        fields.pop(name, None)
    return fields


# What `finish` writes of an attempt's result: while the next attempt runs, the record's are
# still the previous attempt's (kept as attempt:<n> too), so `logs` of the running one omits them.
RESULT_FIELDS = (b"output", b"output_bytes", b"exit_code", b"signal", b"timed_out",
                 b"duration_ms", b"error", b"finished_ms")


def _spans(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


# What a listing shows of a record (_run_view): never the output fields, which may hold
# output_limit bytes per attempt (a listing of 20 retried runs pulled over 100 MB).
VIEW_FIELDS = ("job", "state", "queue", "scheduled_ms", "enqueued_ms", "started_ms",
               "finished_ms", "node", "attempt", "exit_code", "signal", "timed_out",
               "duration_ms", "output_bytes", "error", "manual", "waiting_for", "handed_back",
               "not_before_ms", "payload")


def _records(r: redis.Redis, keys: Keys, ids: list[str]) -> list[dict[bytes, bytes]]:
    """The listed fields of each run's record ({} for one that expired)."""
    pipe = r.pipeline(transaction=False)
    for run_id in ids:
        pipe.hmget(keys.run(run_id), VIEW_FIELDS)
    rows: Any = pipe.execute() if ids else []
    return [{k.encode(): v for k, v in zip(VIEW_FIELDS, row, strict=True) if v is not None}
            for row in rows]


def _run_view(raw: dict[bytes, bytes], run_id: str, finished_ms: int | None) -> dict[str, Any]:
    rec = {_s(k): v.decode("utf-8", errors="replace") for k, v in raw.items()
           if k != b"output" and not k.startswith(OUTPUT_FIELD.encode())}
    sched, started = _int(rec.get("scheduled_ms")), _int(rec.get("started_ms"))
    duration = rec.get("duration_ms")
    return {
        "run_id": run_id, "job": rec.get("job") or run_id.split("@", 1)[0],
        "state": rec.get("state") or "expired", "queue": rec.get("queue") or None,
        "scheduled_at": _iso(sched), "enqueued_at": _iso(_int(rec.get("enqueued_ms"))),
        "started_at": _iso(started),
        "finished_at": _iso(_int(rec.get("finished_ms")) or finished_ms),
        "node": rec.get("node") or None, "attempt": _int(rec.get("attempt")) or 0,
        "exit_code": _int(rec.get("exit_code")), "signal": _int(rec.get("signal")),
        "timed_out": rec.get("timed_out") == "1",
        "duration_ms": float(duration) if duration else None,
        "start_lag_ms": started - sched if started is not None and sched is not None else None,
        "output_bytes": _int(rec.get("output_bytes")), "error": rec.get("error") or None,
        "manual": rec.get("manual") == "1",
        # Why it still waits, while it does: a node whose config could not run it handed it
        # back for the others (a config change rolling out).
        "waiting": _waiting(rec),
        "params": payload_params(rec.get("payload")),
    }


def _waiting(rec: dict[str, str]) -> str | None:
    """Why a run not started yet waits, if it says: for the overlap lock another run holds, or
    for a node that can run it (handed back during a config roll)."""
    if rec.get("state") not in ("queued", "retrying"):
        return None
    if rec.get("waiting_for"):
        return f"for the overlap lock held by {rec['waiting_for']}"
    if rec.get("handed_back"):
        return rec["handed_back"]
    start = _int(rec.get("not_before_ms"))
    return f"not before {_iso(start)} (its jitter)" if start and rec.get("attempt") is None \
        else None


# -- dead letters -------------------------------------------------------------------------------

def dlq_list(cfg: Config, n: int, as_json: bool) -> int:
    keys = Keys(cfg.redis.key_prefix)
    with _connect(cfg) as r:
        total: Any = r.xlen(keys.dead)
        entries: Any = r.xrevrange(keys.dead, "+", "-", count=n)
    views = [_dead_view(eid, fields) for eid, fields in entries]
    if as_json:
        print(json.dumps({"total": total, "entries": views}, indent=2))
        return 0
    if not views:
        print("no dead letters")
        return 0
    _table(["ENTRY", "DEAD AT (UTC)", "QUEUE", "JOB", "REASON", "ERROR"],
           [[v["entry_id"], v["dead_at"], v["queue"] or "-", v["job"] or "-", v["reason"],
             _short(v["error"])] for v in views])
    if total > len(views):
        print(f"({len(views)} of {total} shown; -n for more)")
    return 0


def dlq_show(cfg: Config, entry_id: str, as_json: bool) -> int:
    keys = Keys(cfg.redis.key_prefix)
    with _connect(cfg) as r:
        fields = _dead_letter(r, keys, entry_id)
    view = _dead_view(entry_id, fields)
    payload = fields.get(b"payload", b"")
    if as_json:
        print(json.dumps({**view, "payload": payload.decode("utf-8", errors="replace")},
                         indent=2))
        return 0
    for key, value in view.items():
        print(f"{key}: {'-' if value is None else value}")
    print("payload:")
    print(payload.decode("utf-8", errors="replace"))
    return 0


def dlq_retry(cfg: Config, entry_id: str | None) -> int:
    keys = Keys(cfg.redis.key_prefix)
    with _connect(cfg) as r:
        script = r.register_script(RETRY)
        if entry_id is not None:
            fields = _dead_letter(r, keys, entry_id)
            try:
                line = _retry_one(r, keys, cfg, script, entry_id, fields)
            except MessageError as exc:
                raise QueueError(f"refused to retry dead letter {entry_id}: {exc}") from exc
            if line is None:
                raise QueueError(f"dead letter {entry_id} vanished (retried or purged meanwhile)")
            print(line)
            return 0
        retried = refused = 0
        start = "-"
        while True:
            batch: Any = r.xrange(keys.dead, start, "+",
                                        count=DLQ_BATCH)
            for eid, fields in batch:
                try:
                    line = _retry_one(r, keys, cfg, script, _s(eid), fields)
                except MessageError as exc:
                    refused += 1
                    print(f"refused {_s(eid)}: {exc}", file=sys.stderr)
                    continue
                if line is not None:
                    retried += 1
                    print(line)
            if len(batch) < DLQ_BATCH:
                break
            start = f"({_s(batch[-1][0])}"
    print(f"retried {retried}, refused {refused}")
    return 1 if refused else 0


def _retry_one(r: redis.Redis, keys: Keys, cfg: Config, script: Any, entry_id: str,
               fields: dict[bytes, bytes]) -> str | None:
    """Re-enqueue one dead letter; MessageError says why not; None if it vanished meanwhile."""
    stored = fields.get(b"payload") or b""
    if _s(fields.get(b"reason", b"")) == "oversized":  # kept cut to 64 KiB: not the message
        raise MessageError(f"oversized: the message was {len(stored)}+ bytes; its dead letter "
                           "keeps only the first 64 KiB, which is no message to run")
    msg = parse_message(stored, cfg.jobs)
    queue = _s(fields.get(b"queue", b""))
    if not JOB_NAME.match(queue):
        raise MessageError(f"malformed: original queue {queue!r} is not a valid queue name")
    sqs = cfg.queue.backend == "sqs"
    target = keys.outbox if sqs else keys.stream(queue)
    try:
        verdict, detail = script(keys=[keys.dead, target, keys.run(msg.run_id)],
                                 args=[entry_id, fields[b"payload"], "outbox" if sqs else "stream",
                                       queue, json.dumps(ATTEMPT_META)])
    except redis.ResponseError as exc:  # its record is broken (an 'unrecordable' letter)
        if not str(exc).startswith("WRONGTYPE"):
            raise
        raise MessageError(f"run record {keys.run(msg.run_id)} is not a run record ({exc}); "
                           "delete or repair that key, then retry") from exc
    if _s(verdict) == "gone":
        return None
    if _s(verdict) == "done":
        raise MessageError(f"run {msg.run_id} already {_s(detail)} "
                           "(a worker would ack it without running it)")
    where = ("in the outbox, sent to SQS by the next drain" if sqs
             else f"as stream entry {_s(detail)}")
    return f"retried {entry_id}: run {msg.run_id} enqueued on queue {queue} {where}"


def dlq_purge(cfg: Config, entry_id: str | None, yes: bool) -> int:
    keys = Keys(cfg.redis.key_prefix)
    if entry_id is None and not yes:
        raise ConfigError("dlq purge --all deletes every dead letter: add --yes to confirm")
    if entry_id is not None:
        _check_entry_id(entry_id)
    with _connect(cfg) as r:
        if entry_id is not None:
            if not r.xdel(keys.dead, entry_id):
                raise ConfigError(f"no dead letter {entry_id!r} in {keys.dead}")
            print(f"purged {entry_id}")
            return 0
        pipe = r.pipeline(transaction=True)
        pipe.xlen(keys.dead)
        pipe.delete(keys.dead)
        count, _ = pipe.execute()
    print(f"purged {count} dead letter(s)")
    return 0


def _check_entry_id(entry_id: str) -> None:
    if not ENTRY_ID.match(entry_id):
        raise ConfigError(f"{entry_id!r} is not a stream entry id (<ms>-<seq>, "
                          "as `cronsul dlq list` prints them)")


def _dead_letter(r: redis.Redis, keys: Keys, entry_id: str) -> dict[bytes, bytes]:
    _check_entry_id(entry_id)
    found: Any = r.xrange(keys.dead, entry_id, entry_id)
    if not found:
        raise ConfigError(f"no dead letter {entry_id!r} in {keys.dead}")
    fields: dict[bytes, bytes] = found[0][1]
    return fields


def _dead_view(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    eid = _s(entry_id)
    payload = fields.get(b"payload", b"")
    text = {_s(k): v.decode("utf-8", errors="replace") for k, v in fields.items()
            if k != b"payload"}
    return {
        "entry_id": eid, "dead_at": iso_utc(from_epoch_ms(int(eid.split("-")[0]))),
        "reason": text.get("reason", ""), "error": text.get("error", ""),
        "queue": text.get("queue") or None, "source_entry_id": text.get("entry_id") or None,
        "node": text.get("node") or None, "job": payload_field(payload, "job"),
        "run_id": payload_field(payload, "run_id"), "payload_bytes": len(payload),
    }


# -- small helpers ------------------------------------------------------------------------------

def _s(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _iso(ms: int | None) -> str | None:
    return iso_utc(from_epoch_ms(ms)) if ms is not None else None


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.3f}s" if value >= 1000 else f"{value:.0f}ms"


def _exit(view: dict[str, Any]) -> str:
    text = "-" if view["exit_code"] is None else str(view["exit_code"])
    if view["signal"] is not None:
        text = f"signal {view['signal']}"
    return f"{text} (timeout)" if view["timed_out"] else text


def _short(text: str, width: int = 60) -> str:
    line = text.replace("\n", " ")
    return line if len(line) <= width else line[: width - 3] + "..."


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
