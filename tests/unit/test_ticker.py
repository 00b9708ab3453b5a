"""The leader's tick loop, driven by a fake clock against an in-memory Sink (our own port)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from scheduler.clock import FakeClock
from scheduler.errors import FencedOff, LeadershipLost
from scheduler.ports import EnqueueResult, Fence, TickBatch
from scheduler.runs import Run
from scheduler.schedule import parse_schedule
from scheduler.ticker import ScheduledJob, TickLoop

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
PREPARED = "prepared by MemorySink"


class MemorySink:
    """Implements Sink + CursorStore with the same rules as the Redis script."""

    def __init__(self) -> None:
        self.highest = Fence(0, 0)
        self.claimed: dict[str, Run] = {}
        self.cursors: dict[str, datetime] = {}
        self.batches = 0
        self.prepared_applied = 0  # batches that came through prepare()
        self.schedules: dict[str, str] = {}

    def prepare(self, batch: TickBatch) -> TickBatch:
        return replace(batch, encoded=PREPARED)

    def apply(self, batch: TickBatch, fence: Fence) -> EnqueueResult:
        if fence < self.highest:
            raise FencedOff(f"fence {fence} < {self.highest}")
        self.highest = fence
        self.batches += 1
        self.prepared_applied += batch.encoded == PREPARED
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

    def load_schedules(self, jobs: Sequence[str]) -> Mapping[str, str | None]:
        return {j: self.schedules.get(j) for j in jobs}

    def save_schedules(self, schedules: Mapping[str, str]) -> None:
        self.schedules.update(schedules)


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


def test_a_pause_is_logged_at_info_once_then_at_debug() -> None:
    """A paused per-second job must not log a line a second (the metric counts the skips)."""
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())

    def levels(passes: int) -> list[str]:
        with capture_logs() as logs:
            for _ in range(passes):
                clock.advance(1)
                loop.tick(clock.now(), Lease())
        return [e["log_level"] for e in logs if e["event"] == "ticks_skipped_paused"]

    loop.set_paused(frozenset({"every-second"}))
    assert levels(3) == ["info", "debug", "debug"]
    loop.set_paused(frozenset())
    loop.set_paused(frozenset({"every-second"}))  # paused again: said again
    assert levels(2) == ["info", "debug"]


def test_fan_out_enqueues_one_run_per_parameter_set() -> None:
    clock, sink = FakeClock(T0), MemorySink()
    params = tuple({"app": f"app{i}"} for i in range(50))
    loop = TickLoop([job("fan", "* * * * * *", params=params)], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert len(sink.claimed) == 50
    assert all("#" in rid and rid.startswith("fan@") for rid in sink.claimed)


def test_a_fan_outs_jitter_spreads_its_parameter_sets_over_the_window() -> None:
    """A Jenkins team's per-tenant jobs each had H; as one fan-out with jitter, every tenant
    started in the same instant. Now the tick is enqueued on time and each parameter set gets
    its own not-before in [tick, tick + jitter), the same on every leader."""
    clock, sink = FakeClock(T0), MemorySink()
    params = tuple({"tenant": f"t{i}"} for i in range(200))
    spread = timedelta(seconds=60)
    fan = job("fan", "* * * * *", params=params, jitter=spread)
    loop = TickLoop([fan], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(60)
    loop.tick(clock.now(), Lease())  # enqueued at the tick itself, not up to 60 s later
    runs = list(sink.claimed.values())
    assert len(runs) == 200
    tick = T0 + timedelta(minutes=1)
    starts = [r.not_before for r in runs]
    assert all(s is not None and tick <= s < tick + spread for s in starts)
    offsets = sorted((s - tick).total_seconds() for s in starts if s is not None)
    assert offsets[-1] - offsets[0] > 50  # spread over the window, not bunched
    assert len(set(offsets)) > 190
    again = {r.run_id: r.not_before for r in fan.runs_at(tick)}  # another leader: the same
    assert again == {r.run_id: r.not_before for r in runs}


def test_a_job_without_parameters_keeps_its_jittered_fire_time() -> None:
    single = job("solo", "* * * * *", jitter=timedelta(seconds=60))
    tick = T0 + timedelta(minutes=1)
    assert single.fire_at(tick) > tick  # its enqueue is delayed, as before
    assert [r.not_before for r in single.runs_at(tick)] == [None]
    plain = job("fan", "* * * * *", params=({"a": "1"}, {"a": "2"}))
    assert [r.not_before for r in plain.runs_at(tick)] == [None, None]  # no jitter: at once


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


def test_a_schedule_changed_by_a_reload_starts_now_without_back_filling() -> None:
    """An hourly job changed to every minute: the minutes before the change are not ticks it
    had (a review saw them all run at once, within catchup_window)."""
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job("j", "0 * * * *")], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(180)
    loop.tick(clock.now(), Lease())
    changed_at = clock.now()
    loop.set_jobs([job("j", "* * * * *")], changed_at)
    clock.advance(125)
    loop.tick(clock.now(), Lease())
    fired = scheduled_seconds(sink, "j")
    assert fired and all(t > changed_at for t in fired), fired
    assert len(fired) == 2  # the two minutes since the change


def test_a_failed_pass_after_a_schedule_change_does_not_bring_the_back_fill_back() -> None:
    """The pass writing the restarted cursor fails (a Redis error), and the driver starts the
    term again from Redis: the schedule change must still be seen (a code review found the new
    schedule recorded before its cursor, so the retried term back-filled after all)."""
    clock, sink = FakeClock(T0), MemorySink()
    loop = TickLoop([job("j", "0 * * * *")], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    clock.advance(60)
    loop.tick(clock.now(), Lease())  # nothing due; the cursor is written (first seen)
    clock.advance(120)
    changed_at = clock.now()
    loop.set_jobs([job("j", "* * * * *")], changed_at)
    real_apply = sink.apply

    def broken(*args: object) -> object:
        raise ConnectionError("Redis went away")

    sink.apply = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        loop.tick(clock.now(), Lease())
    sink.apply = real_apply  # type: ignore[method-assign]
    loop.start_term(Fence(0, 1), clock.now())  # what the driver does after a Redis error
    clock.advance(65)
    loop.tick(clock.now(), Lease())
    fired = scheduled_seconds(sink, "j")
    assert fired and all(t > changed_at for t in fired), fired


def test_a_leader_with_another_schedule_for_a_job_starts_it_now() -> None:
    """The last leader kept the job's cursor under another schedule (a config roll, then a
    failover): the new leader does not back-fill its schedule from that cursor."""
    clock, sink = FakeClock(T0), MemorySink()
    old = TickLoop([job("j", "0 * * * *"), job("same", "* * * * *")], sink, sink)
    old.start_term(Fence(0, 1), clock.now())
    clock.advance(60)
    old.tick(clock.now(), Lease())
    old.end_term()
    clock.advance(185)  # a few minutes without a leader
    taken_at = clock.now()
    new = TickLoop([job("j", "* * * * *"), job("same", "* * * * *")], sink, sink)
    new.start_term(Fence(0, 2), taken_at)
    new.tick(clock.now(), Lease())
    assert scheduled_seconds(sink, "j") == []  # nothing back-filled for the changed job
    assert len(scheduled_seconds(sink, "same")) >= 4  # the unchanged one catches up as ever
    assert sink.schedules["j"] == "* * * * *|UTC"


# -- the next pass prepared ahead of its deadline ------------------------------------------------

def prepared_loop(*jobs: ScheduledJob) -> tuple[FakeClock, MemorySink, TickLoop, datetime]:
    """A loop that has run one pass at :00.3 and prepared the pass due at its deadline."""
    clock, sink = FakeClock(T0 + timedelta(milliseconds=300)), MemorySink()
    loop = TickLoop(list(jobs) or [job()], sink, sink)
    loop.start_term(Fence(0, 1), clock.now())
    deadline = loop.tick(clock.now(), Lease())
    loop.prepare(deadline)
    return clock, sink, loop, deadline


def test_prepared_pass_is_what_the_tick_writes() -> None:
    clock, sink, loop, deadline = prepared_loop(job(), job("other", "*/2 * * * * *"))
    assert deadline == T0 + timedelta(seconds=1)
    batches = sink.batches
    clock.advance(0.7 + 0.002)  # woke 2 ms after the deadline
    assert loop.tick(clock.now(), Lease()) == T0 + timedelta(seconds=2)
    assert (sink.batches, sink.prepared_applied) == (batches + 1, 1)
    assert scheduled_seconds(sink, "every-second") == [deadline]
    assert scheduled_seconds(sink, "other") == []
    assert loop.last_report.enqueued == 1
    assert loop.last_report.lags == [pytest.approx(0.002)]  # measured at the tick, not at prepare
    # The cursors moved: the next pass (:02) is computed from them, both jobs fire.
    loop.prepare(T0 + timedelta(seconds=2))
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 2
    assert scheduled_seconds(sink, "every-second") == [deadline, deadline + timedelta(seconds=1)]
    assert scheduled_seconds(sink, "other") == [T0 + timedelta(seconds=2)]


def test_early_wakeup_writes_nothing_and_keeps_the_prepared_pass() -> None:
    clock, sink, loop, deadline = prepared_loop()
    batches = sink.batches
    clock.advance(0.4)  # a nap ends before the deadline
    assert loop.tick(clock.now(), Lease()) == deadline
    assert sink.batches == batches and loop.last_report.enqueued == 0
    clock.advance(0.3)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 1
    assert scheduled_seconds(sink, "every-second") == [deadline]


def test_late_wakeup_does_not_use_a_prepared_pass_that_missed_ticks() -> None:
    clock, sink, loop, deadline = prepared_loop()
    clock.advance(2.2)  # :02.5: the :02 tick came due after the pass prepared for :01
    assert loop.tick(clock.now(), Lease()) == T0 + timedelta(seconds=3)
    assert sink.prepared_applied == 0
    assert scheduled_seconds(sink, "every-second") == [deadline, deadline + timedelta(seconds=1)]


def test_reload_drops_the_prepared_pass() -> None:
    clock, sink, loop, deadline = prepared_loop(job(), job("gone"))
    # Reloaded before the deadline: "every-second" now fires on even seconds, "gone" is gone,
    # "new" is added (it starts at the reload: its first tick is :01).
    loop.set_jobs([job("every-second", "*/2 * * * * *"), job("new")], clock.now())
    clock.advance(0.7)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0
    assert scheduled_seconds(sink, "every-second") == []
    assert scheduled_seconds(sink, "gone") == []
    assert scheduled_seconds(sink, "new") == [deadline]
    assert "gone" not in sink.cursors or sink.cursors["gone"] < deadline


def test_pause_and_resume_drop_the_prepared_pass() -> None:
    clock, sink, loop, _deadline = prepared_loop()
    loop.set_paused(frozenset({"every-second"}))
    clock.advance(0.7)
    with capture_logs() as logs:
        loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0 and sink.claimed == {}
    assert loop.last_report.skipped_paused == 1
    assert [e["event"] for e in logs] == ["ticks_skipped_paused"]
    # Prepared while paused (its pass would skip :02), resumed before :02: :02 is enqueued.
    with capture_logs() as logs:
        loop.prepare(T0 + timedelta(seconds=2))
    assert logs == []  # a prepared pass logs only when it is written
    loop.set_paused(frozenset())
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0
    assert scheduled_seconds(sink, "every-second") == [T0 + timedelta(seconds=2)]
    # The same paused set handed in again (the driver does so before every pass) keeps it.
    loop.prepare(T0 + timedelta(seconds=3))
    loop.set_paused(frozenset())
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 1


def test_term_change_drops_the_prepared_pass() -> None:
    clock, sink, loop, deadline = prepared_loop()
    # We lose leadership; another leader enqueues :01 and :02; we lead again later.
    loop.end_term()
    other = TickLoop([job()], sink, sink)
    other.start_term(Fence(0, 2), clock.now())
    clock.advance(1.7)
    other.tick(clock.now(), Lease())
    assert scheduled_seconds(sink, "every-second") == [deadline, deadline + timedelta(seconds=1)]
    loop.start_term(Fence(0, 3), clock.now())
    batches = sink.batches
    loop.tick(clock.now(), Lease())  # :02: the cursors from Redis say nothing is due
    assert sink.batches == batches and loop.last_report.deduplicated == 0
    clock.advance(1)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0 and sink.highest == Fence(0, 3)
    assert len(scheduled_seconds(sink, "every-second")) == 3


def test_no_prepare_without_a_term() -> None:
    clock, sink, loop, deadline = prepared_loop()
    loop.end_term()
    loop.prepare(deadline)
    loop.start_term(Fence(0, 2), clock.now())
    clock.advance(0.7)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0
    assert scheduled_seconds(sink, "every-second") == [deadline]


def test_prepared_catchup_decision_is_taken_again_at_the_tick() -> None:
    # catchup = "none": a tick is on time if at most 2 s late. Prepared when :10 was 1.9 s late,
    # written when it is 2.1 s late: it is missed, as an unprepared pass at that time decides.
    clock, sink = FakeClock(T0 + timedelta(seconds=11.9)), MemorySink()
    sink.cursors["ten-s"] = T0
    loop = TickLoop([job("ten-s", "*/10 * * * * *", catchup="none")], sink, sink)
    loop.start_term(Fence(0, 1), T0)
    loop.prepare(clock.now())
    clock.advance(0.2)
    loop.tick(clock.now(), Lease())
    assert sink.prepared_applied == 0 and sink.claimed == {}
    assert loop.last_report.missed == 1
    # Within the grace the prepared pass is used and enqueues the late tick.
    sink2 = MemorySink()
    sink2.cursors["ten-s"] = T0
    loop2 = TickLoop([job("ten-s", "*/10 * * * * *", catchup="none")], sink2, sink2)
    loop2.start_term(Fence(0, 1), T0)
    loop2.prepare(T0 + timedelta(seconds=11.5))
    loop2.tick(T0 + timedelta(seconds=11.8), Lease())
    assert sink2.prepared_applied == 1
    assert scheduled_seconds(sink2, "ten-s") == [T0 + timedelta(seconds=10)]


def test_expired_lease_refuses_the_prepared_pass_too() -> None:
    clock, sink, loop, _deadline = prepared_loop()
    clock.advance(0.7)
    with pytest.raises(LeadershipLost):
        loop.tick(clock.now(), Lease(ok=False))
    assert scheduled_seconds(sink, "every-second") == []
