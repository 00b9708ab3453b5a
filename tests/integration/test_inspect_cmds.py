"""`cronsul history`, `logs` and `dlq` against a real redis-server, with records written by the
real code paths (the leader's fenced enqueue, the run state machine, the consumer's dead-letter
step) and the commands run through `worker.cli.main`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from cronsul_testing import RedisServer, free_port, render_config

from scheduler.errors import MessageError
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run, epoch_ms, iso_utc
from worker.cli import main
from worker.inspect_cmds import redact
from worker.keys import Keys
from worker.messages import parse_message
from worker.queue import Delivery, RedisQueue
from worker.runstate import RunRef, RunState, kept_attempt
from worker.sink import RedisSink, run_payload

T0 = datetime(2026, 11, 22, 18, 0, 5, tzinfo=UTC)
KEYS = Keys("cronsul")
JOBS = {
    "tick": {"schedule": "* * * * * *", "command": ["/bin/true"]},
    "other": {"schedule": "* * * * * *", "command": ["/bin/true"], "queue": "batch"},
}
Capture = pytest.CaptureFixture[str]


@pytest.fixture
def config(tmp_path: Path, redis_proc: RedisServer, redis_client: redis.Redis) -> str:
    path = tmp_path / "cronsul.toml"
    path.write_text(render_config({"agent": {"node": "n1"}, "redis": {"url": redis_proc.url}},
                                  JOBS))
    return str(path)


def cli(capsys: Capture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def enqueue(r: redis.Redis, job: str, *seconds: int, queue: str = "default") -> list[str]:
    runs = [Run.for_tick(job, T0 + timedelta(seconds=s)) for s in seconds]
    RedisSink(r, KEYS).apply(TickBatch([(run, queue) for run in runs],
                                       {job: T0 + timedelta(seconds=max(seconds))}), Fence(0, 1))
    return [run.run_id for run in runs]


def fetch(q: RedisQueue, queue: str = "default", count: int = 10) -> list[Delivery]:
    return q.fetch([queue], count, 100)


def begin(r: redis.Redis, d: Delivery, lag_ms: int = 250) -> tuple[RunState, RunRef, str]:
    msg = json.loads(d.payload or b"")
    scheduled_ms = epoch_ms(datetime.fromisoformat(msg["scheduled_at"].replace("Z", "+00:00")))
    state = RunState(r, KEYS, "n1", 3600)
    ref = RunRef(msg["run_id"], msg["job"], scheduled_ms, d.queue, d.payload or b"", d.entry_id)
    token = uuid.uuid4().hex
    assert state.begin(ref, token, 30_000, scheduled_ms + lag_ms).verdict == "start"
    return state, ref, token


def run_to_end(r: redis.Redis, d: Delivery, state: str = "succeeded", exit_code: int = 0,
               output: str = "hello\n", offset_s: int = 1) -> str:
    runs, ref, token = begin(r, d)
    fields = {"exit_code": str(exit_code), "signal": "", "timed_out": "0",
              "duration_ms": "1234.5", "output": output, "output_bytes": str(len(output)),
              "error": ""}
    assert runs.finish(ref, token, state, ref.scheduled_ms + offset_s * 1000, fields)
    return ref.run_id


def dead_letter(r: redis.Redis, payload: bytes, queue: str = "default") -> str:
    """Poison an entry onto the queue and let the consumer's dead-letter step take it."""
    q = RedisQueue(r, KEYS, "n1")
    q.ensure_groups([queue])
    r.xadd(KEYS.stream(queue), {"p": payload})
    (d,) = fetch(q, queue)
    try:
        parse_message(d.payload, {})
        raise AssertionError("expected a refusal")
    except MessageError as exc:
        q.dead_letter(d, str(exc).split(":", 1)[0], str(exc))
    entries: Any = r.xrevrange(KEYS.dead, count=1)
    return str(entries[0][0].decode())


def valid_payload(job: str = "tick", second: int = 0) -> bytes:
    run = Run.for_tick(job, T0 + timedelta(seconds=second))
    return run_payload(run.run_id, job, run.scheduled_at, {}).encode()


# -- history --------------------------------------------------------------------------------------

def test_history_lists_finished_runs_newest_first(config: str, redis_client: redis.Redis,
                                                  capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    ids = enqueue(redis_client, "tick", 0, 1, 2)
    for i, d in enumerate(fetch(q)):
        run_to_end(redis_client, d, "failed" if i == 1 else "succeeded", exit_code=i)
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "--json")
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [r["run_id"] for r in runs] == ids[::-1]
    newest = runs[0]
    assert newest["state"] == "succeeded" and newest["node"] == "n1" and newest["attempt"] == 1
    assert newest["scheduled_at"] == "2026-11-22T18:00:07Z"
    assert newest["finished_at"] == "2026-11-22T18:00:08Z"
    assert (newest["exit_code"], newest["signal"], newest["timed_out"]) == (2, None, False)
    assert (newest["duration_ms"], newest["start_lag_ms"]) == (1234.5, 250)
    assert runs[1]["state"] == "failed" and runs[1]["exit_code"] == 1
    code, out, _ = cli(capsys, "history", "tick", "-c", config)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["RUN", "SCHEDULED", "(UTC)"]
    assert lines[1].split()[:4] == [ids[2], "2026-11-22T18:00:07Z", "succeeded", "n1"]
    assert "1.234s" in lines[1] and "250ms" in lines[1]


def test_history_n_limits_finished_runs(config: str, redis_client: redis.Redis,
                                        capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    ids = enqueue(redis_client, "tick", 0, 1, 2, 3)
    for d in fetch(q):
        run_to_end(redis_client, d)
    code, out, _ = cli(capsys, "history", "tick", "-n", "2", "-c", config, "--json")
    assert code == 0
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [ids[3], ids[2]]


def test_history_shows_queued_and_running_runs_above_finished(
        config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default", "batch"])
    done, running, queued = enqueue(redis_client, "tick", 0, 1, 2)
    enqueue(redis_client, "other", 3, queue="batch")  # another job's queue: not listed
    first, second = fetch(q, count=2)  # the third stays undelivered
    run_to_end(redis_client, first)
    begin(redis_client, second)
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "--json")
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [(r["run_id"], r["state"]) for r in runs] == [
        (queued, "queued"), (running, "running"), (done, "succeeded")]
    assert runs[1]["node"] == "n1" and runs[1]["finished_at"] is None


def test_history_shows_each_runs_parameters_and_filters_by_them(
        config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    """"Show me initech's runs from last night": a fan-out run's id does not say whose it is."""
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    runs = [Run.for_tick("tick", T0 + timedelta(seconds=s), {"tenant": t})
            for s in (0, 1) for t in ("acme", "initech")]
    RedisSink(redis_client, KEYS).apply(TickBatch([(run, "default") for run in runs],
                                                  {"tick": T0 + timedelta(seconds=1)}),
                                        Fence(0, 1))
    for d in fetch(q):
        run_to_end(redis_client, d)
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "--param", "tenant=initech",
                       "--json")
    assert code == 0
    listed = json.loads(out)["runs"]
    assert [(v["params"], v["scheduled_at"]) for v in listed] == [
        ({"tenant": "initech"}, iso_utc(T0 + timedelta(seconds=1))),
        ({"tenant": "initech"}, iso_utc(T0))], listed
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "-n", "2")
    assert "PARAMS" in out.splitlines()[0] and "tenant=" in out
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "--param", "tenant=hooli")
    assert code == 0 and out.strip() == "no runs of tick recorded with tenant=hooli"


def test_history_of_unknown_job_is_a_usage_error(config: str, capsys: Capture) -> None:
    code, out, err = cli(capsys, "history", "nosuchjob", "-c", config)
    assert code == 2 and out == ""
    assert "'nosuchjob'" in err and "jobs: other, tick" in err


def test_history_with_no_runs_says_so(config: str, capsys: Capture) -> None:
    code, out, _ = cli(capsys, "history", "tick", "-c", config)
    assert (code, out) == (0, "no runs of tick recorded\n")
    code, out, _ = cli(capsys, "history", "tick", "-c", config, "--json")
    assert (code, json.loads(out)) == (0, {"job": "tick", "runs": []})


# -- logs -----------------------------------------------------------------------------------------

def test_logs_prints_output_raw_and_metadata_to_stderr(config: str, redis_client: redis.Redis,
                                                       capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    enqueue(redis_client, "tick", 0)
    (d,) = fetch(q)
    output = "line one\nünïcode ✓\nno newline at the end"
    run_id = run_to_end(redis_client, d, "failed", exit_code=3, output=output)
    code, out, err = cli(capsys, "logs", run_id, "-c", config)
    assert code == 0
    assert out == output
    assert run_id in err and "failed" in err and "exit 3" in err and "attempt 1" in err
    code, out, _ = cli(capsys, "logs", run_id, "-c", config, "--json")
    view = json.loads(out)
    assert view["output"] == output and view["exit_code"] == 3 and view["state"] == "failed"
    assert view["output_bytes"] == len(output)


def test_logs_says_when_the_output_kept_is_only_a_tail_and_what_a_run_waits_for(
        config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    redis_client.hset(KEYS.run("tick@5"), mapping={
        "state": "failed", "job": "tick", "output": "ne 18751 of noisy output\n",
        "output_bytes": 991932})
    code, out, err = cli(capsys, "logs", "tick@5", "-c", config)
    assert code == 0 and out == "ne 18751 of noisy output\n"
    assert err.startswith("[cronsul: output was 991932 bytes; the last 25 are kept"), err
    redis_client.hset(KEYS.run("tick@6"), mapping={"state": "queued", "job": "tick",
                                                   "waiting_for": "tick@5"})
    code, _, err = cli(capsys, "logs", "tick@6", "-c", config)
    assert "waiting: for the overlap lock held by tick@5" in err, err


def test_logs_of_unknown_run_is_a_usage_error(config: str, capsys: Capture) -> None:
    code, out, err = cli(capsys, "logs", "tick@123", "-c", config)
    assert code == 2 and out == ""
    assert "no run 'tick@123'" in err


# -- dlq list / show ------------------------------------------------------------------------------

def test_dlq_list_and_show(config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    older = dead_letter(redis_client, b"not json")
    newer = dead_letter(redis_client, valid_payload("gone-job"))
    code, out, _ = cli(capsys, "dlq", "list", "-c", config, "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["total"] == 2
    assert [e["entry_id"] for e in listing["entries"]] == [newer, older]
    entry = listing["entries"][0]
    assert entry["reason"] == "unknown job" and entry["job"] == "gone-job"
    assert entry["queue"] == "default" and entry["node"] == "n1"
    assert listing["entries"][1]["reason"] == "undecodable"
    code, out, _ = cli(capsys, "dlq", "list", "-n", "1", "-c", config)
    assert code == 0 and newer in out and older not in out and "1 of 2 shown" in out
    code, out, _ = cli(capsys, "dlq", "show", older, "-c", config)
    assert code == 0 and "reason: undecodable" in out and out.endswith("payload:\nnot json\n")
    code, out, _ = cli(capsys, "dlq", "show", newer, "-c", config, "--json")
    assert json.loads(out)["payload"] == valid_payload("gone-job").decode()


@pytest.mark.parametrize("entry_id", ["1-1", "not-an-id"])
def test_dlq_show_unknown_entry_is_a_usage_error(config: str, capsys: Capture,
                                                 entry_id: str) -> None:
    code, _, err = cli(capsys, "dlq", "show", entry_id, "-c", config)
    assert code == 2 and repr(entry_id) in err


# -- dlq retry ------------------------------------------------------------------------------------

def test_dlq_retry_reenqueues_on_the_original_queue(config: str, redis_client: redis.Redis,
                                                    capsys: Capture) -> None:
    # A node without job "other" in its config dead-lettered it; this config has it.
    payload = valid_payload("other")
    entry = dead_letter(redis_client, payload, queue="batch")
    code, out, _ = cli(capsys, "dlq", "retry", entry, "-c", config)
    assert code == 0 and f"retried {entry}" in out and "queue batch as stream entry" in out
    assert redis_client.xlen(KEYS.dead) == 0
    (d,) = fetch(RedisQueue(redis_client, KEYS, "n2"), "batch")
    assert d.payload == payload


def test_dlq_retry_refuses_a_payload_for_an_unknown_job(config: str, redis_client: redis.Redis,
                                                        capsys: Capture) -> None:
    entry = dead_letter(redis_client, valid_payload("gone-job"))
    before = redis_client.xlen(KEYS.stream("default"))
    code, out, err = cli(capsys, "dlq", "retry", entry, "-c", config)
    assert code == 1 and out == ""
    assert f"refused to retry dead letter {entry}" in err and "unknown job: 'gone-job'" in err
    assert redis_client.xlen(KEYS.dead) == 1
    assert redis_client.xlen(KEYS.stream("default")) == before


def test_dlq_retry_of_an_oversized_letter_says_it_was_cut_not_undecodable(
        config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    big = valid_payload("tick")[:-1] + b', "pad": "' + b"x" * 70_000 + b'"}'
    entry = dead_letter(redis_client, big)
    code, _, err = cli(capsys, "dlq", "retry", entry, "-c", config)
    assert code == 1 and "oversized: the message was 65536+ bytes" in err, err
    assert redis_client.xlen(KEYS.dead) == 1  # kept


def test_dlq_retry_refuses_a_run_that_already_finished(config: str, redis_client: redis.Redis,
                                                       capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    enqueue(redis_client, "tick", 0)
    (d,) = fetch(q)
    run_id = run_to_end(redis_client, d)
    redis_client.xadd(KEYS.dead, {"reason": "manual", "error": "", "queue": "default",
                                  "entry_id": d.entry_id, "payload": d.payload or b""})
    entries: Any = redis_client.xrange(KEYS.dead)
    code, _, err = cli(capsys, "dlq", "retry", entries[0][0].decode(), "-c", config)
    assert code == 1 and f"run {run_id} already succeeded" in err
    assert redis_client.xlen(KEYS.dead) == 1


def test_dlq_retry_gives_a_dead_run_one_more_attempt(config: str, redis_client: redis.Redis,
                                                     capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    enqueue(redis_client, "tick", 0)
    (d,) = fetch(q)
    run_id = run_to_end(redis_client, d, "dead", exit_code=1)  # retries exhausted -> dead letter
    entries: Any = redis_client.xrange(KEYS.dead)
    code, _, err = cli(capsys, "dlq", "retry", entries[0][0].decode(), "-c", config)
    assert code == 0, err
    assert redis_client.hget(KEYS.run(run_id), "state") == b"queued"
    (again,) = fetch(q)
    runs, ref, token = begin(redis_client, again)
    assert redis_client.hget(KEYS.run(ref.run_id), "attempt") == b"2"
    # The dead attempt is kept: the one more does not replace its output.
    assert runs.finish(ref, token, "succeeded", ref.scheduled_ms + 5000,
                       {"exit_code": "0", "output": "second\n", "output_bytes": "7"})
    code, out, err = cli(capsys, "logs", run_id, "--attempt", "1", "-c", config)
    assert (code, out) == (0, "hello\n")
    assert f"{run_id}: dead (retried by cronsul dlq retry) on n1, attempt 1" in err
    assert "exit 1" in err
    code, out, err = cli(capsys, "logs", run_id, "-c", config)
    assert (code, out) == (0, "second\n") and "[cronsul: attempt 1 kept too" in err


def test_dlq_retry_all_retries_valid_and_reports_refused(config: str, redis_client: redis.Redis,
                                                         capsys: Capture) -> None:
    good = [dead_letter(redis_client, valid_payload("tick", s)) for s in (0, 1)]
    bad = dead_letter(redis_client, b"{}")
    code, out, err = cli(capsys, "dlq", "retry", "--all", "-c", config)
    assert code == 1
    assert all(f"retried {e}" in out for e in good) and "retried 2, refused 1" in out
    assert f"refused {bad}: malformed" in err
    remaining: Any = redis_client.xrange(KEYS.dead)
    assert [e[0].decode() for e in remaining] == [bad]


# -- dlq purge ------------------------------------------------------------------------------------

def test_dlq_purge_one_and_all(config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    entries = [dead_letter(redis_client, b"x%d" % i) for i in range(3)]
    assert cli(capsys, "dlq", "purge", entries[0], "-c", config)[:2] == (
        0, f"purged {entries[0]}\n")
    code, _, err = cli(capsys, "dlq", "purge", entries[0], "-c", config)
    assert code == 2 and repr(entries[0]) in err
    code, _, err = cli(capsys, "dlq", "purge", "--all", "-c", config)
    assert code == 2 and "--yes" in err
    assert redis_client.xlen(KEYS.dead) == 2
    assert cli(capsys, "dlq", "purge", "--all", "--yes", "-c", config)[:2] == (
        0, "purged 2 dead letter(s)\n")
    assert redis_client.xlen(KEYS.dead) == 0


@pytest.mark.parametrize("args", [["retry"], ["purge"], ["retry", "1-1", "--all"]])
def test_dlq_retry_and_purge_need_exactly_one_target(config: str, capsys: Capture,
                                                     args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dlq", *args, "-c", config])
    assert exc.value.code == 2


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["history", "tick"], ["logs", "tick@1"], ["dlq", "list"],
                                  ["dlq", "retry", "--all"], ["dlq", "purge", "--all", "--yes"]])
def test_unreachable_redis_exits_3_without_the_password(tmp_path: Path, capsys: Capture,
                                                        args: list[str]) -> None:
    path = tmp_path / "cronsul.toml"
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    path.write_text(render_config({"agent": {"node": "n1"}, "redis": {"url": url}}, JOBS))
    code, out, err = cli(capsys, *args, "-c", str(path))
    assert code == 3
    assert "s3cret" not in out + err and "redis://***@127.0.0.1" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://:secret@host:6379/0", "redis://***@host:6379/0"),
    ("rediss://user:p@ss@host/1", "rediss://***@host/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock?password=pw&db=0", "unix:///run/redis.sock?password=***&db=0"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_run_wait_says_a_run_timed_out_and_by_which_signal(
        redis_client: redis.Redis, capsys: Capture) -> None:
    from worker.opcmds import _follow

    redis_client.hset(KEYS.run("tick@9"), mapping={
        "state": "failed", "exit_code": "", "signal": "9", "timed_out": "1",
        "duration_ms": "5001", "node": "n1"})
    assert _follow(redis_client, KEYS, "tick@9", 5) == 1
    out = capsys.readouterr().out
    assert "tick@9: failed on n1 exit_code=- timed out signal=9 duration_ms=5001\n" == out, out


def test_logs_of_a_retry_running_shows_none_of_the_failed_attempts_result(
        config: str, redis_client: redis.Redis, capsys: Capture) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    enqueue(redis_client, "tick", 0)
    (d,) = fetch(q)
    runs, ref, token = begin(redis_client, d)
    fields = {"exit_code": "4", "signal": "", "timed_out": "0", "duration_ms": "12.0",
              "output": "first try\n", "output_bytes": "10", "error": ""}
    # As the consumer records a failed attempt that is retried: its result kept as attempt 1.
    assert runs.finish(ref, token, "retrying", ref.scheduled_ms + 1000,
                       {**fields, **kept_attempt(1, {**fields, "state": "retrying",
                                                     "node": "n1"})},
                       retry_at_ms=ref.scheduled_ms + 2000)
    assert runs.begin(ref, "token-2", 30_000, ref.scheduled_ms + 3000).attempt == 2
    code, out, err = cli(capsys, "logs", ref.run_id, "-c", config)
    assert (code, out) == (0, "")  # attempt 2 has recorded nothing yet
    assert "[cronsul: attempt 1 kept too: --attempt N]" in err
    assert f"{ref.run_id}: running on n1, attempt 2" in err and "exit -" in err
    code, out, err = cli(capsys, "logs", ref.run_id, "--attempt", "1", "-c", config)
    assert (code, out) == (0, "first try\n") and "exit 4" in err
