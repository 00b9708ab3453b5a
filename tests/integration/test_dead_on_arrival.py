"""A run that cannot be run on arrival (here: the agents do not know its job yet, because the
operator's config is ahead of theirs) is dead-lettered, and the record `cronsul run` made for it
says so: `run --wait` ends at once with exit 1, `history` and `logs` show it dead with the
reason. A forged message naming a real run's id cannot end that run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from cronsul_testing import Cluster, RedisServer, render_config, wait_until

from devconsul.testing import DevConsul
from worker.cli import main
from worker.keys import Keys
from worker.runstate import RunState

KEYS = Keys("cronsul")
TICK = {"schedule": "@yearly", "command": ["/bin/true"], "timeout": "10s"}


@pytest.mark.slow
def test_run_of_a_job_the_agents_do_not_know_ends_dead_at_once(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer,
        redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    redis_client.flushdb()
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], {"tick": TICK})
    ops = tmp_path / "ops.toml"  # the operator's copy, one job ahead of the agents'
    ops.write_text(render_config({"agent": {"node": "ops"}, "redis": {"url": redis_proc.url}},
                                 {"tick": TICK, "fan": {**TICK, "command": ["/bin/echo", "x"]}}))
    cluster.start()
    try:
        cluster.wait_leader(30)
        assert main(["run", "tick", "--wait", "-c", str(ops)]) == 0  # the agent consumes
        capsys.readouterr()
        began = time.monotonic()
        assert main(["run", "fan", "--wait", "-c", str(ops)]) == 1
        assert time.monotonic() - began < 15  # not 3 x timeout + 60 s
        out = capsys.readouterr().out
        run_id = out.splitlines()[0].strip()
        assert f"{run_id}: dead on n1" in out, out
        assert "unknown job: 'fan'" in out, out  # why, not only that it is dead
    finally:
        cluster.stop()
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.run(run_id)).items()}
    assert record["state"] == "dead" and record["node"] == "n1", record
    assert record["error"].startswith("unknown job: 'fan'"), record
    assert redis_client.xlen(KEYS.dead) == 1  # the dead letter itself, once
    assert main(["history", "fan", "--json", "-c", str(ops)]) == 0
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
