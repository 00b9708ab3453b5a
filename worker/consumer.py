"""Every node's consumer: fetch runs, claim them, execute, record, ack; renew leases meanwhile."""

from __future__ import annotations

import os
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
import structlog

from scheduler.clock import Clock
from scheduler.errors import MessageError
from scheduler.runs import epoch_ms, from_epoch_ms, iso_utc
from worker.config import Config, JobSpec
from worker.executor import Execution, Outcome, job_environment, root_refusal
from worker.messages import RunMessage, parse_message
from worker.metrics import RunHooks
from worker.params import render_argv
from worker.pyjobs import PyExecution, PythonPool
from worker.queue import Delivery
from worker.runstate import RunRef, RunState
from worker.transport import Transport
from worker.watchdog import Watchdog

# RunState.renew results.
LOST, RENEWED, STOP_REQUESTED = 0, 1, 2
# How long one XREADGROUP blocks; bounds how long shutdown waits for the fetch loop.
FETCH_BLOCK_MS = 1000
# Recording a result is retried through a Redis restart with this backoff, bounded by the lease.
FINISH_RETRY_FIRST_S = 0.1
FINISH_RETRY_MAX_S = 1.0
# Delayed runs (retries, runs waiting for an overlap lock) are promoted this often.
PROMOTE_EVERY_S = 0.5


@dataclass
class _Active:
    delivery: Delivery
    ref: RunRef
    token: str
    execution: Execution | PyExecution
    renewed_at: float  # monotonic time the last successful lease write was sent
    replaced: bool = False


class Consumer:
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
        # The watchdog kills this node's jobs this long before their leases could lapse.
        self._margin_s = self._vis_s / 6
        self._inflight = 0  # dispatched and not yet finished (includes claims in progress)
        self._slot_freed = threading.Event()
        # The agent's environment does not change while it runs: read os.environ once, not
        # once per run (each os.environ lookup re-encodes; it showed up in profiles).
        self._agent_env = dict(os.environ)
        self._watchdog_sent: float | None = None  # the deadline the watchdog last got
        self._per_queue: dict[str, int] = {}  # in flight per queue, for queue_concurrency
        self._pool = ThreadPoolExecutor(cfg.worker.concurrency, thread_name_prefix="run")
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self.accepting = threading.Event()
        self.accepting.set()
        self._py: PythonPool | None = None  # started on first use by a callable job
        self.hooks = RunHooks()  # metrics; the agent plugs its AgentMetrics in
        self._log = structlog.get_logger("cronsul.run").bind(node=self._node)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    def set_jobs(self, cfg: Config) -> None:
        self._cfg = cfg

    # -- fetch loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        queues = list(self._cfg.worker.queues)
        self._q.ensure_groups(queues)
        next_reclaim = next_promote = 0.0
        while not stop.is_set():
            if not self.accepting.is_set():
                stop.wait(0.2)
                continue
            try:
                if self._clock.monotonic() >= next_reclaim:
                    next_reclaim = self._clock.monotonic() + self._vis_s / 2
                    for d in self._q.reclaim(queues, self._lease_ms, 100):
                        self._log.info("run_reclaimed", entry_id=d.entry_id, queue=d.queue)
                        self._dispatch(d, stop)
                if self._clock.monotonic() >= next_promote:
                    next_promote = self._clock.monotonic() + PROMOTE_EVERY_S
                    self._runs.promote(epoch_ms(self._clock.now()))
                free = self._free_slots()
                if free == 0:
                    # Woken the moment a run finishes; the timeout only bounds a missed wake-up.
                    self._slot_freed.wait(1.0)
                    self._slot_freed.clear()
                    continue
                for d in self._q.fetch(queues, free, FETCH_BLOCK_MS, self._queue_room()):
                    self._dispatch(d, stop)
            except redis.RedisError as exc:
                self._log.warning("redis_error", error=str(exc)[:200])
                stop.wait(0.5)

    def _free_slots(self) -> int:
        with self._lock:
            return self._cfg.worker.concurrency - self._inflight

    def _queue_room(self) -> dict[str, int] | None:
        limits = dict(self._cfg.worker.queue_concurrency)
        if not limits:
            return None
        with self._lock:
            return {q: n - self._per_queue.get(q, 0) for q, n in limits.items()}

    def _dispatch(self, d: Delivery, stop: threading.Event) -> None:
        with self._lock:
            self._inflight += 1
            self._per_queue[d.queue] = self._per_queue.get(d.queue, 0) + 1
        self._pool.submit(self._handle_safely, d)

    def _handle_safely(self, d: Delivery) -> None:
        try:
            self._handle(d)
        except redis.RedisError as exc:
            # The entry stays pending; another node (or we) reclaims it once its lease lapses.
            self._log.warning("run_redis_error", entry_id=d.entry_id, error=str(exc)[:200])
        except Exception:
            self._log.exception("run_handler_crashed", entry_id=d.entry_id)
        finally:
            with self._lock:
                self._inflight -= 1
                self._slot_freed.set()
                self._per_queue[d.queue] -= 1

    # -- one run ----------------------------------------------------------------------------

    def _handle(self, d: Delivery) -> None:
        jobs = self._cfg.jobs
        try:
            msg = parse_message(d.payload, jobs)
        except MessageError as exc:
            reason = str(exc).split(":", 1)[0]
            self._q.dead_letter(d, reason, str(exc))
            self._log.error("run_dead_lettered", entry_id=d.entry_id, queue=d.queue,
                            reason=reason, error=str(exc))
            self.hooks.run_dead_lettered(reason)
            return
        job = jobs[msg.job]
        entry = d.entry_id if self._q.acks_with_record else ""
        ref = RunRef(msg.run_id, msg.job, epoch_ms(msg.scheduled_at), d.queue,
                     d.payload or b"", entry, job.overlap, job.lock_name(msg.params),
                     job.on_lost)
        token = uuid.uuid4().hex
        sent = self._clock.monotonic()
        now_ms = epoch_ms(self._clock.now())
        begun = self._runs.begin(ref, token, self._lease_ms, now_ms)
        if begun.verdict != "start":
            if begun.verdict != "busy" and not self._q.acks_with_record:
                self._q.settle(d)
            self._not_started(ref, begun.verdict, begun.detail)
            return
        refusal = root_refusal(job.user, job.allow_root, job.callable is not None, os.geteuid())
        execution: Execution | PyExecution
        if job.callable is not None and refusal is None:
            execution = self._python_pool().execution()
        else:
            execution = Execution(self._watchdog, self._cfg.worker.kill_grace.total_seconds(),
                                  job.output_limit, log=self._log.bind(run_id=msg.run_id))
        self.hooks.run_started(msg.job)
        active = _Active(d, ref, token, execution, sent)
        with self._lock:
            self._active[msg.run_id] = active
        self._update_watchdog()
        try:
            env = self._environment(job, msg, begun.attempt)
            if refusal is not None:  # recorded as a failed attempt; nothing is started
                outcome = Outcome(None, None, False, 0.0, "", 0, refusal)
            elif isinstance(execution, PyExecution):
                outcome = execution.run(job.callable or "", msg.params, env,
                                        job.timeout.total_seconds())
            else:
                outcome = execution.run(render_argv(job.command, msg.params), env,
                                        job.working_dir, job.timeout.total_seconds(),
                                        user=job.user)
            state, retry_at = self._verdict(job, outcome, begun.attempt, active.replaced)
            finished_ms = epoch_ms(self._clock.now())
            fields = _record_fields(outcome)
            if active.replaced:
                fields["error"] = "stopped: replaced by a newer run (overlap = replace)"
            # Still in _active: the heartbeat keeps the lease alive while the result is written.
            recorded = self._finish(active, state, finished_ms, fields, retry_at)
        finally:
            with self._lock:
                self._active.pop(msg.run_id, None)
            self._update_watchdog()
        if recorded and not self._q.acks_with_record:
            self._q.settle(d)
        self.hooks.run_finished(msg.job, state if recorded else "lost", outcome.duration_s)
        self._log.info(
            "run_finished" if recorded else "run_finished_lease_lost",
            job=msg.job, run_id=msg.run_id, attempt=begun.attempt,
            scheduled_at=iso_utc(msg.scheduled_at), state=state if recorded else "lost",
            exit_code=outcome.exit_code, signal=outcome.signal, timed_out=outcome.timed_out,
            duration_ms=round(outcome.duration_s * 1000, 1),
            start_lag_ms=now_ms - epoch_ms(msg.scheduled_at),
            output_bytes=outcome.output_bytes, error=fields["error"] or None,
            retry_at=iso_utc(from_epoch_ms(retry_at)) if retry_at else None,
        )

    def _finish(self, active: _Active, state: str, finished_ms: int, fields: dict[str, str],
                retry_at: int | None) -> bool:
        """Record the result, retrying through a Redis blip (a restart, a failover) for as
        long as the lease can still be ours. Giving up at the first error would let the lease
        lapse and another node run the finished job again."""
        delay = FINISH_RETRY_FIRST_S
        while True:
            try:
                return self._runs.finish(active.ref, active.token, state, finished_ms, fields,
                                         retry_at)
            except redis.RedisError as exc:
                left = active.renewed_at + self._vis_s - self._margin_s - self._clock.monotonic()
                if left <= delay:
                    raise
                self._log.warning("run_finish_retry", run_id=active.ref.run_id,
                                  error=str(exc)[:200], lease_left_s=round(left, 1))
                threading.Event().wait(delay)
                delay = min(delay * 2, FINISH_RETRY_MAX_S)

    def _python_pool(self) -> PythonPool:
        """The warm worker pool for callable jobs, one worker per run slot."""
        with self._lock:
            if self._py is None:
                pool = PythonPool(self._cfg.worker.concurrency, watchdog=self._watchdog)
                pool.start()
                self._py = pool
            return self._py

    def _not_started(self, ref: RunRef, verdict: str, detail: str) -> None:
        events = {
            "done": "run_already_done",  # it finished; only the ack was lost (acked now)
            "busy": "run_busy_elsewhere",  # its lease is alive on another node: leave it
            "lost": "run_lost",  # its node died and on_lost = fail
            "skipped": "run_skipped",  # overlap: a previous run holds the lock
            "wait": "run_waiting",  # overlap = queue | replace: parked until the lock frees
        }
        self._log.info(events.get(verdict, "run_not_started"), job=ref.job, run_id=ref.run_id,
                       detail=detail)

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

    def _environment(self, job: JobSpec, msg: RunMessage, attempt: int) -> dict[str, str]:
        cronsul = {
            "CRONSUL_JOB": msg.job, "CRONSUL_RUN_ID": msg.run_id,
            "CRONSUL_SCHEDULED_AT": iso_utc(msg.scheduled_at),
            "CRONSUL_ATTEMPT": str(attempt), "CRONSUL_NODE": self._node,
        }
        cronsul.update({f"CRONSUL_PARAM_{k.upper()}": v for k, v in msg.params.items()})
        return job_environment(self._agent_env, job.env, cronsul)

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
            elif result == STOP_REQUESTED:
                a.renewed_at = sent
                if not a.replaced:
                    a.replaced = True
                    self._log.info("run_replaced", run_id=a.ref.run_id)
                    a.execution.stop()
            else:
                self._log.error("run_lease_lost", run_id=a.ref.run_id)
                a.execution.stop()
        self._update_watchdog()

    def _update_watchdog(self, disarm_idle: bool = False) -> None:
        """Keep the watchdog's kill deadline at (oldest running lease's renewal + visibility -
        margin) or earlier. Writes only when the deadline must move earlier (a safety matter)
        or is a third of the visibility timeout stale, so a busy node does not pay two pipe
        writes and a process wake-up per run. An idle node disarms from the heartbeat."""
        with self._lock:
            oldest = min((a.renewed_at for a in self._active.values()), default=None)
            sent = self._watchdog_sent
            if oldest is None:
                if not disarm_idle or sent is None:
                    return
                self._watchdog_sent = None
                desired: float | None = None
            else:
                desired = oldest + self._vis_s - self._margin_s
                if sent is not None and desired >= sent and desired - sent < self._vis_s / 3:
                    return
                self._watchdog_sent = desired
        self._watchdog.deadline(desired)

    def drain(self, timeout_s: float) -> bool:
        """Stop taking runs; wait up to ``timeout_s`` for running ones. True when all finished."""
        self.accepting.clear()
        deadline = self._clock.monotonic() + timeout_s
        while self._busy() and self._clock.monotonic() < deadline:
            threading.Event().wait(0.1)
        return not self._busy()

    def _busy(self) -> bool:
        with self._lock:
            return self._inflight > 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._py is not None:
            self._py.stop()


def _record_fields(o: Outcome) -> dict[str, str]:
    return {
        "exit_code": "" if o.exit_code is None else str(o.exit_code),
        "signal": "" if o.signal is None else str(o.signal),
        "timed_out": "1" if o.timed_out else "0",
        "duration_ms": str(round(o.duration_s * 1000, 1)),
        "output": o.output,
        "output_bytes": str(o.output_bytes),
        "error": o.error or "",
    }
