"""The fenced enqueue script and the run state machine, against a real redis-server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import redis

from scheduler.errors import FencedOff
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run
from worker.keys import GROUP, Keys
from worker.queue import Delivery, RedisQueue
from worker.sink import RedisSink

T0 = datetime(2026, 11, 22, 18, 0, 5, tzinfo=UTC)
KEYS = Keys("cronsul")


def batch(*seconds: int, job: str = "j") -> TickBatch:
    runs = [(Run.for_tick(job, T0 + timedelta(seconds=s)), "default") for s in seconds]
    return TickBatch(runs, {job: T0 + timedelta(seconds=max(seconds))})


def test_enqueue_is_idempotent_per_run_id(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    first = sink.apply(batch(0, 1, 2), Fence(0, 5))
    again = sink.apply(batch(1, 2, 3), Fence(0, 6))
    assert (first.enqueued, first.deduplicated) == (3, 0)
    assert (again.enqueued, again.deduplicated) == (1, 2)
    assert redis_client.xlen(KEYS.stream("default")) == 4


def test_lower_fence_is_refused_and_writes_nothing(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    sink.apply(batch(0), Fence(0, 20))
    with pytest.raises(FencedOff, match="below the highest"):
        sink.apply(batch(1), Fence(0, 19))
    assert redis_client.xlen(KEYS.stream("default")) == 1
    assert sink.load_cursors(["j"])["j"] == T0


def test_epoch_rebase_outranks_a_higher_index(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    sink.apply(batch(0), Fence(0, 5000))  # before Consul lost its state
    assert sink.open_fence(12) is None  # Consul index went backwards
    fence = sink.rebase_fence(Fence(0, 5000), 12)
    assert fence == Fence(1, 12)
    sink.apply(batch(1), fence)
    with pytest.raises(FencedOff):
        sink.apply(batch(2), Fence(0, 5001))  # the zombie from before the loss
    assert sink.rebase_fence(Fence(0, 5000), 13) is None  # a stale rebase loses the CAS


def test_cursor_only_moves_forward(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    sink.apply(batch(5), Fence(0, 1))
    sink.apply(TickBatch([], {"j": T0}), Fence(0, 1))
    assert sink.load_cursors(["j", "other"]) == {"j": T0 + timedelta(seconds=5), "other": None}


def fetch_one(q: RedisQueue) -> Delivery:
    got = q.fetch(["default"], 1, 100)
    assert len(got) == 1
    return got[0]


def run_id_of(d: Delivery) -> str:
    assert d.payload is not None
    rid: str = json.loads(d.payload)["run_id"]
    return rid


def test_begin_finish_acks_and_records(redis_client: redis.Redis) -> None:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    d = fetch_one(q)
    rid = run_id_of(d)
    begun = q.begin(rid, "tok", 5000, 1, "j", 0, "default")
    assert (begun.verdict, begun.attempt) == ("start", 1)
    assert q.finish(d, rid, "j", "tok", "succeeded", 2, {"exit_code": "0"})
    assert redis_client.xpending(KEYS.stream("default"), GROUP)["pending"] == 0
    assert q.record(rid)["state"] == "succeeded"
    assert not redis_client.exists(KEYS.lease(rid))


def test_finished_run_is_not_started_again_when_its_ack_was_lost(redis_client: redis.Redis) -> None:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    d = fetch_one(q)
    rid = run_id_of(d)
    q.begin(rid, "tok", 5000, 1, "j", 0, "default")
    q.finish(d, rid, "j", "tok", "succeeded", 2, {})
    assert q.begin(rid, "tok2", 5000, 3, "j", 0, "default").verdict == "done"


def test_a_live_lease_blocks_a_second_runner(redis_client: redis.Redis) -> None:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q1 = RedisQueue(redis_client, KEYS, "n1")
    q2 = RedisQueue(redis_client, KEYS, "n2")
    q1.ensure_groups(["default"])
    d = fetch_one(q1)
    rid = run_id_of(d)
    assert q1.begin(rid, "t1", 5000, 1, "j", 0, "default").verdict == "start"
    busy = q2.begin(rid, "t2", 5000, 1, "j", 0, "default")
    assert (busy.verdict, busy.detail) == ("busy", "t1")


def test_node_that_lost_its_lease_cannot_record_or_ack(redis_client: redis.Redis) -> None:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q1 = RedisQueue(redis_client, KEYS, "n1")
    q2 = RedisQueue(redis_client, KEYS, "n2")
    q1.ensure_groups(["default"])
    d = fetch_one(q1)
    rid = run_id_of(d)
    q1.begin(rid, "t1", 50, 1, "j", 0, "default")
    redis_client.delete(KEYS.lease(rid))  # the lease lapsed while n1 was frozen
    assert q2.begin(rid, "t2", 5000, 2, "j", 0, "default").attempt == 2
    assert not q1.finish(d, rid, "j", "t1", "failed", 3, {})  # the thawed zombie is refused
    assert q1.renew([(rid, "t1")], 5000) == [False]
    assert q2.renew([(rid, "t2")], 5000) == [True]
    assert q2.finish(d, rid, "j", "t2", "succeeded", 4, {})
    assert q1.record(rid)["state"] == "succeeded"


def test_reclaim_takes_idle_entries_only_when_their_lease_lapsed(redis_client: redis.Redis) -> None:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q1 = RedisQueue(redis_client, KEYS, "n1")
    q2 = RedisQueue(redis_client, KEYS, "n2")
    q1.ensure_groups(["default"])
    d = fetch_one(q1)
    rid = run_id_of(d)
    q1.begin(rid, "t1", 60_000, 1, "j", 0, "default")
    assert q2.reclaim(["default"], 0, 10) == []  # lease alive: a long run is left alone
    redis_client.delete(KEYS.lease(rid))  # n1 died; its lease ran out
    taken = q2.reclaim(["default"], 0, 10)
    assert [t.entry_id for t in taken] == [d.entry_id]
    assert taken[0].deliveries == 2


def test_dead_letter_keeps_reason_and_payload_and_acks(redis_client: redis.Redis) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    redis_client.xadd(KEYS.stream("default"), {"p": b"\xff not json"})
    d = fetch_one(q)
    q.dead_letter(d, "undecodable", "Expecting value")
    [(_, fields)] = redis_client.xrange(KEYS.dead)
    assert fields[b"reason"] == b"undecodable"
    assert fields[b"payload"] == b"\xff not json"
    assert redis_client.xpending(KEYS.stream("default"), GROUP)["pending"] == 0
