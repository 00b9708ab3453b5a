"""Every node's consumer: fetch runs, claim them, execute, record, ack; renew leases meanwhile."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from queue import Empty, SimpleQueue
from typing import Any

import redis
import structlog

from scheduler.clock import Clock
from scheduler.errors import MessageError, NotRunnableHere
from scheduler.runs import epoch_ms, from_epoch_ms, iso_utc
from worker.config import Config, JobSpec
from worker.executor import (
    OUTPUT_LIMIT,
    Execution,
    Outcome,
    account_of,
    identity_error,
    identity_of,
    job_environment,
    root_refusal,
    seal_inherited_fds,
)
from worker.live import LivePublisher, LiveRun
from worker.messages import (
    SCHEDULED_AHEAD_MAX,
    RunMessage,
    parse_message,
    payload_field,
    payload_params,
)
from worker.metrics import RunHooks
from worker.notify import Notice, Notifier
from worker.params import render_argv
from worker.pyjobs import PyExecution, PythonPool
from worker.queue import Delivery
from worker.reactor import Reactor
from worker.runstate import Finished, FinishResult, RunRef, RunState, kept_attempt
from worker.transport import Transport
from worker.watchdog import TOKEN_ENV, Watchdog

# RunState.renew results.
LOST, RENEWED, STOP_REQUESTED, OPERATOR_STOPPED = 0, 1, 2, 3
# How long one XREADGROUP blocks; bounds how long shutdown waits for the fetch loop.
FETCH_BLOCK_MS = 1000
# Recording a result is retried through a Redis restart with this backoff, bounded by the lease.
FINISH_RETRY_FIRST_S = 0.1
FINISH_RETRY_MAX_S = 1.0
# Delayed runs (retries, runs waiting for an overlap lock) are promoted this often.
PROMOTE_EVERY_S = 0.5
# While runs are in flight and fewer than 1/REFILL_DIVISOR of the slots are free, the fetch
# loop waits up to REFILL_WAIT_S for more to free up before it fetches.
REFILL_DIVISOR = 2
REFILL_WAIT_S = 0.1
# Results are recorded at most this often: an idle node records a result at once, a busy one
# gathers the results of this long into one script call.
FINISH_EVERY_S = 0.001
# At shutdown, how long closing waits for the reactor and for the last results to be recorded.
CLOSE_WAIT_S = 5.0
# After the kill grace of runs stopped at shutdown: time for their KILL, reaping and output
# drain to reach the consumer before the watchdog kills whatever is left.
STOP_SETTLE_S = 1.0
# A run this node's config cannot run (an unknown job, an undeclared parameter: see
# NotRunnableHere) is handed back, queued again HAND_BACK_DELAY_S later for any node, while it
# was scheduled less than HAND_BACK_WINDOW_S ago: a config change rolled out one node at a time
# leaves nodes disagreeing for minutes, and a run must reach one that knows its job, not the
# dead letters. After the window (the job was removed, or never existed) it is dead-lettered.
HAND_BACK_DELAY_S = 5.0
HAND_BACK_WINDOW_S = 600.0
# The level of a run's canonical line (run_finished) by its state: what failed is a warning
# (journalctl -p warning shows it), what is dead (retries exhausted) an error.
LOG_LEVEL_OF = {"succeeded": "info", "skipped": "info", "retrying": "warning",
                "failed": "warning", "lost": "warning", "dead": "error"}
# Results Redis could not take before their leases lapsed are recorded late (if nobody took
# the runs over meanwhile) for up to this long; a longer outage drops them (logged, counted).
LATE_FINISH_MAX_S = 600.0
# Most results one ``finish`` script call records: bounds the script's run time (Redis serves
# nobody else meanwhile) while a busy node still records many results per round trip.
FINISH_BATCH_MAX = 256


@dataclass(eq=False)
class _Active:
    delivery: Delivery
    msg: RunMessage
    job: JobSpec
    ref: RunRef
    token: str
    attempt: int
    execution: Execution | PyExecution
    renewed_at: float  # monotonic time the last successful lease write was sent
    start_lag_ms: int  # claimed (ms since the epoch) - scheduled
    refusal: str | None = None  # why it must not start (recorded as a failed attempt)
    identity: dict[str, Any] | None = None  # command jobs: the user to run as, resolved
    account: dict[str, str] | None = None  # and that user's HOME, USER, LOGNAME, SHELL
    replaced: bool = False  # stopped: by a newer run (replace), or an operator (stopped_by)
    stopped_by: str | None = None  # `cronsul stop`: who and why
    stopped_at_shutdown: bool = False  # ended by the agent's shutdown: not recorded (on_lost)
    outcome: Outcome | None = None
    began: float | None = None  # monotonic time it was started (reactor), for live output


def why_failed(outcome: Outcome) -> str | None:
    """How a run that failed without an error text ended, as its dead letter says it."""
    if outcome.timed_out:
        return "timed out" + (f" (killed by signal {outcome.signal})" if outcome.signal else "")
    if outcome.signal:
        return f"killed by signal {outcome.signal}"
    if outcome.exit_code not in (None, 0):
        return f"exit code {outcome.exit_code}"
    return None


class Consumer:
    """Fetch runs, claim them, execute, record, ack.

    Threads: the fetch loop (:meth:`run`) claims the runs of one fetch with one ``begin``
    script call and starts them; each run executes on a run thread; the finisher records the
    results that are ready with one ``finish`` script call, then writes each run's log line.
    A busy node therefore pays two Redis round trips per batch of runs, not per run."""

    def __init__(self, cfg: Config, queue: Transport, runs: RunState, watchdog: Watchdog,
                 clock: Clock) -> None:
        self._cfg = cfg
        self._q = queue
        self._runs = runs
        self._watchdog = watchdog
        self._clock = clock
        self._node = cfg.agent.node
        self._vis_s = cfg.worker.visibility_timeout.total_seconds()
        self._lease_ms = int(self._vis_s * 1000)
        # The watchdog kills this node's jobs this long before their leases could lapse (see
        # _trusted_until).
        self._margin_s = self._vis_s / 6
        self._inflight = 0  # fetched and not yet finished (includes claims in progress)
        self._slot_freed = threading.Event()
        # The agent's environment does not change while it runs: read os.environ once, not
        # once per run (each os.environ lookup re-encodes; it showed up in profiles).
        self._agent_env = dict(os.environ)
        self._watchdog_sent: float | None = None  # the deadline the watchdog last got
        self._per_queue: dict[str, int] = {}  # in flight per queue, for queue_concurrency
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._ready: list[_Active] = []  # ended runs to record (reactor thread only)
        self._flushed_at = 0.0  # monotonic time of the last hand-over (reactor thread only)
        self._to_finish: SimpleQueue[list[_Active] | None] = SimpleQueue()
        self._finisher: threading.Thread | None = None
        seal_inherited_fds()  # jobs are started with posix_spawn, which closes nothing itself
        self._reactor = Reactor("run-reactor").start()
        watchdog.defer_writes(self._reactor.call_soon)
        self.accepting = threading.Event()
        self.accepting.set()
        # Held by the fetch loop from a fetch (or reclaim) until its runs are claimed and
        # handed to the reactor: drain() takes it after clearing ``accepting``, so runs a fetch
        # returns during a shutdown are counted in flight (and run) before drain looks, never
        # claimed after the reactor stopped.
        self._fetching = threading.Lock()
        self._closing = threading.Event()  # close() began: a late finish gives up
        self._py: PythonPool | None = None  # started on first use by a callable job
        self.hooks = RunHooks()  # metrics; the agent plugs its AgentMetrics in
        # Script calls and the runs they carried (logged at shutdown: how well batching works).
        self.batches = dict.fromkeys(("begin_calls", "begin_runs", "finish_calls",
                                      "finish_runs"), 0)
        self._log = structlog.get_logger("cronsul.run").bind(node=self._node)
        self._notifier = Notifier(cfg.notify, self._agent_env, self._node)
        self.live = LivePublisher(runs.client, runs.keys, clock, self._reactor,
                                  self._live_runs, self._log)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    def set_jobs(self, cfg: Config) -> None:
        self._cfg = cfg
        self._notifier.configure(cfg.notify)

    def renew_python(self) -> int:
        """Replace the warm Python processes (a reload): the next callable runs import the
        jobs' code afresh. The number of processes the pool keeps (0: no pool started)."""
        pool = self._py
        if pool is None:
            return 0
        pool.renew()
        return len(pool.pids())

    # -- fetch loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        queues = list(self._cfg.worker.queues)
        self._q.ensure_groups(queues)
        with self._lock:
            if self._finisher is None:
                self._finisher = threading.Thread(target=self._finish_loop, name="run-finisher",
                                                  daemon=True)
                self._finisher.start()
        if self.accepting.is_set() and not stop.is_set():  # in maintenance: on first use
            self._warm_python_pool(queues)
        next_reclaim = next_promote = 0.0
        refill_waited = False
        while not stop.is_set():
            if not self.accepting.is_set():
                stop.wait(0.2)
                continue
            try:
                free = self._free_slots()
                if self._clock.monotonic() >= next_reclaim and free > 0:
                    next_reclaim = self._clock.monotonic() + self._vis_s / 2
                    with self._fetching:
                        if not self.accepting.is_set():
                            continue
                        reclaimed = self._q.reclaim(queues, self._lease_ms, free)
                        for d in reclaimed:
                            self._log.info("run_reclaimed", entry_id=d.entry_id, queue=d.queue,
                                           run_id=payload_field(d.payload, "run_id"),
                                           deliveries=d.deliveries)
                        self._start(reclaimed)
                    free = self._free_slots()
                if self._clock.monotonic() >= next_promote:
                    next_promote = self._clock.monotonic() + PROMOTE_EVERY_S
                    self._runs.promote(epoch_ms(self._clock.now()))
                if free <= 0:
                    # Woken the moment a slot frees; the timeout only bounds a missed wake-up.
                    self._slot_freed.wait(1.0)
                    self._slot_freed.clear()
                    continue
                if free < self._refill_at() and not refill_waited:
                    # Runs are in flight and few slots are free: give the running ones up to
                    # REFILL_WAIT_S to free more (woken as soon as half are free), so that one
                    # fetch and one claim serve several runs; never longer, so a free slot does
                    # not idle while long runs hold the others.
                    refill_waited = True
                    self._slot_freed.wait(REFILL_WAIT_S)
                    self._slot_freed.clear()
                    continue
                refill_waited = False
                with self._fetching:
                    if not self.accepting.is_set():
                        continue
                    self._start(self._q.fetch(queues, free, FETCH_BLOCK_MS, self._queue_room()))
            except redis.RedisError as exc:
                self._log.warning("redis_error", error=str(exc)[:200])
                stop.wait(0.5)
            except Exception:  # a bug must not stop this node from consuming
                self._log.exception("fetch_loop_error")
                stop.wait(0.5)

    def _refill_at(self) -> int:
        """Free slots worth a fetch while runs are in flight (concurrency applies on reload)."""
        return max(1, self._cfg.worker.concurrency // REFILL_DIVISOR)

    def _free_slots(self) -> int:
        with self._lock:
            return self._cfg.worker.concurrency - self._inflight

    def _queue_room(self) -> dict[str, int] | None:
        limits = dict(self._cfg.worker.queue_concurrency)
        if not limits:
            return None
        with self._lock:
            return {q: n - self._per_queue.get(q, 0) for q, n in limits.items()}

    def _take_slots(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            self._inflight += len(deliveries)
            for d in deliveries:
                self._per_queue[d.queue] = self._per_queue.get(d.queue, 0) + 1

    def _free(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        with self._lock:
            full = self._inflight >= self._cfg.worker.concurrency
            self._inflight -= len(deliveries)
            for d in deliveries:
                self._per_queue[d.queue] -= 1
            # Wake the fetch loop when it waits for a first free slot or for a batch's worth
            # (see run), not on every run: a wake-up per run costs.
            wake = (full or self._inflight == 0
                    or self._cfg.worker.concurrency - self._inflight >= self._refill_at())
        if wake:
            self._slot_freed.set()

    # -- claiming and starting --------------------------------------------------------------

    def _start(self, deliveries: Sequence[Delivery]) -> None:
        """Claim the runs of one fetch with one ``begin`` call and start those we may run."""
        if not deliveries:
            return
        self._take_slots(deliveries)
        claims: list[tuple[Delivery, RunMessage, RunRef, str]] = []
        jobs = self._cfg.jobs
        now = self._clock.now()
        for d in deliveries:
            try:
                msg = parse_message(d.payload, jobs, now)
            except NotRunnableHere as exc:
                handed = self._hand_back(d, exc)
                if handed is None:  # Redis failed: it stays pending, to be reclaimed
                    self._free([d])
                elif not handed:
                    self._dead_letter(d, exc)
                continue
            except MessageError as exc:
                self._dead_letter(d, exc)
                continue
            try:
                job = jobs[msg.job]
                entry = d.entry_id if self._q.acks_with_record else ""
                ref = RunRef(msg.run_id, msg.job, epoch_ms(msg.scheduled_at), d.queue,
                             d.payload or b"", entry, job.overlap, job.lock_name(msg.params),
                             job.on_lost)
            except Exception as exc:  # a bug, not the message: still never keep its slot
                self._log.exception("run_unclaimable", entry_id=d.entry_id)
                self._dead_letter(d, MessageError(f"malformed: {type(exc).__name__}: {exc}"))
                continue
            # The lease's owner token: 128 random bits (uuid4 without the UUID object).
            claims.append((d, msg, ref, os.urandom(16).hex()))
        if not claims:
            return
        # Before the claim: once the leases are written, nothing slow may come before the runs
        # join _active (whose leases the heartbeat renews).
        try:
            prepared = {name: self._prepare(jobs[name])
                        for name in {m.job for _, m, _, _ in claims}}
        except Exception:  # unclaimed: they stay pending and come back; the slots are free
            self._free([d for d, *_ in claims])
            raise
        sent = self._clock.monotonic()
        now_ms = epoch_ms(self._clock.now())
        try:
            self.batches["begin_calls"] += 1
            self.batches["begin_runs"] += len(claims)
            results = self._runs.begin_many([(ref, token) for _, _, ref, token in claims],
                                            self._lease_ms, now_ms)
        except redis.RedisError:
            # The entries stay pending; another node (or we) reclaims them once idle.
            self._free([d for d, *_ in claims])
            raise
        if len(results) != len(claims):  # never expected: the script answers every run
            self._free([d for d, *_ in claims])
            raise redis.ResponseError(f"begin answered {len(results)} of {len(claims)} runs")
        started: list[_Active] = []
        not_started: list[Delivery] = []
        for (d, msg, ref, token), begun in zip(claims, results, strict=True):
            if begun.verdict == "error":
                # Its own keys are broken (e.g. something else wrote its record): it cannot be
                # run safely, so it goes where an operator sees why (`cronsul dlq retry` once
                # fixed), and the rest of the batch runs.
                self._dead_letter(d, MessageError(f"unrecordable: {begun.detail}"))
                continue
            if begun.verdict != "start":
                if begun.verdict != "busy" and not self._q.acks_with_record:
                    self._settle(d)
                self._not_started(ref, begun.verdict, begun.detail)
                not_started.append(d)
                continue
            job = jobs[msg.job]
            refusal, identity, account = prepared[msg.job]
            execution: Execution | PyExecution | None = None
            if job.callable is not None and refusal is None and self._py is not None:
                execution = self._py.execution(self._log.bind(run_id=msg.run_id))
            if execution is None:
                execution = Execution(self._watchdog, self._cfg.worker.kill_grace.total_seconds(),
                                      job.output_limit, log=self._log.bind(run_id=msg.run_id),
                                      reactor=self._reactor)
            started.append(_Active(d, msg, job, ref, token, begun.attempt, execution, sent,
                                   now_ms - ref.scheduled_ms, refusal, identity, account))
        self._free(not_started)
        if not started:
            return
        with self._lock:
            for a in started:
                self._active[a.ref.run_id] = a
        self._reactor.call_soon(self._launch, started)

    def _prepare(self, job: JobSpec
                 ) -> tuple[str | None, dict[str, Any] | None, dict[str, str] | None]:
        """Why a run of ``job`` must not start (recorded as a failed attempt), or None; and
        for a command job, the user to run as and its account variables (HOME, USER, ...).
        Looked up here, on the fetch thread, before
        the claim: a user lookup may wait on a directory service (LDAP, SSSD), and the pool
        may have to start, neither of which may hold up the reactor or a written lease."""
        refusal = root_refusal(job.user, job.allow_root, job.callable is not None,
                               os.geteuid())
        if refusal is not None:
            return refusal, None, None
        if job.callable is not None:
            try:
                self._python_pool()
            except Exception as exc:  # recorded as a failed attempt (retried if it may)
                return f"cannot start the python pool: {exc}", None, None
            return None, None, None
        try:
            return None, identity_of(job.user), account_of(job.user)
        except (KeyError, PermissionError) as exc:
            return identity_error(exc), None, None

    def _hand_back(self, d: Delivery, exc: NotRunnableHere) -> bool | None:
        """Queue a run this node cannot run again for the other nodes (see HAND_BACK_WINDOW_S);
        False when it is too old for that (it is dead-lettered); None when Redis failed (it
        stays pending and is reclaimed later: a transient error is no reason to dead-letter)."""
        when = payload_field(d.payload, "scheduled_at")
        try:
            scheduled_ms = epoch_ms(datetime.fromisoformat((when or "").replace("Z", "+00:00")))
        except (ValueError, TypeError):
            return False
        now_ms = epoch_ms(self._clock.now())
        run_id = payload_field(d.payload, "run_id") or ""
        ahead_ms = SCHEDULED_AHEAD_MAX.total_seconds() * 1000  # a sender's far future: the
        if (d.payload is None or now_ms - scheduled_ms > HAND_BACK_WINDOW_S * 1000  # window
                or scheduled_ms - now_ms > ahead_ms):  # would never end
            return False
        until = iso_utc(from_epoch_ms(scheduled_ms + int(HAND_BACK_WINDOW_S * 1000)))
        try:
            self._runs.hand_back(d.queue, d.payload, run_id,
                                 now_ms + int(HAND_BACK_DELAY_S * 1000),
                                 f"{self._node} cannot run it ({exc}); queued again for the "
                                 f"other nodes until {until}, then dead-lettered")
        except redis.RedisError as err:
            self._log.warning("run_redis_error", entry_id=d.entry_id, error=str(err)[:200])
            return None
        self._settle(d)  # a settle lost leaves a second copy, which begin runs at most once
        self._free([d])
        self._log.info("run_handed_back", entry_id=d.entry_id, queue=d.queue, run_id=run_id,
                       reason=str(exc), retry_in_s=HAND_BACK_DELAY_S, dead_letter_after=until)
        return True

    def _dead_letter(self, d: Delivery, exc: MessageError) -> None:
        reason = str(exc).split(":", 1)[0]
        try:
            self._q.dead_letter(d, reason, str(exc))
        except redis.RedisError as err:  # it stays pending and is dead-lettered when reclaimed
            self._log.warning("run_redis_error", entry_id=d.entry_id, error=str(err)[:200])
            return
        finally:
            self._free([d])
        try:
            ended = self._runs.dead_on_arrival(d.payload, str(exc), epoch_ms(self._clock.now()))
        except redis.RedisError as err:  # best effort: the dead letter itself is written
            ended = False
            self._log.warning("run_record_not_ended", entry_id=d.entry_id, error=str(err)[:200])
        self._log.error("run_dead_lettered", entry_id=d.entry_id, queue=d.queue,
                        reason=reason, error=str(exc), record_ended=ended)
        self.hooks.run_dead_lettered(reason)

    def _settle(self, d: Delivery) -> None:
        self._settle_many([d])

    def _settle_many(self, deliveries: list[Delivery]) -> None:
        """Tell a transport that does not ack with the record (SQS) that these runs are
        settled (SQS: DeleteMessageBatch). A failure leaves the messages to come back;
        ``begin`` then finds the runs done."""
        if not deliveries:
            return
        try:
            self._q.settle_many(deliveries)
        except Exception as exc:
            self._log.warning("run_settle_failed", entry_ids=[d.entry_id for d in deliveries],
                              error=str(exc)[:200])

    def _launch(self, batch: list[_Active]) -> None:
        """On the reactor thread: start the runs of one claim. A run whose lease may have
        lapsed since the claim (this node was frozen, SIGSTOP or a VM pause, between the claim
        and now) is not started: another node may have taken it over, even finished it."""
        now = self._clock.monotonic()
        for a in batch:
            try:
                job, msg, execution = a.job, a.msg, a.execution
                done = functools.partial(self._completed, a)
                if now >= self._trusted_until(a.renewed_at):
                    self._abandon(a, now - a.renewed_at)
                elif a.refusal is not None:  # recorded as a failed attempt; nothing is started
                    done(Outcome(None, None, False, 0.0, "", 0, a.refusal))
                elif isinstance(execution, PyExecution):
                    a.began = now
                    execution.start(job.callable or "", msg.params,
                                    self._environment(job, msg, a.attempt),
                                    job.timeout.total_seconds(), done,
                                    output_limit=min(job.output_limit, OUTPUT_LIMIT))
                else:
                    a.began = now
                    execution.start(render_argv(job.command, msg.params),
                                    self._environment(job, msg, a.attempt, a.account),
                                    job.working_dir,
                                    job.timeout.total_seconds(), job.user, done, a.identity)
            except Exception as exc:
                self._crashed(a, exc)
        # After the starts, off the enqueue-to-start path: the new jobs' track lines, the
        # watchdog's deadline (the leases were just written, so it is far off), the metrics.
        self._watchdog.flush()
        self._update_watchdog()
        for a in batch:
            self.hooks.run_started(a.msg.job)

    def _abandon(self, a: _Active, age_s: float) -> None:
        """Forget a claimed run without starting or recording it: no longer renewed, its
        lease lapses and it is taken over as if this node had died before starting it
        (``on_lost``); nothing it did can have happened, since it never started."""
        self._log.warning("run_start_too_late", job=a.msg.job, run_id=a.ref.run_id,
                          claimed_s_ago=round(age_s, 1))
        with self._lock:
            self._forget(a)
        self._free([a.delivery])

    def _crashed(self, a: _Active, exc: Exception) -> None:
        self._log.exception("run_handler_crashed", run_id=a.ref.run_id)
        self._completed(a, Outcome(None, None, False, 0.0, "", 0,
                                   f"cronsul crashed running it: {type(exc).__name__}: {exc}"))

    def _completed(self, a: _Active, outcome: Outcome) -> None:
        """On the reactor thread: a run ended. The results that arrive in one turn of the
        loop are recorded together, right after it."""
        if a.stopped_at_shutdown:  # not recorded: its lease lapses and it is taken over
            self._log.warning("run_stopped_at_shutdown", job=a.msg.job, run_id=a.ref.run_id,
                              exit_code=outcome.exit_code, signal=outcome.signal,
                              duration_ms=round(outcome.duration_s * 1000, 1))
            with self._lock:
                self._forget(a)
            self._free([a.delivery])
            return
        a.outcome = outcome
        self._ready.append(a)
        if len(self._ready) == 1:
            wait = self._flushed_at + FINISH_EVERY_S - time.monotonic()
            if wait > 0:
                self._reactor.loop.call_later(wait, self._flush)
            else:
                self._reactor.loop.call_soon(self._flush)

    # -- recording results ------------------------------------------------------------------

    def _flush(self) -> None:
        """Hand the results of the last millisecond to the finisher (one cross-thread step)."""
        self._flushed_at = time.monotonic()
        batch, self._ready = self._ready, []
        if batch:
            self._to_finish.put(batch)

    def _finish_loop(self) -> None:
        """The finisher thread: records results in batches (one script call each), so the
        reactor never waits on Redis."""
        closing = False
        while not closing:
            item = self._to_finish.get()
            if item is None:
                return
            batch = item
            while len(batch) < FINISH_BATCH_MAX:
                try:
                    more = self._to_finish.get_nowait()
                except Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.extend(more)
            for i in range(0, len(batch), FINISH_BATCH_MAX):
                try:
                    self._finish_batch(batch[i:i + FINISH_BATCH_MAX])
                except Exception:
                    self._log.exception("run_finisher_crashed", runs=len(batch))

    def _finish_batch(self, batch: list[_Active]) -> None:
        try:
            records = self._records(batch)
        except Exception:
            self._log.exception("run_finisher_crashed", runs=len(batch))
            records = [Finished(a.ref, a.token, "failed", epoch_ms(self._clock.now()),
                                _record_fields(Outcome(None, None, False, 0.0, "", 0,
                                                       "cronsul could not record the result")),
                                None, a.attempt)
                       for a in batch]
        # Still in _active: the heartbeat keeps the leases alive while the results are written.
        self.batches["finish_calls"] += 1
        self.batches["finish_runs"] += len(records)
        recorded: list[FinishResult] | None
        try:
            recorded = self._record(batch, records)
        except Exception as exc:
            # The entries stay pending; another node (or we) reclaims them once their leases
            # lapse, and runs them again: say so, and count it.
            for a in batch:
                self._log.error("run_result_dropped", job=a.msg.job, run_id=a.ref.run_id,
                                attempt=a.attempt, error=f"{type(exc).__name__}: {exc}"[:200],
                                detail="Redis stayed unreachable; the run will be taken over "
                                       "and run again")
                self.hooks.run_finished(a.msg.job, "error", (a.outcome.duration_s
                                                             if a.outcome else 0.0))
            recorded = None
        self._settle_batch(batch, records, recorded)

    def _records(self, batch: list[_Active]) -> list[Finished]:
        records: list[Finished] = []
        for a in batch:
            outcome = a.outcome or Outcome(None, None, False, 0.0, "", 0, "no outcome")
            state, retry_at = self._verdict(a.job, outcome, a.attempt, a.replaced)
            fields = _record_fields(outcome)
            if a.stopped_by is not None:
                fields["error"] = f"stopped by an operator (cronsul stop): {a.stopped_by}"
            elif a.replaced:
                fields["error"] = "stopped: replaced by a newer run (overlap = replace)"
            finished_ms = epoch_ms(self._clock.now())
            if state == "retrying":  # the next attempt's result must not replace this one's
                fields.update(kept_attempt(a.attempt, {
                    **fields, "state": state, "node": self._node, "finished_ms": str(finished_ms),
                    "started_ms": str(a.ref.scheduled_ms + a.start_lag_ms)}))
            records.append(Finished(a.ref, a.token, state, finished_ms, fields, retry_at,
                                    a.attempt))
        return records

    def _settle_batch(self, batch: list[_Active], records: list[Finished],
                      recorded: list[FinishResult] | None) -> None:
        try:
            self._report(batch, records, recorded)
        finally:
            self._free([a.delivery for a in batch])

    def _report(self, batch: list[_Active], records: list[Finished],
                recorded: list[FinishResult] | None) -> None:
        with self._lock:
            for a in batch:
                self._forget(a)
        self._update_watchdog()
        if recorded is not None and not self._q.acks_with_record:
            self._settle_many([a.delivery for a, ok in zip(batch, recorded, strict=True) if ok])
        for i, (a, rec) in enumerate(zip(batch, records, strict=True)):
            if recorded is None:
                continue
            ok, error = recorded[i].recorded, recorded[i].error
            outcome = a.outcome or Outcome(None, None, False, 0.0, "", 0, "no outcome")
            if error:
                # Its own keys are broken (e.g. something else wrote its record): nothing was
                # written for it (the script reads a run's keys before writing any), so it
                # stays pending and leased; once the lease lapses, begin finds the same keys
                # broken and dead-letters it: neither lost nor run again.
                self.hooks.run_finished(a.msg.job, "error", outcome.duration_s)
                self._log.error("run_unrecordable", job=a.msg.job, run_id=a.ref.run_id,
                                attempt=a.attempt, state=rec.state, redis_error=error[:500])
                continue
            state = rec.state if ok else "lost"
            self.hooks.run_finished(a.msg.job, state, outcome.duration_s)
            # A run replaced by a newer one (overlap = replace) did what the policy says: no
            # warning for it (it is recorded failed, and says why).
            level = ("info" if a.replaced and a.stopped_by is None
                     else LOG_LEVEL_OF.get(state, "warning"))
            why = rec.fields["error"] or (None if outcome.ok else why_failed(outcome))
            getattr(self._log, level)(
                "run_finished" if ok else "run_finished_lease_lost",
                job=a.msg.job, run_id=a.ref.run_id, attempt=a.attempt,
                scheduled_at=a.msg.scheduled_iso, state=state,
                exit_code=outcome.exit_code, signal=outcome.signal, timed_out=outcome.timed_out,
                duration_ms=round(outcome.duration_s * 1000, 1), start_lag_ms=a.start_lag_ms,
                output_bytes=outcome.output_bytes, error=why,
                retry_at=iso_utc(from_epoch_ms(rec.retry_at_ms)) if rec.retry_at_ms else None,
            )
            # Only the node that recorded the end notifies (a lost lease: the node that took
            # the run over will), and not for a run the replace policy stopped.
            if ok and a.job.notify and self._notifier.wants(state) \
                    and not (a.replaced and a.stopped_by is None):
                self._notifier.offer(Notice(
                    a.ref.run_id, a.msg.job, state, self._node, a.attempt,
                    a.msg.scheduled_iso, why or "", outcome.exit_code, outcome.signal,
                    outcome.timed_out, round(outcome.duration_s * 1000, 1), a.msg.params,
                    outcome.output))

    def _record(self, batch: list[_Active], records: list[Finished]) -> list[FinishResult]:
        """Record the results, retrying through a Redis outage (a restart, a failover, a hung
        server). Past the leases the results are recorded "late" (see FINISH): a run nobody
        took over meanwhile keeps its result (a drill saw a run that had finished during a
        45 s outage run again, its first result gone without a line); one taken over is
        reported lost. Gives up after LATE_FINISH_MAX_S, or when the consumer closes."""
        delay = FINISH_RETRY_FIRST_S
        late_until: float | None = None
        while True:
            late = late_until is not None
            try:
                return self._runs.finish_many(records, late=late)
            except redis.RedisError as exc:
                now = self._clock.monotonic()
                if late_until is None and (self._trusted_until(min(a.renewed_at
                                                                    for a in batch))
                                           - now) <= delay:
                    late_until = now + LATE_FINISH_MAX_S
                    self._log.warning("run_finish_late", runs=len(batch),
                                      error=str(exc)[:200],
                                      detail="Redis unreachable past the leases: recording "
                                             "the results once it answers, if nobody took "
                                             "the runs over meanwhile")
                if late_until is not None and (now >= late_until or self._closing.is_set()):
                    raise
                if late_until is None:
                    self._log.warning("run_finish_retry", runs=len(batch),
                                      error=str(exc)[:200])
                threading.Event().wait(delay)
                delay = min(delay * 2, FINISH_RETRY_MAX_S)

    def _python_pool(self) -> PythonPool:
        """The warm worker pool for callable jobs (fetch thread), started on first use.
        Not under ``_lock``: starting waits for the reactor, whose callbacks take ``_lock``."""
        if self._py is None:
            w = self._cfg.worker
            pool = PythonPool(min(w.python_workers or w.concurrency, w.concurrency),
                              watchdog=self._watchdog, reactor=self._reactor,
                              prefetch=w.python_prefetch,
                              max_rss_mb=w.python_max_memory_mb or None)
            pool.start()  # CronsulError: the caller records the run as a failed attempt
            self._py = pool
        return self._py

    def _warm_python_pool(self, queues: Sequence[str]) -> None:
        """Start the warm pool before the first fetch when a callable job runs on a queue this
        node serves, as Celery's prefork pool and huey's process workers start with the worker:
        the first runs after a start (or a failover) then do not wait for interpreters to
        boot, which takes 0.1-0.3 s with several processes on a small machine. A failure is
        logged and leaves the lazy start in place: the first callable run tries again, and
        records why it could not start if it still cannot."""
        served = set(queues)
        if not any(j.callable is not None and j.queue in served for j in self._cfg.jobs.values()):
            return
        began = self._clock.monotonic()
        try:
            pool = self._python_pool()
        except Exception as exc:
            self._log.warning("python_pool_start_failed", error=str(exc)[:500])
            return
        self._log.info("python_pool_started", workers=len(pool.pids()),
                       took_ms=round((self._clock.monotonic() - began) * 1000, 1))

    def _not_started(self, ref: RunRef, verdict: str, detail: str) -> None:
        events = {
            "done": "run_already_done",  # it finished; only the ack was lost (acked now)
            "busy": "run_busy_elsewhere",  # its lease is alive on another node: leave it
            "lost": "run_lost",  # its node died and on_lost = fail
            "skipped": "run_skipped",  # overlap: a previous run holds the lock
            "wait": "run_waiting",  # overlap = queue | replace: parked until the lock frees
        }
        if verdict not in ("skipped", "lost", "superseded"):
            self._log.info(events.get(verdict, "run_not_started"), job=ref.job,
                           run_id=ref.run_id, detail=detail)
            return
        # Ended here, never started: its record says skipped or failed, and it gets the same
        # canonical line as a run that ran. "superseded": a retry that a newer run made moot
        # (overlap = replace); its failed attempt stays its result.
        state = "skipped" if verdict == "skipped" else "failed"
        self.hooks.run_ended_unstarted(ref.job, state)
        error = (f"skipped for the overlap lock held or awaited by {detail or 'another run'}"
                 if state == "skipped" else
                 f"failed, not retried: superseded by the newer run {detail} (overlap = "
                 "replace)" if verdict == "superseded" else
                 "lost: its node stopped renewing its lease (on_lost = fail)")
        scheduled = iso_utc(from_epoch_ms(ref.scheduled_ms))
        getattr(self._log, LOG_LEVEL_OF[state])(
            "run_finished", job=ref.job, run_id=ref.run_id, attempt=None,
            scheduled_at=scheduled, state=state, exit_code=None, signal=None, timed_out=False,
            duration_ms=0.0, start_lag_ms=None, output_bytes=0, error=error, retry_at=None)
        job = self._cfg.jobs.get(ref.job)
        if verdict == "lost" and job is not None and job.notify:  # a superseded retry: policy
            self._notifier.offer(Notice(ref.run_id, ref.job, state, self._node, None,
                                        scheduled, error, params=payload_params(ref.payload)))

    def _verdict(self, job: JobSpec, outcome: Outcome, attempt: int,
                 replaced: bool) -> tuple[str, int | None]:
        """(state, retry due time in ms or None) for a finished attempt."""
        if outcome.ok:
            return "succeeded", None
        if replaced or job.retries == 0:
            return "failed", None
        if attempt > job.retries:
            return "dead", None
        base = job.retry_backoff.total_seconds() * (2 ** (attempt - 1))
        delay = min(job.retry_backoff_max.total_seconds(), base)
        # Full jitter on the upper half keeps a burst of failures from retrying in lockstep.
        delay *= 0.5 + random.random() / 2
        return "retrying", epoch_ms(self._clock.now()) + int(delay * 1000)

    def _environment(self, job: JobSpec, msg: RunMessage, attempt: int,
                     account: dict[str, str] | None = None) -> dict[str, str]:
        cronsul = {
            "CRONSUL_JOB": msg.job, "CRONSUL_RUN_ID": msg.run_id,
            "CRONSUL_SCHEDULED_AT": msg.scheduled_iso,
            "CRONSUL_ATTEMPT": str(attempt), "CRONSUL_NODE": self._node,
            TOKEN_ENV: self._watchdog.token,
        }
        cronsul.update({f"CRONSUL_PARAM_{k.upper()}": v for k, v in msg.params.items()})
        return job_environment(self._agent_env, job.env, cronsul, account)

    # -- live output (worker/live.py) --------------------------------------------------------

    def publish_live(self, stop: threading.Event) -> None:
        """The live-output thread: publishes what long runs print, once a second."""
        self.live.run(stop)

    def _live_runs(self, began_before: float) -> list[LiveRun]:
        """The runs started here no later than ``began_before`` (monotonic) still going."""
        with self._lock:
            return [LiveRun(a.ref.run_id, a.attempt, a.job.output_limit,
                            functools.partial(self._live_read, a))
                    for a in self._active.values()
                    if a.outcome is None and a.began is not None and a.began <= began_before]

    @staticmethod
    def _live_read(a: _Active, offset: int, cap: int) -> tuple[int, bytes] | None:
        """Reactor thread: ``a``'s output after ``offset``, or None once it has ended."""
        if a.outcome is not None or a.stopped_at_shutdown:
            return None
        return a.execution.live_output(offset, cap)

    # -- leases -----------------------------------------------------------------------------

    def heartbeat(self, stop: threading.Event) -> None:
        """Renew every active run's lease every visibility/3; stop runs whose lease was lost."""
        while not stop.wait(self._vis_s / 3):
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            active = list(self._active.values())
        if not active:
            self._update_watchdog(disarm_idle=True)
            return
        sent = self._clock.monotonic()
        try:
            results = self._runs.renew([(a.ref, a.token) for a in active], self._lease_ms)
            self._q.extend([a.delivery for a in active], self._vis_s)
        except redis.RedisError as exc:
            self._log.warning("lease_renew_failed", error=str(exc)[:200])
            return
        for a, result in zip(active, results, strict=True):
            if result == RENEWED:
                a.renewed_at = sent
            elif a.outcome is not None:
                # It ended: the finisher recorded it meanwhile (finish deletes the lease), or
                # will find out itself that the lease was lost (run_finished_lease_lost); a
                # stop request came too late to replace it.
                continue
            elif result in (STOP_REQUESTED, OPERATOR_STOPPED):
                a.renewed_at = sent
                if not a.replaced:
                    a.replaced = True  # not retried either way
                    if result == OPERATOR_STOPPED:
                        try:
                            a.stopped_by = self._runs.stop_reason(a.ref.run_id) or "no reason"
                        except redis.RedisError:
                            a.stopped_by = "no reason"
                        self._log.warning("run_stopped_by_operator", run_id=a.ref.run_id,
                                          reason=a.stopped_by)
                    else:
                        self._log.info("run_replaced", run_id=a.ref.run_id)
                    a.execution.stop()
            else:
                self._log.error("run_lease_lost", run_id=a.ref.run_id)
                a.execution.stop()
        self._update_watchdog()

    def _trusted_until(self, renewed_at: float) -> float:
        """Until when (monotonic) a lease written at ``renewed_at`` is surely still ours: its
        visibility timeout less the margin. Past it, a run is neither started (``_launch``)
        nor still running (the watchdog's deadline), nor its record retried (``_record``)."""
        return renewed_at + self._vis_s - self._margin_s

    def _forget(self, a: _Active) -> None:
        """Drop ``a`` from the active runs (under ``_lock``), only if it is still there: its
        run may have a newer attempt on this node by now (a late finish: this node reclaimed
        the run after Redis came back), which must stay renewed and watched."""
        if self._active.get(a.ref.run_id) is a:
            del self._active[a.ref.run_id]

    def _update_watchdog(self, disarm_idle: bool = False) -> None:
        """Keep the watchdog's kill deadline at (oldest running lease's renewal + visibility -
        margin) or earlier. Writes only when the deadline must move earlier (a safety matter)
        or is a third of the visibility timeout stale, so a busy node does not pay two pipe
        writes and a process wake-up per run. An idle node disarms from the heartbeat."""
        with self._lock:
            # Runs that ended (their results wait to be recorded, late perhaps) have nothing
            # left to kill: their stale renewals must not pull the deadline into the past.
            oldest = min((a.renewed_at for a in self._active.values() if a.outcome is None),
                         default=None)
            sent = self._watchdog_sent
            if oldest is None:
                if not disarm_idle or sent is None:
                    return
                self._watchdog_sent = None
                desired: float | None = None
            else:
                desired = self._trusted_until(oldest)
                if sent is not None and desired >= sent and desired - sent < self._vis_s / 3:
                    return
                self._watchdog_sent = desired
        self._watchdog.deadline(desired)

    def drain(self, timeout_s: float, kill_grace_s: float = 0.0) -> bool:
        """Stop taking runs; wait up to ``timeout_s`` for running ones. True when all finished.
        With ``kill_grace_s``, the runs still going then are stopped as a timeout stops one
        (TERM to the group, KILL after the grace, so a job can clean up) and not recorded:
        their leases lapse and another node takes them over (``on_lost``), as if this node
        had died, which is what a run cut short by a shutdown is."""
        self.accepting.clear()
        # A fetch under way (it blocks up to FETCH_BLOCK_MS) claims and starts what it got
        # first: those runs are this node's now, and run within the grace like the others.
        if self._fetching.acquire(timeout=FETCH_BLOCK_MS / 1000 + CLOSE_WAIT_S):
            self._fetching.release()
        deadline = self._clock.monotonic() + timeout_s
        while self._busy() and self._clock.monotonic() < deadline:
            threading.Event().wait(0.1)
        if not self._busy() or kill_grace_s <= 0:
            return not self._busy()
        with self._lock:
            left = list(self._active.values())
        self._log.warning("stopping_runs_at_shutdown", runs=[a.ref.run_id for a in left][:50],
                          count=len(left), kill_grace_s=kill_grace_s)
        # On the reactor, where runs end: one that ended by itself meanwhile is recorded.
        self._reactor.call_soon(self._stop_for_shutdown, left)
        deadline = self._clock.monotonic() + kill_grace_s + STOP_SETTLE_S
        while self._busy() and self._clock.monotonic() < deadline:
            threading.Event().wait(0.05)
        return False

    def _stop_for_shutdown(self, runs: list[_Active]) -> None:
        for a in runs:
            if a.outcome is None and not a.stopped_at_shutdown:
                a.stopped_at_shutdown = True
                a.execution.stop()

    def _busy(self) -> bool:
        with self._lock:
            return self._inflight > 0

    def close(self) -> None:
        """Record what has ended (a run that finished but was never recorded would run again
        elsewhere), then stop the Python pool and the reactor."""
        self._closing.set()
        # If the reactor is stuck or gone, those runs' leases lapse and they are reclaimed.
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._reactor.call(self._flush_ended, CLOSE_WAIT_S)
        self._to_finish.put(None)
        finisher = self._finisher
        if finisher is not None:
            finisher.join(CLOSE_WAIT_S)
        self._log.info("consumer_batches", **self.batches)
        self._notifier.close()
        if self._py is not None:
            self._py.stop()
        self._reactor.stop()

    def _flush_ended(self) -> None:
        if self._ready:
            self._flush()


def _text(value: str) -> str:
    """``value`` as valid UTF-8 (a job's output may carry lone surrogates, which Redis's
    encoder refuses): each offending character becomes U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:  # bytes decoded with surrogateescape (file names): the byte becomes U+FFFD
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _record_fields(o: Outcome) -> dict[str, str]:
    return {
        "exit_code": "" if o.exit_code is None else str(o.exit_code),
        "signal": "" if o.signal is None else str(o.signal),
        "timed_out": "1" if o.timed_out else "0",
        "duration_ms": str(round(o.duration_s * 1000, 1)),
        "output": _text(o.output),
        "output_bytes": str(o.output_bytes),
        "error": _text(o.error or ""),
    }
