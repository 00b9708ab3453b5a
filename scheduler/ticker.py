"""The leader's tick loop: due ticks -> one fenced batch -> Sink, with catch-up policies.

``TickLoop.tick(now, lease)`` is the whole loop body: it takes the time, returns the next
deadline, and never sleeps, so tests drive it with a fake clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

import structlog

from scheduler.errors import LeadershipLost
from scheduler.ports import CursorStore, EnqueueResult, Fence, Lease, Sink, TickBatch
from scheduler.runs import Run, iso_utc, param_key
from scheduler.schedule import Schedule, jitter_offset

CatchUp = Literal["all", "latest", "none"]

# With catchup = "none" a tick still counts as on time if the loop reaches it this late. The
# loop normally wakes within milliseconds of a deadline; two seconds absorbs a GC pause or a
# slow Redis round trip without turning a routine tick into a "missed" one.
ON_TIME_GRACE = timedelta(seconds=2)

# How many missed ticks of one job a single pass walks before it stops enumerating and jumps the
# cursor forward. A one-second job down for a day is 86,400 ticks: counting them one by one
# is cheap, a week of them is not worth the pass time.
MAX_SCAN_PER_JOB = 200_000

# When nothing is scheduled (every job paused or finished), look again after this long so that
# reloads and resumes are noticed even without a wake-up.
IDLE_WAKE = timedelta(seconds=30)

# A Jenkins H field (hashed from the job name): such expressions are per job, never shared.
HASHED = re.compile(r"(?<![A-Za-z])[Hh](?![A-Za-z])")

# Listed missed ticks per log line; the count is always exact.
MISSED_LISTED = 10


@dataclass(frozen=True)
class ScheduledJob:
    """The scheduler's view of a job: when it fires and how it fans out."""

    name: str
    schedule: Schedule
    queue: str = "default"
    catchup: CatchUp = "all"
    catchup_window: timedelta = timedelta(minutes=5)
    jitter: timedelta = timedelta(0)
    params: tuple[Mapping[str, str], ...] = ()

    @property
    def schedule_key(self) -> str:
        """What decides which ticks the job has: its expression and time zone."""
        return f"{self.schedule.expression}|{self.schedule.timezone}"

    def fire_at(self, tick: datetime) -> datetime:
        """When the tick is enqueued: delayed by the jitter for a job without parameters; a
        fan-out's tick is enqueued at once and its jitter spreads the parameter sets."""
        if not self.jitter or self.params:
            return tick
        return tick + jitter_offset(self.name, tick, self.jitter)

    def runs_at(self, tick: datetime) -> list[Run]:
        """The tick's runs: one, or one per parameter set, each with its own jittered start
        (hashed from the job, the parameter set and the tick), so a fan-out of hundreds of
        tenants does not start them all in the same instant."""
        if not self.params:
            return [Run.for_tick(self.name, tick)]
        runs = [Run.for_tick(self.name, tick, p) for p in self.params]
        if not self.jitter:
            return runs
        return [replace(r, not_before=tick + jitter_offset(f"{self.name}#{param_key(r.params)}",
                                                            tick, self.jitter))
                for r in runs]


@dataclass
class TickReport:
    """What one pass did, for logs and metrics."""

    enqueued: int = 0
    deduplicated: int = 0
    missed: int = 0
    skipped_paused: int = 0
    lags: list[float] = field(default_factory=list)  # seconds from fire time to enqueue


@dataclass
class _Pass:
    """One pass worked out for the time ``at``: what ``tick`` writes and logs when it runs it."""

    at: datetime
    next_deadline: datetime
    runs: list[tuple[Run, str]] = field(default_factory=list)
    fires: list[datetime] = field(default_factory=list)  # fire time of each kept tick
    cursors: dict[str, datetime] = field(default_factory=dict)
    adopted: dict[str, datetime] = field(default_factory=dict)  # jobs that had no cursor yet
    missed: int = 0
    skipped_paused: int = 0
    pause_logged: set[str] = field(default_factory=set)  # paused jobs whose skips it logs
    events: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)  # log lines
    # The catch-up decisions hold while now < valid_until (None: no kept tick can age out).
    valid_until: datetime | None = None
    batch: TickBatch | None = None  # the sink's prepared encoding (prepare only)

    def holds_at(self, now: datetime) -> bool:
        """Would a pass at ``now`` write exactly this? Yes while no further tick has come due
        (now < next_deadline) and no kept tick has aged out of its catch-up policy."""
        return (self.at <= now < self.next_deadline
                and (self.valid_until is None or now < self.valid_until))


class TickLoop:
    """Computes due ticks for every job and hands them to the Sink in one fenced batch."""

    def __init__(self, jobs: Sequence[ScheduledJob], sink: Sink, cursors: CursorStore) -> None:
        self._jobs: dict[str, ScheduledJob] = {j.name: j for j in jobs}
        self._sink = sink
        self._store = cursors
        self._cursors: dict[str, datetime] = {}
        # Jobs whose cursor exists only in memory (first seen this term): persisted with the next
        # batch, so a successor catches up from here even if no tick was due in between.
        self._unsaved: set[str] = set()
        self._fence: Fence | None = None
        # job -> (cursor it was computed from, the first tick after it): next_fire is the
        # loop's main cost with a thousand one-second jobs, so each is computed once.
        self._next: dict[str, tuple[datetime, datetime | None]] = {}
        self._shared: dict[tuple[str, str, datetime], datetime | None] = {}  # this pass only
        self._paused: frozenset[str] = frozenset()
        self._pause_logged: set[str] = set()  # paused jobs whose skipped ticks were logged
        # Schedules to record in <p>:schedules once the pass writing their (restarted) cursors
        # is in: written before it, a failed pass would leave the old cursor under the new
        # schedule, and the next term would back-fill from it after all.
        self._schedules_unsaved: dict[str, str] = {}
        # The next pass worked out ahead (prepare), and the deadline the last pass returned:
        # both None whenever something they were computed from changed (_changed).
        self._prepared: _Pass | None = None
        self._quiet_until: datetime | None = None
        self._log = structlog.get_logger("cronsul.ticker")
        self.last_report = TickReport()

    @property
    def jobs(self) -> Mapping[str, ScheduledJob]:
        return self._jobs

    def start_term(self, fence: Fence, now: datetime) -> None:
        """Begin a leadership term: adopt the fence and the cursors the last leader left."""
        self._fence = fence
        self._changed()
        stored = self._store.load_cursors(sorted(self._jobs))
        self._cursors = {}
        self._unsaved = set()
        for name in self._jobs:
            cursor = stored.get(name)
            if cursor is None:
                # A job never seen before starts now: it has no past ticks to catch up on.
                cursor = now
                self._unsaved.add(name)
            self._cursors[name] = cursor
        self._restart_changed_schedules(set(self._jobs), {}, now)

    def end_term(self) -> None:
        self._fence = None
        self._cursors = {}
        self._changed()

    def set_jobs(self, jobs: Sequence[ScheduledJob], now: datetime) -> None:
        """Apply a reloaded configuration without a restart and without double-firing a tick."""
        before = self._jobs
        self._jobs = {j.name: j for j in jobs}
        self._next = {}  # schedules may have changed
        self._changed()
        if self._fence is None:
            return
        stored = self._store.load_cursors([n for n in self._jobs if n not in self._cursors])
        cursors: dict[str, datetime] = {}
        for name in self._jobs:
            cursor = self._cursors.get(name) or stored.get(name)
            if cursor is None:
                cursor = now
                self._unsaved.add(name)
            cursors[name] = cursor
        self._cursors = cursors
        self._unsaved &= set(cursors)
        self._restart_changed_schedules(set(self._jobs), before, now)

    def _restart_changed_schedules(self, names: set[str], before: Mapping[str, ScheduledJob],
                                   now: datetime) -> None:
        """A job whose schedule changed (a reload here, or the last leader ran another config)
        starts its new schedule now: its cursor was kept under the old one, and catching up
        from it would run ticks the new schedule "had" before it existed (a daily job changed
        to every minute ran the last catchup_window of minutes at once, and logged hundreds
        of ticks missed)."""
        stored = self._store.load_schedules(sorted(names))
        changed = self._schedules_unsaved
        for name in sorted(names):
            key = self._jobs[name].schedule_key
            old = before[name].schedule_key if name in before else stored.get(name)
            if old is not None and old != key and name in self._cursors:
                self._log.info("schedule_changed", job=name, old=old, new=key,
                               cursor=self._cursors[name].isoformat(), starts=now.isoformat())
                self._cursors[name] = now
                self._unsaved.add(name)
                self._next.pop(name, None)
            if stored.get(name) != key:
                changed[name] = key  # saved with the next pass that writes the cursors

    def set_paused(self, paused: frozenset[str]) -> None:
        if paused != self._paused:
            self._paused = paused
            self._pause_logged &= paused  # a job paused again is logged again
            self._changed()

    def prepare(self, at: datetime) -> None:
        """Work out the pass due at ``at`` (normally the deadline ``tick`` just returned) ahead
        of time: runs, payloads and the sink's encoding, so that ``tick`` then only checks the
        lease and writes. Dropped when anything it was computed from changes (term, jobs,
        paused set, cursors); ``tick`` uses it only if a pass at its ``now`` would write the
        same."""
        if self._fence is None or (self._prepared is not None and self._prepared.at == at):
            return
        plan = self._plan(at)
        if plan.cursors:
            plan.batch = self._sink.prepare(TickBatch(plan.runs, plan.cursors))
        self._prepared = plan

    def tick(self, now: datetime, lease: Lease) -> datetime:
        """Enqueue every due tick, return when to call again. Raises LeadershipLost/FencedOff."""
        if self._fence is None:
            raise LeadershipLost("tick loop has no leadership term")
        if self._quiet_until is not None and now < self._quiet_until:
            # Nothing changed since the pass that returned this deadline, so nothing is due
            # before it: an early wake-up (the driver naps at most a second) writes nothing.
            self.last_report = TickReport()
            return self._quiet_until
        prepared, self._prepared, self._quiet_until = self._prepared, None, None
        plan = prepared if prepared is not None and prepared.holds_at(now) else self._plan(now)
        report = TickReport(missed=plan.missed, skipped_paused=plan.skipped_paused)
        for name, cursor in plan.adopted.items():
            self._cursors.setdefault(name, cursor)
        if plan.cursors:
            if not lease.valid():
                raise LeadershipLost("local lease expired before enqueue")
            result = self._sink.apply(plan.batch or TickBatch(plan.runs, plan.cursors),
                                      self._fence)
            self._cursors.update(plan.cursors)
            self._unsaved.clear()
            report.enqueued, report.deduplicated = result.enqueued, result.deduplicated
            if self._schedules_unsaved:  # the cursors they restarted are written now
                self._store.save_schedules(self._schedules_unsaved)
                self._schedules_unsaved = {}
        # Logged once the pass is written: a pass refused (a Redis error, the clock ahead) is
        # computed and logged again by the next one, which would repeat them every retry.
        for level, event, fields in plan.events:
            getattr(self._log, level)(event, **fields)
        self._pause_logged |= plan.pause_logged & self._paused
        report.lags = [(now - fire).total_seconds() for fire in plan.fires]  # after the writes
        self.last_report = report
        self._quiet_until = plan.next_deadline
        return plan.next_deadline

    def _changed(self) -> None:
        """Something a pass is computed from changed: forget the prepared pass and deadline."""
        self._prepared = None
        self._quiet_until = None

    def _plan(self, now: datetime) -> _Pass:
        """What a pass at ``now`` writes and logs; changes nothing but the next-tick caches."""
        self._shared = {}
        plan = _Pass(at=now, next_deadline=now + IDLE_WAKE)
        plan.cursors.update({n: self._cursors[n] for n in self._unsaved})
        for job in self._jobs.values():
            due, upcoming = self._due_ticks(job, now, plan)
            if upcoming is not None and upcoming < plan.next_deadline:
                plan.next_deadline = upcoming
            if not due:
                continue
            plan.cursors[job.name] = due[-1]
            if job.name in self._paused:
                plan.skipped_paused += len(due)
                # At info the first time in a pause, then at debug: a paused per-second job
                # would log a line a second (cronsul_ticks_total{outcome="skipped_paused"}
                # counts them all).
                level = "debug" if job.name in self._pause_logged else "info"
                plan.events.append((level, "ticks_skipped_paused", {
                    "job": job.name, "count": len(due), "first": iso_utc(due[0]),
                    "last": iso_utc(due[-1]),
                    **({} if level == "debug" else {
                        "detail": "the job is paused; further skips are counted in "
                                  "cronsul_ticks_total{outcome=\"skipped_paused\"}"})}))
                plan.pause_logged.add(job.name)
                continue
            keep, missed, until = self._admit(job, due, now)
            if until is not None and (plan.valid_until is None or until < plan.valid_until):
                plan.valid_until = until
            if missed:
                plan.missed += len(missed)
                plan.events.append(("warning", "ticks_missed", {
                    "job": job.name, "count": len(missed), "policy": job.catchup,
                    "catchup_window_s": job.catchup_window.total_seconds(),
                    "first": iso_utc(missed[0]), "last": iso_utc(missed[-1]),
                    "ticks": [iso_utc(t) for t in missed[:MISSED_LISTED]],
                }))
            for tick in keep:
                plan.runs.extend((run, job.queue) for run in job.runs_at(tick))
                plan.fires.append(job.fire_at(tick))
        return plan

    def _due_ticks(
        self, job: ScheduledJob, now: datetime, plan: _Pass
    ) -> tuple[list[datetime], datetime | None]:
        """Ticks after the cursor whose fire time has come, and the next fire time after them."""
        due: list[datetime] = []
        cursor = self._cursors.get(job.name)
        if cursor is None:
            cursor = plan.adopted[job.name] = now
        tick = self._next_after(job, cursor)
        while tick is not None:
            fire = job.fire_at(tick)
            if fire > now:
                return due, fire
            due.append(tick)
            if len(due) >= MAX_SCAN_PER_JOB:
                self._log.warning("missed_scan_truncated", job=job.name, scanned=len(due),
                                  resume_from=iso_utc(tick))
                return due, now
            tick = self._next_after(job, tick)
        return due, None

    def _next_after(self, job: ScheduledJob, cursor: datetime) -> datetime | None:
        cached = self._next.get(job.name)
        if cached is not None and cached[0] == cursor:
            return cached[1]
        # Jobs sharing an expression and zone share the answer (many crontab lines are the
        # same "*/5 * * * *"); a Jenkins H expression depends on the job name, so it cannot.
        expr = job.schedule.expression
        shared = None if HASHED.search(expr) else (expr, job.schedule.timezone, cursor)
        if shared is not None and shared in self._shared:
            tick = self._shared[shared]
        else:
            tick = job.schedule.next_fire(cursor)
            if shared is not None:
                self._shared[shared] = tick
        self._next[job.name] = (cursor, tick)
        return tick

    @staticmethod
    def _admit(
        job: ScheduledJob, due: list[datetime], now: datetime
    ) -> tuple[list[datetime], list[datetime], datetime | None]:
        """Split due ticks into (enqueue, missed) by the job's catch-up policy, and say until
        when (exclusive) the split stays the same: a kept tick only ever ages into a missed one."""
        def age(t: datetime) -> timedelta:
            return now - job.fire_at(t)

        if job.catchup == "none":
            keep = [t for t in due if age(t) <= ON_TIME_GRACE]
            limit = ON_TIME_GRACE  # kept while age <= grace: "until" errs one instant early
        elif job.catchup == "latest":
            keep = [due[-1]] if age(due[-1]) < job.catchup_window else []
            limit = job.catchup_window
        else:
            keep = [t for t in due if age(t) < job.catchup_window]
            limit = job.catchup_window
        until = min((job.fire_at(t) + limit for t in keep), default=None)
        if len(keep) == len(due):
            return keep, [], until
        kept = set(keep)
        return keep, [t for t in due if t not in kept], until


__all__ = ["CatchUp", "EnqueueResult", "ScheduledJob", "TickLoop", "TickReport"]
