"""The live-output publisher (worker/live.py) on a real redis-server and a real reactor, with a
fake clock: only runs going for LIVE_AFTER_S are published, in one pipeline a period, each
entry carrying its offset; what no longer fits is skipped with the offset saying so; a run
that ended leaves its stream to expire shortly."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from scheduler.clock import FakeClock
from worker.executor import OutputTail
from worker.keys import Keys
from worker.live import (
    LIVE_AFTER_S,
    LIVE_LINGER_MS,
    LIVE_TTL_MS,
    LIVE_WANT_MS,
    LivePublisher,
    LiveRun,
)
from worker.reactor import Reactor

KEYS = Keys("cronsul")


class FakeRun:
    """A run's output tail, fed by the test as the reactor would be, and when it began."""

    def __init__(self, run_id: str, began: float, limit: int = 1024) -> None:
        self.run_id, self.began, self.limit = run_id, began, limit
        self.tail = OutputTail(limit)
        self.ended = False

    def read(self, offset: int, cap: int) -> tuple[int, bytes] | None:
        return None if self.ended else self.tail.since(offset, cap)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("test-reactor").start()
    yield r
    r.stop()


def publisher(client: redis.Redis, clock: FakeClock, reactor: Reactor,
              runs: list[FakeRun]) -> LivePublisher:
    def source(began_before: float) -> list[LiveRun]:
        return [LiveRun(r.run_id, 1, r.limit, r.read) for r in runs
                if r.began <= began_before]

    return LivePublisher(client, KEYS, clock, reactor, source)


def follow(client: redis.Redis, *runs: FakeRun) -> None:
    """What `cronsul logs --follow` does while it watches a run."""
    for run in runs:
        client.set(KEYS.live_want(run.run_id), "1", px=LIVE_WANT_MS)


def entries(client: redis.Redis, run_id: str) -> list[tuple[int, bytes]]:
    got: Any = client.xrange(KEYS.live(run_id, 1))
    return [(int(f[b"o"]), f[b"d"]) for _, f in got]


def test_only_runs_going_a_while_are_published_with_offsets(
        redis_client: redis.Redis, reactor: Reactor) -> None:
    clock = FakeClock(datetime(2026, 11, 22, tzinfo=UTC))
    old = FakeRun("job@old", clock.monotonic())
    young = FakeRun("job@young", clock.monotonic() + 0.5)
    pub = publisher(redis_client, clock, reactor, [old, young])
    follow(redis_client, old, young)
    old.tail.feed(b"one\n")
    young.tail.feed(b"young\n")
    assert pub.publish_once() == 0  # nothing has been going LIVE_AFTER_S yet
    assert redis_client.keys("cronsul:live:*") == []

    clock.advance(LIVE_AFTER_S)
    assert pub.publish_once() == 1  # the young one is 0.5 s short still
    assert entries(redis_client, old.run_id) == [(0, b"one\n")]
    assert not redis_client.exists(KEYS.live(young.run_id, 1))
    assert 0 < redis_client.pttl(KEYS.live(old.run_id, 1)) <= LIVE_TTL_MS

    old.tail.feed(b"two\n")
    assert pub.publish_once() == 1
    assert pub.publish_once() == 0  # no new output: no entry (the TTL is renewed)
    assert entries(redis_client, old.run_id) == [(0, b"one\n"), (4, b"two\n")]


def test_output_beyond_the_cap_is_skipped_and_the_offset_says_so(
        redis_client: redis.Redis, reactor: Reactor) -> None:
    clock = FakeClock(datetime(2026, 11, 22, tzinfo=UTC))
    chatty = FakeRun("job@chatty", clock.monotonic(), limit=8)
    pub = publisher(redis_client, clock, reactor, [chatty])
    follow(redis_client, chatty)
    clock.advance(LIVE_AFTER_S)
    chatty.tail.feed(b"0123456789abcdef")  # 16 bytes, 8 kept per entry (output_limit)
    assert pub.publish_once() == 1
    assert entries(redis_client, chatty.run_id) == [(8, b"89abcdef")]


def test_a_run_that_ended_leaves_its_stream_to_expire_shortly(
        redis_client: redis.Redis, reactor: Reactor) -> None:
    clock = FakeClock(datetime(2026, 11, 22, tzinfo=UTC))
    run = FakeRun("job@ends", clock.monotonic())
    pub = publisher(redis_client, clock, reactor, [run])
    follow(redis_client, run)
    clock.advance(LIVE_AFTER_S)
    run.tail.feed(b"working\n")
    pub.publish_once()
    key = KEYS.live(run.run_id, 1)
    redis_client.pexpire(key, LIVE_TTL_MS * 10)  # to see the linger TTL replace it
    run.ended = True
    assert pub.publish_once() == 0
    assert 0 < redis_client.pttl(key) <= LIVE_LINGER_MS
    redis_client.pexpire(key, LIVE_TTL_MS * 10)
    pub.publish_once()  # forgotten: nothing more is written for it
    assert redis_client.pttl(key) > LIVE_LINGER_MS


def test_a_run_nobody_follows_is_not_published(redis_client: redis.Redis,
                                               reactor: Reactor) -> None:
    """A review filled 262 MB of Redis in 40 s with 100 chatty runs published for nobody."""
    clock = FakeClock(datetime(2026, 11, 22, tzinfo=UTC))
    watched, unwatched = (FakeRun(f"job@{n}", clock.monotonic()) for n in ("w", "u"))
    pub = publisher(redis_client, clock, reactor, [watched, unwatched])
    clock.advance(LIVE_AFTER_S)
    follow(redis_client, watched)
    for run in (watched, unwatched):
        run.tail.feed(b"line\n")
    assert pub.publish_once() == 1
    assert entries(redis_client, watched.run_id) == [(0, b"line\n")]
    assert not redis_client.exists(KEYS.live(unwatched.run_id, 1))
    follow(redis_client, unwatched)  # a follower that comes later gets what is kept
    assert pub.publish_once() == 1
    assert entries(redis_client, unwatched.run_id) == [(0, b"line\n")]
