"""Prometheus metrics of one agent, in its own CollectorRegistry (no module-level state).

Three kinds:

* counters and histograms fed by small hooks: leadership changes (agent), each scheduler pass's
  TickReport (scheduling), run start/finish/dead-letter (consumer), failed Consul requests
  (a requests adapter on the agent's clients) and Redis connection failures (a subclass of the
  client's connection class);
* gauges read when scraped from the live objects (is_leader, lease remaining, draining,
  running runs), so they can never go stale;
* queue depth and oldest-entry age per queue, computed on scrape from XINFO GROUPS / XPENDING /
  XRANGE (a few O(1)-ish calls per queue): the autoscaling signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.ticker import TickReport
from worker.keys import GROUP, Keys

# Tick lag: from a tick's fire time to its enqueue. Normally tens of milliseconds; seconds mean a
# slow leader or a failover catch-up.
TICK_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Run durations span sub-second scripts to multi-hour batch jobs.
RUN_DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                        7200.0, 21600.0)
# Counting undelivered entries when Redis cannot tell us (XINFO lag unknown) stops here.
LAG_COUNT_CAP = 10_000


class RunHooks:
    """What the consumer reports about runs. This base does nothing (no metrics wired)."""

    def run_started(self, job: str) -> None:
        """A run passed ``begin`` on this node and its command is about to start."""

    def run_finished(self, job: str, state: str, duration_s: float) -> None:
        """``state``: what the run's record says now (succeeded, failed, retrying, dead), lost
        (our lease was gone when we finished) or error (the result could not be recorded)."""

    def run_ended_unstarted(self, job: str, state: str) -> None:
        """``begin`` ended a run without starting it: skipped (overlap), or failed (its node
        died and on_lost = fail)."""

    def run_dead_lettered(self, reason: str) -> None:
        """A message went to the dead-letter queue."""


@dataclass(frozen=True)
class Probes:
    """Read on every scrape."""

    is_leader: Callable[[], bool]
    lease_remaining_s: Callable[[], float]
    draining: Callable[[], bool]
    running: Callable[[], int]
    queues: Callable[[], Sequence[str]]
    # The configured jobs (a removed job's last success is not exported); empty: every job.
    jobs: Callable[[], Sequence[str]] = tuple


@dataclass(frozen=True)
class QueueStats:
    depth: int  # not yet acked: waiting (never delivered) + pending (delivered, running/orphaned)
    pending: int
    oldest_age_s: float  # age of the oldest entry not yet acked; 0 when empty


class AgentMetrics(RunHooks):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.elections = Counter("cronsul_leader_elections",
                                 "Leadership terms this agent started", registry=r)
        self.losses = Counter("cronsul_leader_losses",
                              "Leadership terms this agent ended (lost or released)", registry=r)
        self.ticks = Counter("cronsul_ticks", "Ticks handled by this agent's scheduler, by "
                             "outcome (enqueued, deduplicated, missed, skipped_paused)",
                             ["outcome"], registry=r)
        self.tick_lag = Histogram("cronsul_tick_lag_seconds",
                                  "From a tick's fire time to its enqueue",
                                  buckets=TICK_LAG_BUCKETS, registry=r)
        self.runs = Counter("cronsul_runs", "Runs on this node by job and event (started, "
                            "succeeded, failed, retrying, dead, lost, error, skipped)",
                            ["job", "event"], registry=r)
        self.dead_lettered = Counter("cronsul_runs_dead_lettered",
                                     "Messages this node sent to the dead-letter queue",
                                     ["reason"], registry=r)
        self.run_duration = Histogram("cronsul_run_duration_seconds",
                                      "Duration of finished runs", ["job"],
                                      buckets=RUN_DURATION_BUCKETS, registry=r)
        self.consul_errors = Counter("cronsul_consul_errors",
                                     "Failed Consul requests by kind (timeout, unreachable, "
                                     "acl_denied, server_error)", ["kind"], registry=r)
        self.redis_errors = Counter("cronsul_redis_errors",
                                    "Redis connection failures by kind (connection, timeout)",
                                    ["kind"], registry=r)
        for outcome in ("enqueued", "deduplicated", "missed", "skipped_paused"):
            self.ticks.labels(outcome)
        self.reloads = Counter("cronsul_config_reloads",
                               "Config reloads (SIGHUP) by result: applied, refused (an invalid "
                               "file: the agent keeps running the config it had)", ["result"],
                               registry=r)
        self.reload_ok = Gauge("cronsul_config_last_reload_successful",
                               "1 unless the last reload was refused (alert on 0: the file on "
                               "disk is not what runs, and a restart would fail)", registry=r)
        self.reload_ok.set(1)
        for result in ("applied", "refused"):
            self.reloads.labels(result)
        self._counters: dict[tuple[str, str], Counter] = {}  # cronsul_runs children
        self._durations: dict[str, Histogram] = {}  # cronsul_run_duration_seconds children
        self._live = _LiveCollector()
        r.register(self._live)

    def attach(self, probes: Probes, client: redis.Redis, keys: Keys) -> None:
        """Wire the scrape-time gauges to the running agent."""
        self._live.probes = probes
        self._live.redis = client
        self._live.keys = keys

    # -- hooks ------------------------------------------------------------------------------

    def config_reloaded(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "refused").inc()
        self.reload_ok.set(1 if applied else 0)

    def leadership(self, leading: bool) -> None:
        (self.elections if leading else self.losses).inc()

    def tick_report(self, report: TickReport) -> None:
        for outcome in ("enqueued", "deduplicated", "missed", "skipped_paused"):
            value = getattr(report, outcome)
            if value:
                self.ticks.labels(outcome).inc(value)
        for lag in report.lags:
            self.tick_lag.observe(max(0.0, lag))

    def run_started(self, job: str) -> None:
        self._run_counter(job, "started").inc()

    def run_finished(self, job: str, state: str, duration_s: float) -> None:
        self._run_counter(job, state).inc()
        timer = self._durations.get(job)
        if timer is None:
            timer = self._durations[job] = self.run_duration.labels(job)
        timer.observe(duration_s)

    def run_ended_unstarted(self, job: str, state: str) -> None:
        self._run_counter(job, state).inc()

    def _run_counter(self, job: str, state: str) -> Counter:
        """The labelled child, looked up once (labels() costs a lock and a tuple per call,
        which showed in a busy node's profile; children are never removed)."""
        child = self._counters.get((job, state))
        if child is None:
            child = self._counters[(job, state)] = self.runs.labels(job, state)
        return child

    def run_dead_lettered(self, reason: str) -> None:
        self.dead_lettered.labels(reason).inc()

    def consul_error(self, kind: str) -> None:
        self.consul_errors.labels(kind).inc()

    def redis_error(self, kind: str) -> None:
        self.redis_errors.labels(kind).inc()

    def instrument_redis(self, client: redis.Redis) -> None:
        """Count connection failures of every command on ``client``'s connections (whatever the
        caller), by subclassing the pool's connection class. Call before the first command."""
        pool = client.connection_pool
        pool.connection_class = _counting(pool.connection_class, self.redis_error)


def _counting(base: Any, on_error: Callable[[str], None]) -> Any:
    def failed(exc: redis.RedisError) -> None:
        on_error("timeout" if isinstance(exc, redis.TimeoutError) else "connection")

    class CountingConnection(base):  # type: ignore[misc]
        def connect(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().connect(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failed(exc)
                raise

        def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().send_packed_command(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failed(exc)
                raise

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().read_response(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failed(exc)
                raise

    CountingConnection.__name__ = f"Counting{base.__name__}"
    return CountingConnection


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.probes: Probes | None = None
        self.redis: redis.Redis | None = None
        self.keys: Keys | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # values come and go with the agent's state; nothing to pre-declare

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = self.probes
        if p is None:
            return
        yield _gauge("cronsul_is_leader", "1 while this agent leads with a valid lease",
                     float(p.is_leader()))
        yield _gauge("cronsul_lease_remaining_seconds",
                     "Time left on the leader's local lease (0 when not leading)",
                     p.lease_remaining_s())
        yield _gauge("cronsul_draining", "1 while the node is in maintenance (draining)",
                     float(p.draining()))
        yield _gauge("cronsul_runs_running", "Runs executing on this node", float(p.running()))
        if self.redis is None or self.keys is None:
            return
        depth = GaugeMetricFamily("cronsul_queue_depth",
                                  "Runs not yet acked (waiting + pending)", labels=["queue"])
        pending = GaugeMetricFamily("cronsul_queue_pending",
                                    "Runs delivered but not yet acked", labels=["queue"])
        oldest = GaugeMetricFamily("cronsul_queue_oldest_age_seconds",
                                   "Age of the oldest run not yet acked", labels=["queue"])
        try:
            now_ms = time.time() * 1000
            for queue in p.queues():
                s = queue_stats(self.redis, self.keys.stream(queue), now_ms)
                depth.add_metric([queue], s.depth)
                pending.add_metric([queue], s.pending)
                oldest.add_metric([queue], s.oldest_age_s)
            dead = float(self.redis.xlen(self.keys.dead))
            last: Any = self.redis.hgetall(self.keys.last_success)
        except redis.RedisError:
            return  # counted by the connection hook; the scrape still shows the rest
        yield depth
        yield pending
        yield oldest
        yield _gauge("cronsul_dead_letters", "Entries in the dead-letter stream", dead)
        yield _last_success(last, set(p.jobs()))


def _last_success(raw: dict[bytes, bytes], jobs: set[str]) -> GaugeMetricFamily:
    """Per job, when its newest succeeded run finished, cluster-wide (Redis): alert on
    ``time() - cronsul_job_last_success_timestamp_seconds > N`` for a job that must not go
    without a success for long. Absent for a job that never succeeded since the key was first
    written (the hash has no expiry: one field per job ever configured; removed jobs are not
    exported)."""
    family = GaugeMetricFamily(
        "cronsul_job_last_success_timestamp_seconds",
        "Finish time (Unix seconds) of the job's newest succeeded run, cluster-wide",
        labels=["job"])
    for job, ms in sorted(raw.items()):
        name = _text(job)
        if not jobs or name in jobs:
            family.add_metric([name], int(ms) / 1000)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _id_ms(entry_id: Any) -> int:
    text = _text(entry_id)
    return int(text.split("-", 1)[0])


def queue_stats(r: redis.Redis, stream: str, now_ms: float) -> QueueStats:
    """Depth, pending count and oldest unacked age of one queue stream."""
    if not r.exists(stream):
        return QueueStats(0, 0, 0.0)
    group = next((g for g in r.xinfo_groups(stream) if _text(g.get("name")) == GROUP), None)
    if group is None:  # no consumer has joined yet: everything is waiting
        first = r.xrange(stream, count=1)
        age = (now_ms - _id_ms(first[0][0])) / 1000 if first else 0.0
        return QueueStats(int(r.xlen(stream)), 0, max(0.0, age))
    last = _text(group.get("last-delivered-id")) or "0-0"
    undelivered = r.xrange(stream, min=f"({last}", count=1)
    lag = group.get("lag")
    if lag is None:  # Redis < 7 or after deletions: count (bounded)
        lag = len(r.xrange(stream, min=f"({last}", count=LAG_COUNT_CAP) or [])
    n_pending = int(group.get("pending") or 0)
    candidates: list[int] = []
    if n_pending:
        summary = r.xpending(stream, GROUP)
        if summary.get("min"):
            candidates.append(_id_ms(summary["min"]))
    if undelivered:
        candidates.append(_id_ms(undelivered[0][0]))
    age = (now_ms - min(candidates)) / 1000 if candidates else 0.0
    return QueueStats(int(lag) + n_pending, n_pending, max(0.0, age))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
