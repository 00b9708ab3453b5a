"""The leader's tick loop, driven by a fake clock against an in-memory Sink (our own port)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.clock import FakeClock
from scheduler.errors import FencedOff, LeadershipLost
from scheduler.ports import EnqueueResult, Fence, TickBatch
from scheduler.runs import Run
from scheduler.schedule import parse_schedule
from scheduler.ticker import ScheduledJob, TickLoop

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


class MemorySink:
    """Implements Sink + CursorStore with the same rules as the Redis script."""

    def __init__(self) -> None:
        self.highest = Fence(0, 0)
        self.claimed: dict[str, Run] = {}
        self.cursors: dict[str, datetime] = {}
        self.batches = 0

    def apply(self, batch: TickBatch, fence: Fence) -> EnqueueResult:
        if fence < self.highest:
            raise FencedOff(f"fence {fence} < {self.highest}")
        self.highest = fence
        self.batches += 1
        enq = dup = 0
        for run, _queue in batch.runs:
            if run.run_id in self.claimed:
                dup += 1
            else:
                self.claimed[run.run_id] = run
                enq += 1
        for job, when in batch.cursors.items():
            if job not in self.cursors or when > self.cursors[job]:
                self.cursors[job] = when
        return EnqueueResult(enq, dup)

    def load_cursors(self, jobs: Sequence[str]) -> Mapping[str, datetime | None]:
        return {j: self.cursors.get(j) for j in jobs}


class Lease:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def valid(self) -> bool:
        return self.ok


def job(name: str = "every-second", expr: str = "* * * * * *", **kw: object) -> ScheduledJob:
    return ScheduledJob(name=name, schedule=parse_schedule(expr, job=name), **kw)  # type: ignore[arg-type]


def scheduled_seconds(sink: MemorySink, name: str) -> list[datetime]:
    return sorted(r.scheduled_at for r in sink.claimed.values() if r.job == name)


def test_each_second_enqueued_once_as_the_clock_moves() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 10), clock.now())
    for _ in range(10):
        clock.advance(1)
        loop.tick(clock.now(), Lease())
    assert scheduled_seconds(sink, "every-second") == [T0 + timedelta(seconds=i)
                                                        for i in range(1, 11)]


def test_next_deadline_is_the_next_fire_time() -> None:
    clock, sink = FakeClock(T0 + timedelta(milliseconds=300)), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    assert loop.tick(clock.now(), Lease()) == T0 + timedelta(seconds=1)


def test_new_leader_catches_up_from_the_cursor_without_duplicates() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    old = TickLoop([job()], sink, sink)
    old.start_term(Fence(0, 10), clock.now())
    clock.advance(3)
    old.tick(clock.now(), Lease())  # enqueues :01 :02 :03
    clock.advance(7)  # old leader dies; 7 s pass before the successor runs
    new = TickLoop([job()], sink, sink)
    new.start_term(Fence(0, 20), clock.now())
    new.tick(clock.now(), Lease())
    assert scheduled_seconds(sink, "every-second") == [T0 + timedelta(seconds=i)
                                                        for i in range(1, 11)]


def test_zombie_with_lower_fence_is_refused() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    zombie = TickLoop([job()], sink, sink)
    zombie.start_term(Fence(0, 10), clock.now())
    successor = TickLoop([job()], sink, sink)
    successor.start_term(Fence(0, 20), clock.now())
    clock.advance(1)
    successor.tick(clock.now(), Lease())
    clock.advance(1)
    with pytest.raises(FencedOff):
        zombie.tick(clock.now(), Lease())


def test_expired_lease_enqueues_nothing() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(2)
    with pytest.raises(LeadershipLost):
        loop.tick(clock.now(), Lease(ok=False))
    assert sink.claimed == {}


@pytest.mark.parametrize(
    ("policy", "expected_runs", "expected_missed"),
    [
        # Down for 2 h, window 30 min, a job every 10 minutes: 12 ticks are due.
        ("all", 3, 9),  # ticks younger than 30 min: -20, -10, 0 minutes
        ("latest", 1, 11),
        ("none", 1, 11),  # the tick due exactly now is on time; the rest are missed
    ],
)
def test_catchup_policies_after_full_outage(policy: str, expected_runs: int,
                                            expected_missed: int) -> None:
    clock, sink = FakeClock(T0), MemorySink()
    j = job("ten-min", "*/10 * * * *", catchup=policy, catchup_window=timedelta(minutes=30))
    first = TickLoop([j], sink, sink)
    first.start_term(Fence(0, 1), clock.now())
    first.tick(clock.now(), Lease())
    clock.advance(2 * 3600)  # the whole cluster is down for two hours
    second = TickLoop([j], sink, sink)
    second.start_term(Fence(0, 2), clock.now())
    second.tick(clock.now(), Lease())
    assert len(sink.claimed) == expected_runs
    assert second.last_report.missed == expected_missed
    assert sink.cursors["ten-min"] == clock.now()  # missed ticks are consumed, not retried


def test_paused_job_ticks_are_counted_not_enqueued() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    loop.set_paused(frozenset({"every-second"}))
    clock.advance(5)
    loop.tick(clock.now(), Lease())
    assert sink.claimed == {}
    assert loop.last_report.skipped_paused == 5


def test_fan_out_enqueues_one_run_per_parameter_set() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    params = tuple({"app": f"app{i}"} for i in range(50))
    loop = TickLoop([job("fan", "* * * * * *", params=params)], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert len(sink.claimed) == 50
    assert all("#" in rid and rid.startswith("fan@") for rid in sink.claimed)


def test_reload_keeps_cursors_so_no_tick_fires_twice() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(3)
    loop.tick(clock.now(), Lease())
    loop.set_jobs([job(), job("new-job", "*/2 * * * * *")], clock.now())
    clock.advance(2)
    loop.tick(clock.now(), Lease())
    assert sink.batches == 2
    assert len(scheduled_seconds(sink, "every-second")) == 5
    assert scheduled_seconds(sink, "new-job") == [T0 + timedelta(seconds=4)]
