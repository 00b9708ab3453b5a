"""Execution guarantees with two real agents: a run whose node is killed is re-delivered once
and leaves no orphan; overlap = skip admits one of two racing runs; a poison message is
dead-lettered while the worker keeps serving; retries count attempts up to a dead letter; a
SIGSTOPped runner's job is killed before another node takes the run over, so the two attempts
never overlap."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from worker.config import load_config
from worker.keys import Keys
from worker.opcmds import enqueue

KEYS = Keys("cronsul")
NEVER = "@yearly"  # these jobs only run when the test enqueues them


def beat_job(log: Path, seconds: float, **extra: object) -> dict[str, object]:
    """A job that logs start, a heartbeat every 0.1 s with a timestamp, and end."""
    script = (f'echo "start $CRONSUL_RUN_ID $CRONSUL_ATTEMPT $CRONSUL_NODE $$" >> {log}; '
              f"i=0; while [ $i -lt {int(seconds * 10)} ]; do "
              f'echo "beat $CRONSUL_RUN_ID $CRONSUL_ATTEMPT $(date +%s%N)" >> {log}; '
              "sleep 0.1; i=$((i+1)); done; "
              f'echo "end $CRONSUL_RUN_ID $CRONSUL_ATTEMPT $CRONSUL_NODE" >> {log}')
    return {"schedule": NEVER, "command": ["/bin/sh", "-c", script], "timeout": "60s", **extra}


def lines(path: Path, kind: str) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines() if ln.startswith(kind + " ")]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between open and read
        return False


def record(r: redis.Redis, run_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.run(run_id)).items()}


@pytest.mark.slow
def test_execution_guarantees(tmp_path: Path, devconsul: DevConsul,
                              redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    long_log, skip_log, flaky_log, frozen_log, after = (
        tmp_path / f"{n}.log" for n in ("long", "skip", "flaky", "frozen", "after"))
    for f in (long_log, skip_log, flaky_log, frozen_log, after):
        f.touch()
    jobs = {
        "long": beat_job(long_log, 3),
        "exclusive": beat_job(skip_log, 2, overlap="skip"),
        "frozen": beat_job(frozen_log, 8),
        "flaky": {"schedule": NEVER, "retries": 2, "retry_backoff": "1s", "timeout": "10s",
                  "command": ["/bin/sh", "-c", f'echo "$CRONSUL_ATTEMPT" >> {flaky_log}; exit 3']},
        "py-add": {"schedule": NEVER, "timeout": "10s", "callable": "pyjobs_fixture:add",
                   "params": [{"a": "2", "b": "40"}]},
        "py-crash": {"schedule": NEVER, "timeout": "10s", "callable": "pyjobs_fixture:segfault"},
        "py-odd": {"schedule": NEVER, "timeout": "10s", "callable": "pyjobs_fixture:odd_name"},
        "after": {"schedule": NEVER, "timeout": "10s",
                  "command": ["/bin/sh", "-c", f"echo ok >> {after}"]},
    }
    # One warm Python process per node for 4 run slots: callables wait for it in the agent.
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs,
                      worker_extra={"visibility_timeout": "4s", "python_workers": 1})
    cfg = load_config(cluster.agents["n1"].config)
    cluster.start()
    try:
        both_up(cluster)

        # 1. kill -9 the node running a run: no orphan, re-delivered once, finished once.
        enqueue(cfg, "long", [], wait=False)
        wait_until(lambda: lines(long_log, "start"), 15, what="long run start")
        _, run_id, attempt, node, pid = lines(long_log, "start")[0]
        assert attempt == "1"
        cluster.agents[node].signal(signal.SIGKILL)
        cluster.agents[node].wait(5)
        wait_until(lambda: not pid_alive(int(pid)), 5, what="the dead agent's job to die")
        wait_until(lambda: lines(long_log, "end"), 30, what="re-delivered run to finish")
        time.sleep(1)
        starts, ends = lines(long_log, "start"), lines(long_log, "end")
        assert [s[2] for s in starts] == ["1", "2"] and starts[1][3] != node
        assert len(ends) == 1 and record(r, run_id)["state"] == "succeeded"
        cluster.agents[node].log.write_text("")
        cluster.agents[node].start()
        both_up(cluster)

        # 2. overlap = skip: two runs at once, one runs, one is recorded skipped.
        first = enqueue_id(cfg, "exclusive")
        second = enqueue_id(cfg, "exclusive")
        wait_until(lambda: {record(r, first).get("state"), record(r, second).get("state")}
                   == {"succeeded", "skipped"}, 20, what="one success, one skip")
        assert len(lines(skip_log, "start")) == 1

        # 3. a poison message is dead-lettered; the worker keeps serving.
        r.xadd("cronsul:q:default", {"p": b'{"v":1,"job":"rm -rf /","run_id":"x@1"}'})
        r.xadd("cronsul:q:default", {"junk": b"\xff"})
        enqueue(cfg, "after", [], wait=False)
        wait_until(lambda: after.read_text().strip() == "ok", 15, what="service after poison")
        reasons = sorted(f[b"reason"].decode() for _, f in r.xrange(KEYS.dead))
        assert reasons == ["malformed", "unknown job"], reasons

        # 3b. Python callables run in the warm pool: kwargs in, return value out; a segfault in
        #     a job fails that run, not the agent, which goes on serving.
        added = enqueue_id(cfg, "py-add", ["a=2", "b=40"])
        wait_until(lambda: record(r, added).get("state") == "succeeded", 20, what="py-add")
        assert "42" in record(r, added)["output"]
        # Its print-out also went to the agent's log, with the run id bound.
        logged = [json.loads(line) for a in cluster.agents.values()
                  for line in a.log.read_text().splitlines() if '"run_output"' in line]
        assert {"event": "run_output", "run_id": added, "line": "adding 2 and 40"}.items() <= \
            next(e for e in logged if e.get("run_id") == added).items(), logged
        # Every line names its node, the scheduler's and the elector's too.
        for a in cluster.agents.values():
            entries = [json.loads(x) for x in a.log.read_text().splitlines()
                       if x.startswith("{")]
            assert entries and all(e.get("node") == a.node for e in entries), \
                [e for e in entries if e.get("node") != a.node][:3]
        crashed = enqueue_id(cfg, "py-crash")
        wait_until(lambda: record(r, crashed).get("state") == "failed", 20, what="py-crash")
        again = enqueue_id(cfg, "py-add", ["a=1", "b=1"])
        wait_until(lambda: record(r, again).get("state") == "succeeded", 20, what="py after")
        assert all(a.alive() for a in cluster.agents.values())
        # Output that is not valid UTF-8 (a lone surrogate) is recorded with U+FFFD.
        odd = enqueue_id(cfg, "py-odd")
        wait_until(lambda: record(r, odd).get("state") == "succeeded", 20, what="py-odd")
        assert "report-\ufffd.csv" in record(r, odd)["output"]
        # More callable runs at once than warm processes: they queue for them, none is lost.
        burst = [enqueue_id(cfg, "py-add", ["a=1", f"b={i}"]) for i in range(12)]
        wait_until(lambda: all(record(r, b).get("state") == "succeeded" for b in burst), 30,
                   what="a burst of callables through one warm process per node")
        assert sorted(int(record(r, b)["output"].split()[-1]) for b in burst) == \
            [1 + i for i in range(12)]

        # 4. retries: attempts 1..3, then dead with a dead letter.
        flaky = enqueue_id(cfg, "flaky")
        wait_until(lambda: record(r, flaky).get("state") == "dead", 30, what="flaky to die")
        assert flaky_log.read_text().split() == ["1", "2", "3"]
        assert any(f.get(b"reason") == b"retries exhausted" for _, f in r.xrange(KEYS.dead))

        # 5. SIGSTOP the runner: its job is killed before the lease lapses, then re-run
        #    elsewhere; the two attempts never run at the same moment.
        frozen = enqueue_id(cfg, "frozen")
        wait_until(lambda: lines(frozen_log, "start"), 15, what="frozen run start")
        runner = lines(frozen_log, "start")[0][3]
        cluster.agents[runner].signal(signal.SIGSTOP)
        wait_until(lambda: len(lines(frozen_log, "start")) == 2, 30, what="takeover")
        time.sleep(2)
        cluster.agents[runner].signal(signal.SIGCONT)
        wait_until(lambda: record(r, frozen).get("state") == "succeeded", 30, what="finish")
    finally:
        cluster.stop()
    beats = lines(frozen_log, "beat")
    last_of_first = max(int(b[3]) for b in beats if b[2] == "1")
    first_of_second = min(int(b[3]) for b in beats if b[2] == "2")
    assert last_of_first < first_of_second, "attempts 1 and 2 of one run overlapped"
    assert [e[2] for e in lines(frozen_log, "end")] == ["2"]


def both_up(cluster: Cluster) -> None:
    # Redis 7.0 lists a consumer only after its first delivery, so watch the agents' own logs.
    wait_until(lambda: all("agent_started" in a.log.read_text()
                           for a in cluster.agents.values()), 30, what="both agents")
    time.sleep(1)


def enqueue_id(cfg: object, job: str, params: list[str] | None = None) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        enqueue(cfg, job, params or [], wait=False)  # type: ignore[arg-type]
    return out.getvalue().strip()


def test_pid_helper_sees_own_process() -> None:
    assert pid_alive(os.getpid())


@pytest.mark.slow
def test_a_free_slot_is_used_while_long_runs_hold_the_others(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    """Concurrency 4 with 3 long runs in flight: a new run starts at once on the fourth slot
    (the fetch loop's wait for a batch's worth of free slots is only a moment)."""
    r = redis_proc.client()
    r.flushdb()
    long_log, quick_log = tmp_path / "long.log", tmp_path / "quick.log"
    long_log.touch()
    quick_log.touch()
    jobs = {
        "long": beat_job(long_log, 8),
        "quick": {"schedule": NEVER, "timeout": "10s",
                  "command": ["/bin/sh", "-c", f"date +%s.%N >> {quick_log}"]},
    }
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"concurrency": 4})
    cfg = load_config(cluster.agents["n1"].config)
    cluster.start()
    try:
        wait_until(lambda: "agent_started" in cluster.agents["n1"].log.read_text(), 30,
                   what="agent")
        for _ in range(3):
            enqueue(cfg, "long", [], wait=False)
        wait_until(lambda: len(lines(long_log, "start")) == 3, 15, what="three long runs")
        time.sleep(1.5)  # the fetch loop has settled with 1 slot free of 4
        sent = time.time()
        enqueue(cfg, "quick", [], wait=False)
        wait_until(lambda: quick_log.read_text().strip() != "", 5, what="the quick run")
        assert float(quick_log.read_text().split()[0]) - sent < 1.0
        assert not lines(long_log, "end")  # the long runs still hold their slots
    finally:
        cluster.stop()
