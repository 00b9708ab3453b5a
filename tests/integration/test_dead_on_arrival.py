"""A run a node's config cannot run (its job is unknown there, because a config change is
rolling out one node at a time) is handed back for the other nodes instead of dead-lettered:
queued again a few seconds later, its record saying which node could not run it and why, until
a node that knows the job runs it. A run still refused HAND_BACK_WINDOW_S after its schedule
(the job was removed, or never existed) is dead-lettered, and its record says so: `history` and
`logs` show it dead with the reason. A forged message naming a real run's id cannot end that
run."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from cronsul_testing import Cluster, RedisServer, render_config, wait_until
from devconsul.testing import DevConsul
from worker.cli import main
from worker.consumer import HAND_BACK_WINDOW_S
from worker.keys import Keys
from worker.runstate import RunState
from worker.sink import run_payload

KEYS = Keys("cronsul")
TICK = {"schedule": "@yearly", "command": ["/bin/true"], "timeout": "10s"}


def _record(r: redis.Redis, run_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.run(run_id)).items()}


@pytest.mark.slow
def test_a_run_of_a_job_a_node_does_not_know_yet_waits_for_one_that_does(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer,
        redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    redis_client.flushdb()
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], {"tick": TICK})
    ops = tmp_path / "ops.toml"  # the operator's copy, one job ahead of the agents'
    fan = {**TICK, "command": ["/bin/echo", "fanned"]}
    ops.write_text(render_config({"agent": {"node": "ops"}, "redis": {"url": redis_proc.url}},
                                 {"tick": TICK, "fan": fan}))
    cluster.start()
    try:
        cluster.wait_leader(30)
        assert main(["run", "tick", "--wait", "-c", str(ops)]) == 0  # the agent consumes
        capsys.readouterr()
        assert main(["run", "fan", "-c", str(ops)]) == 0
        run_id = capsys.readouterr().out.strip()
        wait_until(lambda: "handed_back" in _record(redis_client, run_id), 15,
                   what="the run handed back by the node that does not know its job")
        record = _record(redis_client, run_id)
        assert record["state"] == "queued"
        assert record["handed_back"].startswith("n1 cannot run it (unknown job: 'fan'"), record
        assert main(["logs", run_id, "-c", str(ops)]) == 0
        assert "waiting: n1 cannot run it (unknown job: 'fan'" in capsys.readouterr().err
        # The roll reaches n1: it runs the run it had handed back.
        agent = cluster.agents["n1"]
        agent.config.write_text(agent.config.read_text()
                                + "\n" + render_config({}, {"fan": fan}).strip() + "\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: _record(redis_client, run_id).get("state") == "succeeded", 30,
                   what="the run, once its job is known")
    finally:
        cluster.stop()
    assert redis_client.xlen(KEYS.dead) == 0
    assert _record(redis_client, run_id)["output"] == "fanned\n"


def test_a_run_refused_past_the_hand_back_window_is_dead_and_listed(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer,
        redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    redis_client.flushdb()
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], {"tick": TICK})
    ops = tmp_path / "ops.toml"
    ops.write_text(render_config({"agent": {"node": "ops"}, "redis": {"url": redis_proc.url}},
                                 {"tick": TICK, "gone": TICK}))
    # A run of a job since removed, scheduled longer ago than the window: queued with its record.
    when = datetime.now(UTC) - timedelta(seconds=HAND_BACK_WINDOW_S + 60)
    run_id = f"gone@{int(when.timestamp() * 1000)}"
    payload = run_payload(run_id, "gone", when, {})
    redis_client.hset(KEYS.run(run_id), mapping={"state": "queued", "job": "gone",
                                                 "run_id": run_id, "payload": payload})
    redis_client.xadd(KEYS.stream("default"), {"p": payload})
    cluster.start()
    try:
        wait_until(lambda: _record(redis_client, run_id).get("state") == "dead", 20,
                   what="the run dead-lettered")
    finally:
        cluster.stop()
    record = _record(redis_client, run_id)
    assert record["node"] == "n1" and record["error"].startswith("unknown job: 'gone'"), record
    assert "handed_back" not in record
    assert redis_client.xlen(KEYS.dead) == 1  # the dead letter itself, once
    assert main(["history", "gone", "--json", "-c", str(ops)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run_id"], r["state"]) for r in runs] == [(run_id, "dead")]


def test_a_forged_message_cannot_end_another_runs_record(
        redis_proc: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    redis_client.flushdb()
    cfg = tmp_path / "c.toml"
    cfg.write_text(render_config({"agent": {"node": "ops"}, "redis": {"url": redis_proc.url}},
                                 {"tick": TICK}))
    assert main(["run", "tick", "-c", str(cfg)]) == 0
    [(_, [(_, fields)])] = redis_client.xread({KEYS.stream("default"): "0"})
    real = fields[b"p"]
    run_id = json.loads(real)["run_id"]
    state = RunState(redis_client, KEYS, "n9", 3600)
    forged = json.dumps({"v": 1, "job": "tick", "run_id": run_id, "params": {"x": "1"}}).encode()
    assert not state.dead_on_arrival(forged, "bad params: x", 1)
    assert redis_client.hget(KEYS.run(run_id), "state") == b"queued"
    for junk in (b"", b"[1]", b'{"run_id": 5}', b"\xff", b"[" * 100_000):
        assert not state.dead_on_arrival(junk, "undecodable: x", 1)
    assert state.dead_on_arrival(real, "unknown job: x", 1)  # its own message: ended
    assert redis_client.hget(KEYS.run(run_id), "state") == b"dead"
    wait_until(lambda: redis_client.zscore(KEYS.history("tick"), run_id) == 1, 1,
               what="listed in history")


def test_a_copy_reaching_a_node_that_knows_the_job_still_runs(
        redis_proc: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    """The reasons depend on the node's config: a node behind dead-letters its copy, and
    another copy (an SQS duplicate, a dlq retry racing it) that reaches a node that knows the
    job must still run, not be taken for a finished run."""
    from worker.runstate import HISTORY_PER_JOB, RunRef

    redis_client.flushdb()
    cfg = tmp_path / "c.toml"
    cfg.write_text(render_config({"agent": {"node": "ops"}, "redis": {"url": redis_proc.url}},
                                 {"tick": TICK}))
    assert main(["run", "tick", "-c", str(cfg)]) == 0
    [(_, [(entry, fields)])] = redis_client.xread({KEYS.stream("default"): "0"})
    payload = fields[b"p"]
    run_id = json.loads(payload)["run_id"]
    hist = KEYS.history("tick")
    redis_client.zadd(hist, {f"tick@old-{i}": i for i in range(HISTORY_PER_JOB)})
    behind = RunState(redis_client, KEYS, "n-behind", 3600)
    assert behind.dead_on_arrival(payload, "unknown job: 'tick' is not defined", 10)
    assert redis_client.zcard(hist) == HISTORY_PER_JOB  # trimmed like any history write
    assert redis_client.zscore(hist, run_id) == 10
    ahead = RunState(redis_client, KEYS, "n-ahead", 3600)
    ref = RunRef(run_id, "tick", 1, "default", payload, entry.decode())
    begun = ahead.begin(ref, "tok", 5000, 20)
    assert begun.verdict == "start" and begun.attempt == 1, begun
    record = redis_client.hgetall(KEYS.run(run_id))
    assert record[b"state"] == b"running" and b"dead_on_arrival" not in record


def test_an_oversized_payload_is_not_looked_up(
        redis_proc: RedisServer, redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    big = json.dumps({"v": 1, "job": "tick", "run_id": "tick@big", "pad": "x" * 70_000}).encode()
    redis_client.hset(KEYS.run("tick@big"), mapping={"state": "queued", "payload": big})
    assert not RunState(redis_client, KEYS, "n1", 3600).dead_on_arrival(big, "oversized: x", 1)
    assert redis_client.hget(KEYS.run("tick@big"), "state") == b"queued"
