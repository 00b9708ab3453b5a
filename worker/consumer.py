"""Every node's consumer: fetch runs, claim them, execute, record, ack; renew leases meanwhile."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import redis
import structlog

from scheduler.clock import Clock
from scheduler.errors import ConfigError, MessageError
from scheduler.runs import epoch_ms, iso_utc
from worker.config import Config, JobSpec
from worker.executor import Execution, Outcome, job_environment
from worker.metrics import RunHooks
from worker.params import check_value, placeholders, render_argv
from worker.queue import Delivery, RedisQueue
from worker.watchdog import Watchdog

# A run message is a few hundred bytes; anything this large is not ours (or is an attack).
MAX_PAYLOAD_BYTES = 64 * 1024
# Parameter names become environment variable names: keep them to this alphabet.
PARAM_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
# How long one XREADGROUP blocks; bounds how long shutdown waits for the fetch loop.
FETCH_BLOCK_MS = 1000


@dataclass(frozen=True)
class RunMessage:
    run_id: str
    job: str
    scheduled_at: datetime
    params: Mapping[str, str]


def parse_message(payload: bytes | None, jobs: Mapping[str, JobSpec]) -> RunMessage:
    """Decode and check a queued run. Raises MessageError with the reason (for the DLQ)."""
    if payload is None:
        raise MessageError("malformed: entry has no payload field")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"oversized: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"undecodable: {exc}") from exc
    if not isinstance(body, dict) or body.get("v") != 1:
        raise MessageError("malformed: not a version 1 run message")
    run_id, job, when, params = (body.get(k) for k in ("run_id", "job", "scheduled_at", "params"))
    if not isinstance(job, str) or job not in jobs:
        raise MessageError(f"unknown job: {job!r} is not defined in this node's config")
    if not isinstance(run_id, str) or not run_id.startswith(f"{job}@") or len(run_id) > 300:
        raise MessageError(f"malformed: run_id {run_id!r} does not belong to job {job!r}")
    try:
        scheduled = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    except ValueError as exc:
        raise MessageError(f"malformed: scheduled_at {when!r}") from exc
    if scheduled.tzinfo is None:
        raise MessageError(f"malformed: scheduled_at {when!r} has no time zone")
    params = params or {}
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and set(k) <= PARAM_NAME_CHARS
        for k, v in params.items()
    ):
        raise MessageError("malformed: params must map [A-Za-z0-9_] names to strings")
    spec = jobs[job]
    undeclared = sorted(set(params) - spec.param_names)
    if undeclared:
        raise MessageError(f"bad params: {undeclared[0]!r} is not a parameter of job {job!r}")
    try:
        for k, v in params.items():
            check_value(k, v, f"job {job!r}")
    except ConfigError as exc:
        raise MessageError(f"bad params: {exc}") from exc
    missing = sorted(placeholders(spec.command, job) - set(params))
    if missing:
        raise MessageError(f"bad params: command needs {missing[0]!r}")
    return RunMessage(run_id, job, scheduled, params)


@dataclass
class _Active:
    run_id: str
    token: str
    execution: Execution
    renewed_at: float  # monotonic time the last successful lease write was sent


class Consumer:
    def __init__(self, cfg: Config, queue: RedisQueue, watchdog: Watchdog, clock: Clock) -> None:
        self._cfg = cfg
        self._q = queue
        self._watchdog = watchdog
        self._clock = clock
        self._node = cfg.agent.node
        self._vis_s = cfg.worker.visibility_timeout.total_seconds()
        self._lease_ms = int(self._vis_s * 1000)
        # The watchdog kills this node's jobs this long before their leases could lapse.
        self._margin_s = self._vis_s / 6
        self._inflight = 0  # dispatched and not yet finished (includes claims in progress)
        self._pool = ThreadPoolExecutor(cfg.worker.concurrency, thread_name_prefix="run")
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self.accepting = threading.Event()
        self.accepting.set()
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
        next_reclaim = 0.0
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
                free = self._free_slots()
                if free == 0:
                    stop.wait(0.05)
                    continue
                for d in self._q.fetch(queues, free, FETCH_BLOCK_MS):
                    self._dispatch(d, stop)
            except redis.RedisError as exc:
                self._log.warning("redis_error", error=str(exc)[:200])
                stop.wait(0.5)

    def _free_slots(self) -> int:
        with self._lock:
            return self._cfg.worker.concurrency - self._inflight

    def _dispatch(self, d: Delivery, stop: threading.Event) -> None:
        with self._lock:
            self._inflight += 1
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
        token = uuid.uuid4().hex
        sent = self._clock.monotonic()
        now_ms = epoch_ms(self._clock.now())
        begun = self._q.begin(msg.run_id, token, self._lease_ms, now_ms, msg.job,
                              epoch_ms(msg.scheduled_at), d.queue)
        if begun.verdict == "done":
            self._q.ack(d)  # it finished already; only the ack was lost
            self._log.info("run_already_done", run_id=msg.run_id, state=begun.detail)
            return
        if begun.verdict == "busy":
            self._log.info("run_busy_elsewhere", run_id=msg.run_id, holder=begun.detail)
            return
        execution = Execution(self._watchdog, self._cfg.worker.kill_grace.total_seconds())
        self.hooks.run_started(msg.job)
        with self._lock:
            self._active[msg.run_id] = _Active(msg.run_id, token, execution, sent)
        self._update_watchdog()
        try:
            outcome = execution.run(render_argv(job.command, msg.params),
                                    self._environment(job, msg, begun.attempt),
                                    job.working_dir, job.timeout.total_seconds())
        finally:
            with self._lock:
                self._active.pop(msg.run_id, None)
            self._update_watchdog()
        state = "succeeded" if outcome.ok else "failed"
        finished_ms = epoch_ms(self._clock.now())
        recorded = self._q.finish(d, msg.run_id, msg.job, token, state, finished_ms,
                                  _record_fields(outcome))
        self.hooks.run_finished(msg.job, state if recorded else "lost", outcome.duration_s)
        self._log.info(
            "run_finished" if recorded else "run_finished_lease_lost",
            job=msg.job, run_id=msg.run_id, attempt=begun.attempt,
            scheduled_at=iso_utc(msg.scheduled_at), state=state if recorded else "lost",
            exit_code=outcome.exit_code, signal=outcome.signal, timed_out=outcome.timed_out,
            duration_ms=round(outcome.duration_s * 1000, 1),
            start_lag_ms=now_ms - epoch_ms(msg.scheduled_at),
            output_bytes=outcome.output_bytes, error=outcome.error,
        )

    def _environment(self, job: JobSpec, msg: RunMessage, attempt: int) -> dict[str, str]:
        cronsul = {
            "CRONSUL_JOB": msg.job, "CRONSUL_RUN_ID": msg.run_id,
            "CRONSUL_SCHEDULED_AT": iso_utc(msg.scheduled_at),
            "CRONSUL_ATTEMPT": str(attempt), "CRONSUL_NODE": self._node,
        }
        cronsul.update({f"CRONSUL_PARAM_{k.upper()}": v for k, v in msg.params.items()})
        return job_environment(os.environ, job.env, cronsul)

    # -- leases -----------------------------------------------------------------------------

    def heartbeat(self, stop: threading.Event) -> None:
        """Renew every active run's lease every visibility/3; stop runs whose lease was lost."""
        while not stop.wait(self._vis_s / 3):
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            active = list(self._active.values())
        if not active:
            return
        sent = self._clock.monotonic()
        try:
            results = self._q.renew([(a.run_id, a.token) for a in active], self._lease_ms)
        except redis.RedisError as exc:
            self._log.warning("lease_renew_failed", error=str(exc)[:200])
            return
        for a, ok in zip(active, results, strict=True):
            if ok:
                a.renewed_at = sent
            else:
                self._log.error("run_lease_lost", run_id=a.run_id)
                a.execution.stop()
        self._update_watchdog()

    def _update_watchdog(self) -> None:
        with self._lock:
            oldest = min((a.renewed_at for a in self._active.values()), default=None)
        self._watchdog.deadline(None if oldest is None else oldest + self._vis_s - self._margin_s)

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
