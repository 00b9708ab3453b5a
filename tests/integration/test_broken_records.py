"""A run whose own Redis keys are broken (something else wrote its record) is dead-lettered with
the reason, and neither holds up nor endangers the runs claimed or recorded in the same batch:
before, one such run failed its whole begin or finish call, and the others of a finish batch
were left to lapse and run a second time elsewhere."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import redis

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from worker.config import load_config
from worker.inspect_cmds import dlq_retry
from worker.keys import GROUP, Keys
from worker.sink import run_payload

KEYS = Keys("cronsul")


def enqueue(r: redis.Redis, run_ids: list[str]) -> None:
    pipe = r.pipeline(transaction=True)  # one batch: the agent fetches them together
    for run_id in run_ids:
        pipe.xadd(KEYS.stream("default"), {"p": run_payload(run_id, "work", datetime.now(UTC), {})})
    pipe.execute()


def state(r: redis.Redis, run_id: str) -> str | None:
    try:
        value = r.hget(KEYS.run(run_id), "state")
    except redis.ResponseError:  # the broken one
        return None
    return value.decode() if value else None


def dead_letters(r: redis.Redis) -> dict[str, dict[str, str]]:
    out = {}
    for _, fields in r.xrange(KEYS.dead):
        f = {k.decode(): v.decode() for k, v in fields.items()}
        out[f["payload"].split('"run_id":"')[1].split('"')[0]] = f
    return out


def test_a_run_with_a_broken_record_is_dead_lettered_and_its_batch_goes_on(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    log = tmp_path / "ran.log"
    log.touch()
    jobs = {"work": {"schedule": "@yearly", "timeout": "10s",
                     "command": ["/bin/sh", "-c", f'echo "$CRONSUL_RUN_ID" >> {log}; sleep 1']}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"visibility_timeout": "3s"})
    cluster.start()
    try:
        # Broken before it is claimed: begin refuses it alone; the others run.
        r.set(KEYS.run("work@a2"), "not a hash")
        enqueue(r, ["work@a1", "work@a2", "work@a3"])
        wait_until(lambda: state(r, "work@a1") == state(r, "work@a3") == "succeeded", 30,
                   what="the healthy runs of the batch")
        wait_until(lambda: "work@a2" in dead_letters(r), 10, what="the broken run dead-lettered")
        assert dead_letters(r)["work@a2"]["reason"] == "unrecordable"
        assert "WRONGTYPE" in dead_letters(r)["work@a2"]["error"]

        # Broken while it runs: finish records the others; the broken one is dead-lettered
        # when its lease lapses, and never runs again.
        enqueue(r, ["work@b1", "work@b2", "work@b3"])
        wait_until(lambda: "work@b2" in log.read_text().split(), 15, what="b2 to start")
        r.delete(KEYS.run("work@b2"))
        r.set(KEYS.run("work@b2"), "not a hash")
        wait_until(lambda: state(r, "work@b1") == state(r, "work@b3") == "succeeded", 30,
                   what="the healthy runs of the batch")
        wait_until(lambda: "work@b2" in dead_letters(r), 20, what="b2 dead-lettered")
        assert dead_letters(r)["work@b2"]["reason"] == "unrecordable"
        ran = log.read_text().split()
        assert sorted(ran) == ["work@a1", "work@a3", "work@b1", "work@b2", "work@b3"]
        assert '"event":"run_unrecordable"' in cluster.agents["n1"].log.read_text()
        assert r.xpending(KEYS.stream("default"), GROUP)["pending"] == 0

        # `cronsul dlq retry` (all letters) refuses each still-broken one and goes on; once a
        # record is repaired (here: deleted), that letter is retried and its run runs.
        cfg = load_config(cluster.agents["n1"].config)
        assert dlq_retry(cfg, None) == 1
        assert set(dead_letters(r)) == {"work@a2", "work@b2"}
        r.delete(KEYS.run("work@a2"))
        assert dlq_retry(cfg, None) == 1  # b2 is still broken
        assert set(dead_letters(r)) == {"work@b2"}
        wait_until(lambda: state(r, "work@a2") == "succeeded", 20, what="the repaired run")
        assert log.read_text().split().count("work@a2") == 1
    finally:
        cluster.stop()
