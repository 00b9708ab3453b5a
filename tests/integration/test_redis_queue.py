"""The fenced enqueue script and the run state machine, against a real redis-server."""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from cronsul_testing import RedisServer, wait_until

from scheduler.clock import SystemClock
from scheduler.errors import ClockAhead, FencedOff
from scheduler.ports import Fence, TickBatch
from scheduler.runs import Run
from worker.keys import GROUP, Keys
from worker.leadership import Term
from worker.queue import Delivery, RedisQueue
from worker.runstate import Finished, FinishResult, RunRef, RunState
from worker.scheduling import SchedulerDriver
from worker.sink import RedisSink

T0 = datetime(2026, 11, 22, 18, 0, 5, tzinfo=UTC)
KEYS = Keys("cronsul")
Setup = tuple[RedisQueue, RunState, RunState]


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


def test_the_schedule_of_each_cursor_is_kept(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    sink = RedisSink(redis_client, KEYS)
    assert sink.load_schedules(["j", "k"]) == {"j": None, "k": None}
    sink.save_schedules({"j": "0 * * * *|UTC", "k": "@daily|Europe/Berlin"})
    sink.save_schedules({"j": "* * * * *|UTC"})
    assert sink.load_schedules(["j", "k", "x"]) == {
        "j": "* * * * *|UTC", "k": "@daily|Europe/Berlin", "x": None}


def test_a_leader_whose_clock_is_ahead_of_redis_writes_nothing(
        redis_client: redis.Redis) -> None:
    """A drill stepped a leader's clock 400 s ahead for 3 s: runs fired early, the cursors
    moved into the future, and no run came for five minutes. Redis's own clock decides."""
    redis_client.flushdb()
    sink = RedisSink(redis_client, KEYS)
    now = datetime.now(UTC).replace(microsecond=0)
    ahead = now + timedelta(seconds=400)
    with pytest.raises(ClockAhead, match=r"clock is (399|40\d)\.\ds ahead of Redis's"):
        sink.apply(TickBatch([(Run.for_tick("j", ahead), "default")], {"j": ahead}),
                   Fence(0, 1))
    with pytest.raises(ClockAhead):  # a pass with only a cursor to move, too
        sink.apply(TickBatch([], {"j": ahead}), Fence(0, 1))
    assert redis_client.xlen(KEYS.stream("default")) == 0
    assert sink.load_cursors(["j"]) == {"j": None}
    assert not redis_client.exists(KEYS.fence)  # not even the fence was raised
    # A clock within the tolerance (or behind) writes as ever.
    assert sink.apply(TickBatch([(Run.for_tick("j", now), "default")], {"j": now}),
                      Fence(0, 1)).enqueued == 1


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


def test_a_regression_is_timed_from_its_first_sighting(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    assert sink.regression_seen(Fence(2, 88)) == 0.0  # the first leader to see it
    time.sleep(0.4)
    assert 0.35 <= sink.regression_seen(Fence(2, 88)) < 2  # a later leader: the same clock
    assert sink.regression_seen(Fence(3, 12)) == 0.0  # a new loss, after a rebase


class _Elector:
    def __init__(self, term: Term) -> None:
        self.term = term


def test_a_successor_waits_only_what_remains_of_the_settle_period(
        redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    sink.apply(batch(0), Fence(2, 88))  # the highest fence before Consul lost its state
    term = Term("s1", 24, datetime.now(UTC))
    first = SchedulerDriver(None, sink, _Elector(term), SystemClock(), 1.5, None)  # type: ignore[arg-type]
    stop = threading.Event()
    started = time.monotonic()
    threading.Timer(0.8, lambda: setattr(first._elector, "term", None)).start()
    assert first._open_fence(term, stop) is None  # it lost the key while it waited
    assert time.monotonic() - started >= 1.4  # (it waited its full period regardless)
    # Its successor, elected 1.5 s after the first sighting, has nothing left to wait for.
    later = Term("s2", 31, datetime.now(UTC))
    second = SchedulerDriver(None, sink, _Elector(later), SystemClock(), 1.5, None)  # type: ignore[arg-type]
    started = time.monotonic()
    assert second._open_fence(later, stop) == Fence(3, 31)
    assert time.monotonic() - started < 0.5


def test_cursor_only_moves_forward(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, KEYS)
    sink.apply(batch(5), Fence(0, 1))
    sink.apply(TickBatch([], {"j": T0}), Fence(0, 1))
    assert sink.load_cursors(["j", "other"]) == {"j": T0 + timedelta(seconds=5), "other": None}


def fetch_one(q: RedisQueue, queue: str = "default") -> Delivery:
    got = q.fetch([queue], 1, 100)
    assert len(got) == 1
    return got[0]


def ref_of(d: Delivery, **kw: str) -> RunRef:
    assert d.payload is not None
    body = json.loads(d.payload)
    return RunRef(body["run_id"], body["job"], 0, d.queue, d.payload, d.entry_id, **kw)


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.stream("default"), GROUP)["pending"])


@pytest.fixture
def setup(redis_client: redis.Redis) -> tuple[RedisQueue, RunState, RunState]:
    RedisSink(redis_client, KEYS).apply(batch(0), Fence(0, 1))
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    return q, RunState(redis_client, KEYS, "n1", 3600), RunState(redis_client, KEYS, "n2", 3600)


def test_begin_finish_acks_and_records(redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    ref = ref_of(fetch_one(q))
    begun = n1.begin(ref, "tok", 5000, 1)
    assert (begun.verdict, begun.attempt) == ("start", 1)
    assert n1.finish(ref, "tok", "succeeded", 2, {"exit_code": "0"})
    assert pending(redis_client) == 0
    assert n1.record(ref.run_id)["state"] == "succeeded"
    assert not redis_client.exists(KEYS.lease(ref.run_id))
    # Acked and deleted: a stream of every run ever queued would grow without bound.
    assert redis_client.xlen(KEYS.stream("default")) == 0


def test_a_success_moves_its_jobs_last_success_forward_only(redis_client: redis.Redis,
                                                            setup: Setup) -> None:
    q, n1, _ = setup
    RedisSink(redis_client, KEYS).apply(batch(1, 2), Fence(0, 1))
    a, b, c = (ref_of(fetch_one(q)) for _ in range(3))
    for ref in (a, b, c):
        assert n1.begin(ref, "t", 5000, 1).verdict == "start"
    assert n1.finish(b, "t", "succeeded", 2000, {})
    assert n1.finish(c, "t", "failed", 3000, {"exit_code": "1"})  # a failure: not a success
    assert redis_client.hgetall(KEYS.last_success) == {b"j": b"2000"}
    assert n1.finish(a, "t", "succeeded", 1500, {})  # finished later, recorded earlier
    assert redis_client.hgetall(KEYS.last_success) == {b"j": b"2000"}


def test_every_way_a_delivery_ends_deletes_its_entry(
        redis_client: redis.Redis, setup: Setup) -> None:
    """begin's verdicts that end a delivery (done, skipped, lost), finish, the consumer's ack
    and a dead letter: each leaves the stream without the entry, and the group's lag known."""
    q, n1, n2 = setup
    RedisSink(redis_client, KEYS).apply(batch(1, 2, 3, 4, 5, 6), Fence(0, 1))
    stream = KEYS.stream("default")
    assert redis_client.xlen(stream) == 7  # the setup's tick and these six
    first = ref_of(fetch_one(q))
    n1.begin(first, "t1", 5000, 1)
    n1.finish(first, "t1", "succeeded", 2, {})
    again = ref_of(fetch_one(q))  # "done": the same run id delivered again
    redis_client.hset(KEYS.run(again.run_id), "state", "succeeded")
    assert n2.begin(again, "t2", 5000, 3).verdict == "done"
    lost = ref_of(fetch_one(q), on_lost="fail")
    redis_client.hset(KEYS.run(lost.run_id), "state", "running")
    assert n2.begin(lost, "t3", 5000, 4).verdict == "lost"
    q.ack(fetch_one(q))
    q.dead_letter(fetch_one(q), "malformed", "malformed: x")
    holder = ref_of(fetch_one(q), overlap="skip", lock_name="j")
    skipped = ref_of(fetch_one(q), overlap="skip", lock_name="j")
    assert n1.begin(holder, "t4", 5000, 5).verdict == "start"
    assert n2.begin(skipped, "t5", 5000, 5).verdict == "skipped"
    left = [e[0].decode() for e in redis_client.xrange(stream)]
    assert left == [holder.entry_id], left  # only the run still running
    groups = redis_client.xinfo_groups(stream)
    assert groups[0]["lag"] == 0, groups  # XINFO still knows the backlog


def test_finished_run_is_not_started_again_when_its_ack_was_lost(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    d = fetch_one(q)
    ref = ref_of(d)
    n1.begin(ref, "tok", 5000, 1)
    n1.finish(RunRef(ref.run_id, ref.job, 0, "default", ref.payload, ""), "tok", "succeeded", 2,
              {})  # recorded, but the ack never happened
    assert pending(redis_client) == 1
    assert n1.begin(ref, "tok2", 5000, 3).verdict == "done"
    assert pending(redis_client) == 0  # acked by begin, without running


def test_a_live_lease_blocks_a_second_runner(setup: Setup) -> None:
    q, n1, n2 = setup
    ref = ref_of(fetch_one(q))
    assert n1.begin(ref, "t1", 5000, 1).verdict == "start"
    busy = n2.begin(ref, "t2", 5000, 1)
    assert (busy.verdict, busy.detail) == ("busy", "t1")


def test_node_that_lost_its_lease_cannot_record_or_ack(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    ref = ref_of(fetch_one(q))
    n1.begin(ref, "t1", 50, 1)
    redis_client.delete(KEYS.lease(ref.run_id))  # the lease lapsed while n1 was frozen
    assert n2.begin(ref, "t2", 5000, 2).attempt == 2
    assert not n1.finish(ref, "t1", "failed", 3, {})  # the thawed zombie is refused
    assert n1.renew([(ref, "t1")], 5000) == [0]
    assert n2.renew([(ref, "t2")], 5000) == [1]
    assert n2.finish(ref, "t2", "succeeded", 4, {})
    assert n1.record(ref.run_id)["state"] == "succeeded"


def test_lost_run_with_on_lost_fail_is_recorded_failed_not_rerun(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    ref = ref_of(fetch_one(q), on_lost="fail")
    n1.begin(ref, "t1", 5000, 1)
    redis_client.delete(KEYS.lease(ref.run_id))  # n1 died mid-run
    assert n2.begin(ref, "t2", 5000, 2).verdict == "lost"
    assert n2.record(ref.run_id)["state"] == "failed"
    # Listed in its job's history like any ended run (`cronsul history`, the dashboard).
    assert redis_client.zscore(KEYS.history(ref.job), ref.run_id) == 2
    assert pending(redis_client) == 0


def test_reclaim_takes_idle_entries_only_when_their_lease_lapsed(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    d = fetch_one(q)
    ref = ref_of(d)
    n1.begin(ref, "t1", 60_000, 1)
    q2 = RedisQueue(redis_client, KEYS, "n2")
    assert q2.reclaim(["default"], 0, 10) == []  # lease alive: a long run is left alone
    redis_client.delete(KEYS.lease(ref.run_id))  # n1 died; its lease ran out
    taken = q2.reclaim(["default"], 0, 10)
    assert [t.entry_id for t in taken] == [d.entry_id]
    assert taken[0].deliveries == 2


def two_runs(redis_client: redis.Redis, q: RedisQueue, overlap: str) -> tuple[RunRef, RunRef]:
    RedisSink(redis_client, KEYS).apply(batch(1), Fence(0, 1))
    first = ref_of(fetch_one(q), overlap=overlap, lock_name="j")
    second = ref_of(fetch_one(q), overlap=overlap, lock_name="j")
    return first, second


def test_overlap_skip_records_the_second_run_skipped(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    first, second = two_runs(redis_client, q, "skip")
    assert n1.begin(first, "t1", 5000, 1).verdict == "start"
    skipped = n2.begin(second, "t2", 5000, 1)
    assert (skipped.verdict, skipped.detail) == ("skipped", first.run_id)
    assert n2.record(second.run_id)["state"] == "skipped"
    assert redis_client.zscore(KEYS.history(second.job), second.run_id) == 1  # listed
    assert n1.finish(first, "t1", "succeeded", 2, {})
    assert not redis_client.exists(KEYS.lock("j"))  # released by compare-and-delete
    assert pending(redis_client) == 0


def test_overlap_lock_is_not_freed_by_a_node_that_lost_it(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    first, second = two_runs(redis_client, q, "skip")
    n1.begin(first, "t1", 5000, 1)
    redis_client.delete(KEYS.lease(first.run_id), KEYS.lock("j"))  # n1 frozen past expiry
    assert n2.begin(second, "t2", 5000, 1).verdict == "start"
    assert not n1.finish(first, "t1", "succeeded", 3, {})
    assert redis_client.get(KEYS.lock("j")) == f"{second.run_id} t2".encode()


def test_overlap_queue_parks_one_waiting_run_and_promotes_it(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    first, second = two_runs(redis_client, q, "queue")
    n1.begin(first, "t1", 5000, 1)
    assert n2.begin(second, "t2", 5000, 1).verdict == "wait"
    assert redis_client.zcard(KEYS.delayed) == 1
    assert pending(redis_client) == 1  # only the running first run; the second was acked
    n1.finish(first, "t1", "succeeded", 2, {})
    assert n1.promote(now_ms=10**15) == 1  # due: back on its stream
    again = ref_of(fetch_one(q), overlap="queue", lock_name="j")
    assert again.run_id == second.run_id
    assert n2.begin(again, "t3", 5000, 3).verdict == "start"


def test_overlap_replace_asks_the_holder_to_stop(redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    first, second = two_runs(redis_client, q, "replace")
    n1.begin(first, "t1", 5000, 1)
    assert n2.begin(second, "t2", 5000, 1).verdict == "wait"
    assert n1.renew([(first, "t1")], 5000) == [2]  # renewed, and asked to stop


def test_replace_keeps_an_operators_stop_request(redis_client: redis.Redis,
                                                setup: Setup) -> None:
    """`cronsul stop` asked first: a newer run under replace must not overwrite it, or the
    record would say "replaced" instead of who stopped it and why (a code review's finding)."""
    q, n1, n2 = setup
    first, second = two_runs(redis_client, q, "replace")
    n1.begin(first, "t1", 5000, 1)
    assert n2.request_stop(first.run_id, "ops@host: wrong tenant", 5000) == "running"
    assert n2.begin(second, "t2", 5000, 1).verdict == "wait"
    assert n1.renew([(first, "t1")], 5000) == [3]  # still the operator's
    assert n1.stop_reason(first.run_id) == "ops@host: wrong tenant"


def test_a_stop_request_for_a_run_that_ended_writes_nothing(redis_client: redis.Redis,
                                                            setup: Setup) -> None:
    q, n1, _ = setup
    first, _ = two_runs(redis_client, q, "allow")
    assert n1.request_stop(first.run_id, "ops", 5000) == "queued"  # not started: not asked
    n1.begin(first, "t1", 5000, 1)
    n1.finish(first, "t1", "succeeded", 2, {})
    assert n1.request_stop(first.run_id, "ops", 5000) == "succeeded"
    assert n1.request_stop("j@nope", "ops", 5000) is None
    assert redis_client.exists(KEYS.stop(first.run_id), KEYS.stop("j@nope")) == 0


def timed(redis_client: redis.Redis, q: RedisQueue, second: int, overlap: str) -> RunRef:
    """The run of tick T0 + ``second`` (its real scheduled time), fetched."""
    RedisSink(redis_client, KEYS).apply(batch(second), Fence(0, 1))
    d = fetch_one(q)
    assert d.payload is not None
    when = datetime.fromisoformat(json.loads(d.payload)["scheduled_at"].replace("Z", "+00:00"))
    return RunRef(json.loads(d.payload)["run_id"], "j", int(when.timestamp() * 1000), d.queue,
                  d.payload, d.entry_id, overlap=overlap, lock_name="j")


def fail_then_refetch(n: RunState, q: RedisQueue, ref: RunRef, token: str) -> RunRef:
    """``ref``'s attempt fails with a retry due at once; its retry, fetched."""
    assert n.finish(ref, token, "retrying", 2, {"exit_code": "1"}, retry_at_ms=1)
    assert n.promote(now_ms=10**15) == 1
    d = fetch_one(q)
    return RunRef(ref.run_id, "j", ref.scheduled_ms, d.queue, d.payload or b"", d.entry_id,
                  overlap=ref.overlap, lock_name="j")


@pytest.mark.parametrize("overlap", ["skip", "queue"])
def test_a_retry_waits_for_the_lock_instead_of_being_skipped(
        redis_client: redis.Redis, setup: Setup, overlap: str) -> None:
    """A review saw a failed run whose retry found the lock held recorded "skipped": its
    failure and its remaining retries vanished (also after `dlq retry`)."""
    q, n1, n2 = setup
    fetch_one(q)  # the setup's own run, out of the way
    old, new = timed(redis_client, q, 10, overlap), timed(redis_client, q, 20, overlap)
    assert n1.begin(old, "t1", 5000, 1).verdict == "start"
    retry = fail_then_refetch(n1, q, old, "t1")
    assert n2.begin(new, "t2", 5000, 2).verdict == "start"  # the lock is free: the next tick
    if overlap == "queue":  # and another run takes the one waiting place first
        other = timed(redis_client, q, 30, overlap)
        assert n2.begin(other, "t4", 5000, 2).verdict == "wait"
    begun = n1.begin(retry, "t3", 5000, 3)
    assert (begun.verdict, begun.detail) == ("wait", new.run_id)
    assert n1.record(old.run_id)["state"] == "queued"
    assert n2.finish(new, "t2", "succeeded", 4, {})
    assert n1.promote(now_ms=10**15) >= 1
    again = [d for d in q.fetch(["default"], 5, 100)
             if json.loads(d.payload or b"{}")["run_id"] == old.run_id]
    assert again
    second = RunRef(old.run_id, "j", old.scheduled_ms, "default", again[0].payload or b"",
                    again[0].entry_id, overlap=overlap, lock_name="j")
    assert n1.begin(second, "t5", 5000, 5).attempt == 2


def test_replace_never_stops_a_newer_run_for_an_older_one(
        redis_client: redis.Redis, setup: Setup) -> None:
    """A review saw the retry of an older run stop the newer run that was running."""
    q, n1, n2 = setup
    fetch_one(q)
    old, new = timed(redis_client, q, 10, "replace"), timed(redis_client, q, 20, "replace")
    assert n1.begin(old, "t1", 5000, 1).verdict == "start"
    retry = fail_then_refetch(n1, q, old, "t1")
    assert n2.begin(new, "t2", 5000, 2).verdict == "start"
    begun = n1.begin(retry, "t3", 5000, 3)
    assert (begun.verdict, begun.detail) == ("superseded", new.run_id)
    record = n1.record(old.run_id)
    assert record["state"] == "failed" and "not retried" in record["error"], record
    assert n2.renew([(new, "t2")], 5000) == [1]  # not asked to stop
    # A late tick older than the running one (a catch-up) is skipped, not run in its place.
    late = timed(redis_client, q, 15, "replace")
    assert n1.begin(late, "t4", 5000, 3).verdict == "skipped"
    assert n2.renew([(new, "t2")], 5000) == [1]


def test_replace_keeps_the_newest_waiting_run(redis_client: redis.Redis, setup: Setup) -> None:
    """After an outage the catch-up tick waited and the newer ticks were skipped; the newest
    must win."""
    q, n1, n2 = setup
    fetch_one(q)
    running = timed(redis_client, q, 10, "replace")
    assert n1.begin(running, "t1", 5000, 1).verdict == "start"
    older, newer = timed(redis_client, q, 20, "replace"), timed(redis_client, q, 30, "replace")
    assert n2.begin(older, "t2", 5000, 2).verdict == "wait"
    assert n2.begin(newer, "t3", 5000, 3).verdict == "wait"  # takes the waiting place
    assert redis_client.get(KEYS.waiting("j")) == newer.run_id.encode()
    assert n1.finish(running, "t1", "failed", 4, {})
    # The older one comes back first: superseded by the newer one waiting.
    again = RunRef(older.run_id, "j", older.scheduled_ms, "default", older.payload, "",
                   overlap="replace", lock_name="j")
    assert n2.begin(again, "t5", 5000, 5).verdict == "skipped"
    later = RunRef(newer.run_id, "j", newer.scheduled_ms, "default", newer.payload, "",
                   overlap="replace", lock_name="j")
    assert n2.begin(later, "t6", 5000, 6).verdict == "start"


def test_a_late_finish_records_a_run_nobody_took_over_and_only_that(
        redis_client: redis.Redis, setup: Setup) -> None:
    """Redis unreachable past the lease: the finished run's result still counts when Redis
    answers again, unless another node took the run over meanwhile (exactly one wins)."""
    q, n1, n2 = setup
    ref = ref_of(fetch_one(q))
    assert n1.begin(ref, "t1", 5000, 1).attempt == 1
    redis_client.delete(KEYS.lease(ref.run_id))  # it lapsed during the outage
    result = Finished(ref, "t1", "succeeded", 2, {"exit_code": "0"}, None, 1)
    assert n1.finish_many([result]) == [FinishResult(False)]  # on time: not ours any more
    assert n1.finish_many([result], late=True) == [FinishResult(True)]
    assert n1.record(ref.run_id)["state"] == "succeeded"
    assert pending(redis_client) == 0
    # Taken over first: the late result loses, the new attempt is the run.
    RedisSink(redis_client, KEYS).apply(batch(7), Fence(0, 1))
    other = ref_of(fetch_one(q))
    assert n1.begin(other, "t2", 5000, 3).attempt == 1
    redis_client.delete(KEYS.lease(other.run_id))
    assert n2.begin(other, "t3", 5000, 4).attempt == 2  # another node took it over
    late = Finished(other, "t2", "succeeded", 5, {"exit_code": "0"}, None, 1)
    assert n1.finish_many([late], late=True) == [FinishResult(False)]
    assert n1.record(other.run_id)["state"] == "running"  # attempt 2 runs on
    # A late result of another node's attempt, or of an earlier attempt, never counts.
    redis_client.delete(KEYS.lease(other.run_id))
    assert n1.finish_many([late], late=True) == [FinishResult(False)]


def test_replace_runs_of_one_tick_do_not_take_the_waiting_place_from_each_other(
        redis_client: redis.Redis, setup: Setup) -> None:
    """A fan-out under replace whose runs share one lock: same scheduled time. The review
    found B and C taking the waiting place in turn, each asking the holder to stop again."""
    q, n1, n2 = setup
    fetch_one(q)
    tick = int(T0.timestamp() * 1000) + 50_000
    runs = [Run.for_tick("j", T0 + timedelta(seconds=50), {"app": a}) for a in "abc"]
    RedisSink(redis_client, KEYS).apply(TickBatch([(r, "default") for r in runs],
                                                  {"j": T0 + timedelta(seconds=50)}),
                                        Fence(0, 1))
    a, b, c = (RunRef(d.payload and json.loads(d.payload)["run_id"] or "", "j", tick,
                      d.queue, d.payload or b"", d.entry_id, overlap="replace", lock_name="j")
               for d in q.fetch(["default"], 3, 100))
    assert n1.begin(a, "ta", 5000, 1).verdict == "start"
    assert n2.begin(b, "tb", 5000, 2).verdict == "wait"
    assert n2.begin(c, "tc", 5000, 3).verdict == "skipped"  # B keeps the waiting place
    assert redis_client.get(KEYS.waiting("j")) == b.run_id.encode()


def test_retry_goes_to_the_delayed_set_and_attempts_count_up(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    ref = ref_of(fetch_one(q))
    n1.begin(ref, "t1", 5000, 1)
    assert n1.finish(ref, "t1", "retrying", 2, {"exit_code": "1"}, retry_at_ms=5)
    assert n1.promote(now_ms=4) == 0 and n1.promote(now_ms=5) == 1
    again = ref_of(fetch_one(q))
    assert n1.begin(again, "t2", 5000, 6).attempt == 2


def test_dead_run_leaves_a_dead_letter_with_its_payload(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    ref = ref_of(fetch_one(q))
    n1.begin(ref, "t1", 5000, 1)
    n1.finish(ref, "t1", "dead", 2, {"error": "exit 3"})
    [(_, fields)] = redis_client.xrange(KEYS.dead)
    assert fields[b"reason"] == b"retries exhausted" and fields[b"payload"] == ref.payload


@pytest.mark.parametrize(("fields", "said"), [
    ({"exit_code": "3", "signal": "", "timed_out": "0"}, b"exit code 3"),
    ({"exit_code": "", "signal": "9", "timed_out": "0"}, b"killed by signal 9"),
    ({"exit_code": "", "signal": "15", "timed_out": "1"}, b"timed out"),
])
def test_a_dead_letter_says_how_the_last_attempt_ended(
        redis_client: redis.Redis, setup: Setup, fields: dict[str, str], said: bytes) -> None:
    """`cronsul dlq list` shows the error column: a job that exited non-zero has no error
    text of its own, so the letter says how it ended rather than nothing."""
    q, n1, _ = setup
    ref = ref_of(fetch_one(q))
    n1.begin(ref, "t1", 5000, 1)
    n1.finish(ref, "t1", "dead", 2, fields)
    [(_, letter)] = redis_client.xrange(KEYS.dead)
    assert letter[b"error"] == said


def test_priority_fetch_reads_lower_queues_only_when_higher_are_empty(
        redis_client: redis.Redis) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["critical", "batch"])
    redis_client.xadd(KEYS.stream("batch"), {"p": b"b"})
    redis_client.xadd(KEYS.stream("critical"), {"p": b"c"})
    assert [d.queue for d in q.fetch(["critical", "batch"], 5, 100)] == ["critical"]
    assert [d.queue for d in q.fetch(["critical", "batch"], 5, 100)] == ["batch"]
    redis_client.xadd(KEYS.stream("batch"), {"p": b"b2"})
    assert q.fetch(["critical", "batch"], 5, 100, per_queue={"batch": 0}) == []


def test_dead_letter_keeps_reason_and_payload_and_acks(redis_client: redis.Redis) -> None:
    q = RedisQueue(redis_client, KEYS, "n1")
    q.ensure_groups(["default"])
    redis_client.xadd(KEYS.stream("default"), {"p": b"\xff not json"})
    d = fetch_one(q)
    q.dead_letter(d, "undecodable", "Expecting value")
    [(_, fields)] = redis_client.xrange(KEYS.dead)
    assert fields[b"reason"] == b"undecodable"
    assert fields[b"payload"] == b"\xff not json"
    assert pending(redis_client) == 0


def three_deliveries(redis_client: redis.Redis, q: RedisQueue) -> list[Delivery]:
    RedisSink(redis_client, KEYS).apply(batch(1, 2), Fence(0, 2))
    got = q.fetch(["default"], 3, 100)
    assert len(got) == 3
    return got


def test_a_run_whose_keys_are_broken_fails_alone_in_a_begin_batch(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    refs = [ref_of(d) for d in three_deliveries(redis_client, q)]
    redis_client.set(KEYS.run(refs[1].run_id), "not a hash")  # something else wrote its record
    results = n1.begin_many([(r, f"t{i}") for i, r in enumerate(refs)], 5000, 1)
    assert [r.verdict for r in results] == ["start", "error", "start"]
    assert results[1].detail.startswith("WRONGTYPE")
    assert [n1.record(r.run_id)["state"] for r in (refs[0], refs[2])] == ["running", "running"]


def test_a_run_whose_keys_are_broken_fails_alone_in_a_finish_batch(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    refs = [ref_of(d) for d in three_deliveries(redis_client, q)]
    n1.begin_many([(r, f"t{i}") for i, r in enumerate(refs)], 5000, 1)
    redis_client.delete(KEYS.run(refs[1].run_id))
    redis_client.set(KEYS.run(refs[1].run_id), "not a hash")
    results = n1.finish_many([Finished(r, f"t{i}", "succeeded", 2, {"exit_code": "0"})
                              for i, r in enumerate(refs)])
    assert [bool(r) for r in results] == [True, False, True]
    assert results[1].error.startswith("WRONGTYPE") and not results[0].error
    # The others are recorded and acked; the broken one is neither: it stays pending (and
    # leased) for begin to find broken once its lease lapses.
    assert [n1.record(r.run_id)["state"] for r in (refs[0], refs[2])] == ["succeeded"] * 2
    assert pending(redis_client) == 1
    assert redis_client.exists(KEYS.lease(refs[1].run_id))


def test_a_server_error_still_fails_the_whole_batch_and_writes_nothing(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    refs = [ref_of(d) for d in three_deliveries(redis_client, q)]
    redis_client.config_set("maxmemory", "1")
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            n1.begin_many([(r, f"t{i}") for i, r in enumerate(refs)], 5000, 1)
    finally:
        redis_client.config_set("maxmemory", "0")
    assert not any(redis_client.exists(KEYS.lease(r.run_id)) for r in refs)
    assert [r.verdict for r in n1.begin_many([(r, "t") for r in refs], 5000, 1)] == ["start"] * 3


def test_a_corrupt_attempt_counter_fails_the_run_before_anything_is_written(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    ref = ref_of(fetch_one(q), overlap="skip", lock_name="j")
    redis_client.hset(KEYS.run(ref.run_id), "attempt", "x")
    begun = n1.begin(ref, "t1", 60_000, 1)
    assert begun.verdict == "error" and "attempt = x" in begun.detail
    # Neither its lease nor the job's overlap lock is held by the run that never started.
    assert not redis_client.exists(KEYS.lease(ref.run_id), KEYS.lock("j"))


def test_a_broken_history_index_does_not_fail_the_record(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, _ = setup
    ref = ref_of(fetch_one(q))
    n1.begin(ref, "t1", 5000, 1)
    redis_client.set(KEYS.history(ref.job), "not a sorted set")
    result = n1.finish(ref, "t1", "succeeded", 2, {"exit_code": "0"})
    assert result.recorded and not result.error
    assert n1.record(ref.run_id)["state"] == "succeeded" and pending(redis_client) == 0


def test_a_run_held_elsewhere_is_busy_even_if_its_record_is_broken(
        redis_client: redis.Redis, setup: Setup) -> None:
    q, n1, n2 = setup
    ref = ref_of(fetch_one(q))
    assert n1.begin(ref, "t1", 60_000, 1).verdict == "start"
    redis_client.delete(KEYS.run(ref.run_id))
    redis_client.set(KEYS.run(ref.run_id), "not a hash")
    assert n2.begin(ref, "t2", 60_000, 2).verdict == "busy"  # left to its holder


def test_a_failed_save_fails_the_whole_call_for_the_caller_to_retry(tmp_path: Path) -> None:
    """MISCONF (Redis cannot persist, stop-writes-on-bgsave-error) is the server's error, not a
    run's: taking it for one would drop every run of the batch from the retry loop, let its
    lease lapse, and run it again elsewhere."""
    server = RedisServer(tmp_path / "redis", extra=("--enable-protected-configs", "yes")).start()
    try:
        r = server.client()
        RedisSink(r, KEYS).apply(batch(0), Fence(0, 1))
        q = RedisQueue(r, KEYS, "n1")
        q.ensure_groups(["default"])
        n1 = RunState(r, KEYS, "n1", 3600)
        ref = ref_of(fetch_one(q))
        assert n1.begin(ref, "t1", 60_000, 1).verdict == "start"
        gone = tmp_path / "gone"
        gone.mkdir()
        r.config_set("save", "3600 1")  # stop-writes-on-bgsave-error needs save points
        r.config_set("dir", str(gone))
        r.config_set("stop-writes-on-bgsave-error", "yes")
        shutil.rmtree(gone)
        r.bgsave()
        wait_until(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err", 10,
                   what="the background save to fail")
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            n1.finish(ref, "t1", "succeeded", 2, {"exit_code": "0"})
        assert n1.record(ref.run_id)["state"] == "running"  # nothing written
        r.config_set("dir", str(tmp_path / "redis"))
        r.bgsave()
        wait_until(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "ok", 10,
                   what="a good save")
        assert n1.finish(ref, "t1", "succeeded", 3, {"exit_code": "0"}).recorded
    finally:
        server.stop()


def test_run_records_live_as_long_as_the_configured_retention(
        redis_client: redis.Redis, tmp_path: Path) -> None:
    """[worker] history_retention sets how long records live: the sink's enqueue used a fixed
    7 days, so a shorter retention changed nothing (a per-second fan-out of 20 keeps ~24 GB
    of records for 7 days)."""
    from worker.config import load_config
    from worker.opcmds import enqueue_manual

    RedisSink(redis_client, KEYS, timedelta(hours=2)).apply(batch(1), Fence(0, 1))
    ttl = redis_client.ttl(KEYS.run(Run.for_tick("j", T0 + timedelta(seconds=1)).run_id))
    assert 7000 < ttl <= 7200, ttl
    path = tmp_path / "c.toml"
    port = redis_client.connection_pool.connection_kwargs["port"]
    path.write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}"\n'
                    '[worker]\nhistory_retention = "3h"\n'
                    '[jobs.j]\nschedule = "@daily"\ncommand = ["true"]\n')
    cfg = load_config(path)
    run_id = enqueue_manual(cfg, redis_client, "j", {})
    assert 10_000 < redis_client.ttl(KEYS.run(run_id)) <= 3 * 3600


def test_a_record_that_expired_mid_run_is_not_made_anew_for_ever(
        redis_client: redis.Redis, setup: Setup) -> None:
    """A retention shorter than a run: finish writes the record again, with a TTL."""
    q, _, _ = setup
    n1 = RunState(redis_client, KEYS, "n1", 3600)
    ref = ref_of(fetch_one(q))
    assert n1.begin(ref, "t1", 60_000, 1).verdict == "start"
    redis_client.delete(KEYS.run(ref.run_id))  # it expired while the run ran
    assert n1.finish(ref, "t1", "succeeded", 2, {"exit_code": "0"})
    assert 3500 < redis_client.ttl(KEYS.run(ref.run_id)) <= 3600
