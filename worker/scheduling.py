"""Runs the pure TickLoop while this node leads, with the fence and lease wired in."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
import structlog

from scheduler.clock import Clock
from scheduler.errors import ClockAhead, FencedOff, LeadershipLost
from scheduler.ports import Fence
from scheduler.runs import iso_utc
from scheduler.ticker import ScheduledJob, TickLoop, TickReport
from worker.controls import PauseWatcher
from worker.leadership import Elector, Term
from worker.sink import RedisSink

# Upper bound on one sleep of the loop, so a lease that lapses between ticks is noticed (and a
# term change picked up) even when the next tick is an hour away.
MAX_SLEEP_S = 1.0
# Pause after a Redis error before the next attempt.
REDIS_BACKOFF_S = 0.5
# While this leader's clock is ahead of Redis's, the refusal is logged this often (every pass
# is refused; one line a minute says it goes on).
CLOCK_LOG_EVERY_S = 60.0


class SchedulerDriver:
    def __init__(self, ticker: TickLoop, sink: RedisSink, elector: Elector, clock: Clock,
                 settle_s: float, pauses: PauseWatcher) -> None:
        self.ticker = ticker
        self._pauses = pauses
        self._skew_logged_at = float("-inf")
        self._sink = sink
        self._elector = elector
        self._clock = clock
        # How long any earlier leader's local lease can outlive its loss of the key; waited
        # out before raising the fence epoch after Consul's index went backwards.
        self._settle_s = settle_s
        self.wake = threading.Event()
        self._pending: list[ScheduledJob] | None = None
        self._log = structlog.get_logger("cronsul.scheduler")
        self.on_report: Callable[[TickReport], None] | None = None  # metrics, after each pass

    def run(self, stop: threading.Event) -> None:
        current: Term | None = None
        while not stop.is_set():
            pending, self._pending = self._pending, None
            if pending is not None:
                try:  # it reads (and may restart) cursors in Redis
                    self.ticker.set_jobs(pending, self._clock.now())
                except redis.RedisError as exc:
                    if self._pending is None:  # no newer reload came meanwhile: retry this
                        self._pending = pending
                    self._log.warning("redis_error", error=str(exc)[:200])
                    stop.wait(REDIS_BACKOFF_S)
                    continue
                self._log.info("schedules_reloaded", jobs=len(pending))
            term = self._elector.term
            lease = self._elector.lease
            # Until the paused set has been read once, a paused job could fire: wait for it.
            if term is None or not lease.valid() or not self._pauses.ready.is_set():
                if current is not None:
                    if term is current and not lease.valid():
                        # The elector has not noticed yet (it may be waiting on Consul), but
                        # this node schedules no more: say so now, or the logs show two
                        # leaders until it does.
                        self._log.warning("scheduler_stopped", reason="the leader's local "
                                          "lease ran out (Consul unconfirmed); another node "
                                          "may lead now")
                    self.ticker.end_term()
                    current = None
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            try:
                if term is not current:
                    fence = self._open_fence(term, stop)
                    if fence is None:
                        continue
                    self.ticker.start_term(fence, self._clock.now())
                    current = term
                    self._log.info("scheduler_started", fence=f"{fence.epoch}/{fence.index}",
                                   jobs=len(self.ticker.jobs))
                self.ticker.set_paused(frozenset(self._pauses.paused))
                deadline = self.ticker.tick(self._clock.now(), lease)
                self._report()
                # Build the next pass now, while there is time: at the deadline only the lease
                # check and the writes remain (dropped if jobs, pauses or the term change).
                self.ticker.prepare(deadline)
            except ClockAhead as exc:
                # Nothing was written and the cursors did not move: once the clock agrees the
                # waiting ticks are enqueued (late, by the catch-up policy), never early.
                now = self._clock.monotonic()
                if now >= self._skew_logged_at + CLOCK_LOG_EVERY_S:
                    self._skew_logged_at = now
                    self._log.error("clock_ahead", error=str(exc))
                stop.wait(REDIS_BACKOFF_S)
                continue
            except FencedOff as exc:
                self._log.error("fenced_off", error=str(exc))
                self._elector.shutdown()  # another leader has written: step down for good
                current = None
                continue
            except LeadershipLost as exc:
                self._log.warning("tick_refused", reason=str(exc))
                continue
            except redis.RedisError as exc:
                self._log.warning("redis_error", error=str(exc)[:200])
                # Redis may have lost writes (a failover promotes a replica that missed the
                # last ones): start the term again from the cursors Redis has now. A lost
                # enqueue is then re-enqueued (its claim was lost with it), never silently
                # skipped because our in-memory cursor had moved on.
                current = None
                stop.wait(REDIS_BACKOFF_S)
                continue
            sleep = (deadline - self._clock.now()).total_seconds()
            if sleep > 0:
                # Short naps keep a resume or pause effective within a fraction of a second.
                self.wake.wait(min(sleep, MAX_SLEEP_S))
                self.wake.clear()

    def reload(self, jobs: list[ScheduledJob]) -> None:
        """Hand new schedules to the loop thread; applied before its next pass."""
        self._pending = jobs
        self.wake.set()

    def _open_fence(self, term: Term, stop: threading.Event) -> Fence | None:
        fence = self._sink.open_fence(term.index)
        if fence is not None:
            return fence
        seen = self._sink.highest_fence()
        # Consul's state was lost or restored. Earlier leaders' fences are higher than ours,
        # but their leases ended at most settle_s after the loss, which came no later than the
        # first leader saw the index go back: wait out what remains of that while still
        # leading, then raise the epoch (CAS) so any of them still writing is refused. (The
        # leaders elected after the loss never wrote: their fences were below the highest.)
        # Timed from the first sighting, so a leader that loses the key during the wait does
        # not make its successor start the wait all over again.
        waited = self._sink.regression_seen(seen)
        wait = max(0.0, self._settle_s - waited)
        self._log.warning("consul_index_regressed", consul_index=term.index,
                          highest=f"{seen.epoch}/{seen.index}", settle_s=round(wait, 1),
                          first_seen_s_ago=round(waited, 1))
        if stop.wait(wait) or self._elector.term is not term:
            return None
        return self._sink.rebase_fence(seen, term.index)

    def _report(self) -> None:
        r = self.ticker.last_report
        if self.on_report is not None:
            self.on_report(r)
        if r.enqueued or r.deduplicated:
            self._log.info("ticks_enqueued", enqueued=r.enqueued, deduplicated=r.deduplicated,
                           max_lag_ms=round(max(r.lags, default=0.0) * 1000, 1),
                           at=iso_utc(self._clock.now()))
