"""The agent: wires membership, leadership, the scheduler and the consumer, and shuts down cleanly.

Threads: membership heartbeat, elector, scheduler driver, consumer fetch loop, lease heartbeat.
The main thread only waits for signals: SIGTERM/SIGINT stop, SIGHUP reloads the config.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
import structlog

from scheduler.clock import Clock, SystemClock
from scheduler.errors import ConfigError, ConnectionFailure
from scheduler.runs import iso_utc
from scheduler.ticker import TickLoop
from worker.config import Config, load_config
from worker.consulapi import (
    CALL_TIMEOUT_S,
    CONSUL_ERRORS,
    acl_denied,
    acl_message,
    make_clients,
)
from worker.consumer import Consumer
from worker.controls import PauseWatcher, SchedulePublisher, schedule_document
from worker.keys import Keys
from worker.leadership import CONTEND_WAIT_S, Elector, Term
from worker.maintenance import MaintenanceWatch
from worker.membership import Membership
from worker.metrics import AgentMetrics
from worker.ops import Ops
from worker.procguard import forbid_inspection
from worker.queue import RedisQueue
from worker.redisconn import AGENT_RETRIES, RedisSection, is_auth_error, redis_client
from worker.reloading import settle_reload
from worker.runstate import RunState
from worker.scheduling import SchedulerDriver
from worker.secretfiles import exposure_warnings, redact
from worker.signals import SignalInbox
from worker.sink import RedisSink
from worker.transport import Transport
from worker.watchdog import Watchdog

if TYPE_CHECKING:
    from worker.outbox import OutboxDrainer

# Redis calls answer in milliseconds; a socket that is silent this long is a dead connection.
REDIS_SOCKET_TIMEOUT_S = 5.0
# How long startup retries an unreachable Consul or Redis before giving up with exit code 3
# (systemd's Restart=on-failure then tries again later).
STARTUP_RETRY_S = 30.0
# XREADGROUP blocks for up to a second; the socket timeout must not cut that short.
FETCH_SLACK_S = 2.0


def agent_redis(cfg: RedisSection) -> redis.Redis:
    """The agent's client (worker/redisconn.py): retries ride out a failover."""
    return redis_client(cfg, socket_timeout=REDIS_SOCKET_TIMEOUT_S + FETCH_SLACK_S,
                        connect_timeout=REDIS_SOCKET_TIMEOUT_S, retries=AGENT_RETRIES,
                        health_check_interval=30)


class Agent:
    def __init__(self, cfg: Config, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.stop = threading.Event()
        self._log = structlog.get_logger("cronsul.agent").bind(node=cfg.agent.node)
        self._threads: list[threading.Thread] = []
        self._signals = SignalInbox()  # set only by the main thread, never by a handler
        self._reload_requested = False
        self.reload_refused: str | None = None  # when and why the last reload was refused

        self.metrics = AgentMetrics()
        self.redis = agent_redis(cfg.redis)
        self.metrics.instrument_redis(self.redis)
        keys = Keys(cfg.redis.key_prefix)
        self.sink = RedisSink(self.redis, keys, cfg.record_ttl)
        self.queue: Transport = RedisQueue(self.redis, keys, cfg.agent.node)
        self.outbox: OutboxDrainer | None = None
        if cfg.queue.backend == "sqs":  # docs/sqs.md; imported here: boto3 only when used
            from worker.outbox import SqsBackend

            sqs = SqsBackend.build(cfg, self.redis, keys)
            self.sink, self.queue, self.outbox = sqs.sink, sqs.transport, sqs.drainer
        c = cfg.consul
        self.membership = Membership(
            make_clients(c, CALL_TIMEOUT_S, self.metrics.consul_error).call, cfg.agent.node,
            cfg.agent.address, c.check_ttl.total_seconds(), self._meta(cfg),
            known_key=f"{c.prefix}/nodes/{cfg.agent.node}",
        )
        self.elector = Elector(
            make_clients(c, CONTEND_WAIT_S, self.metrics.consul_error), c, self.membership,
            cfg.agent.address, self.clock,
            eligible=self._eligible, on_change=self._leadership_changed,
        )
        self.pauses = PauseWatcher(make_clients(c, CONTEND_WAIT_S), c.prefix)
        self.ticker = TickLoop([j.scheduled() for j in cfg.jobs.values()], self.sink, self.sink)
        settle = max(c.session_ttl, c.lock_delay).total_seconds() + 1.0
        self.driver = SchedulerDriver(self.ticker, self.sink, self.elector, self.clock, settle,
                                      self.pauses)
        self.publisher = SchedulePublisher(make_clients(c, CALL_TIMEOUT_S), c.prefix, self.clock,
                                           self._schedule_document)
        self.watchdog = Watchdog(cfg.agent.node)
        self.runs = RunState(self.redis, keys, cfg.agent.node,
                             int(cfg.record_ttl.total_seconds()),
                             outbox=self.outbox is not None)
        self.consumer = Consumer(cfg, self.queue, self.runs, self.watchdog, self.clock)
        self.consumer.hooks = self.metrics
        self.driver.on_report = self.metrics.tick_report
        self.maintenance = MaintenanceWatch(
            make_clients(c, CALL_TIMEOUT_S, self.metrics.consul_error).call,
            self.membership.service_id, self.consumer.accepting, self.elector.step_down,
            lambda: self.consumer.running, self.stop)
        self.ops = Ops(self, lambda: self._threads)  # sd_notify, watchdog, /metrics, /healthz

    @staticmethod
    def _meta(cfg: Config) -> dict[str, str]:
        """Service Meta other nodes and `cronsul status` read."""
        return {"config_hash": cfg.config_hash, "pid": str(os.getpid()),
                "eligible": "true" if cfg.agent.leader_eligible else "false"}

    def _eligible(self) -> bool:
        return (self.cfg.agent.leader_eligible and not self.stop.is_set()
                and not self.maintenance.active)

    def _leadership_changed(self, term: Term | None) -> None:
        self.metrics.leadership(term is not None)
        self.driver.wake.set()
        self.publisher.wake.set()

    def _schedule_document(self) -> str | None:
        term = self.elector.term
        if term is None:
            return None
        jobs = {n: j.scheduled() for n, j in self.cfg.jobs.items()}
        return schedule_document(jobs, self.cfg.agent.node, term.since, self.cfg.config_hash,
                                 self.pauses.paused, self.clock.now())

    # -- lifecycle --------------------------------------------------------------------------

    def _startup(self) -> None:
        for problem in exposure_warnings(self.cfg.secret_files):
            self._log.warning("config_secret_readable", problem=problem)
        self._retry("redis", self.redis.ping)
        self._retry("consul", self.membership.register)

    def _retry(self, what: str, call: Callable[[], object]) -> None:
        deadline = self.clock.monotonic() + STARTUP_RETRY_S
        while True:
            try:
                call()
                return
            except (redis.RedisError, *CONSUL_ERRORS) as exc:  # type: ignore[misc]
                if what == "consul" and acl_denied(exc):  # the token: a config error, exit 2
                    raise ConfigError(f"{self.cfg.path}: [consul]: " + acl_message(
                        "register", self.cfg.consul.prefix, exc)) from exc
                if what == "redis" and is_auth_error(exc):  # a config error: exit 2, no retry
                    raise ConfigError(f"{self.cfg.path}: [redis]: Redis at "
                                      f"{self.cfg.redis.where} refused the credentials: "
                                      f"{redact(str(exc))}") from exc
                if self.clock.monotonic() > deadline or self.stop.is_set():
                    where = f"Redis at {self.cfg.redis.where}" if what == "redis" else what
                    raise ConnectionFailure(f"cannot reach {where}: {redact(str(exc))}") \
                        from exc
                self._log.warning("startup_waiting", service=what,
                                  error=redact(str(exc))[:200])
                self._take_signals(1.0)

    def _spawn(self, name: str, target: Callable[[threading.Event], None],
               stop: threading.Event) -> None:
        t = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit code."""
        if not forbid_inspection():  # before any secret is in memory for a job to read
            self._log.warning("process_inspectable",
                              detail="prctl(PR_SET_DUMPABLE, 0) failed: jobs running as the "
                                     "agent's user can read its environment and memory")
        self._install_signals()
        self._startup()
        self.maintenance.poll_once()  # a node started in maintenance never contends
        # Everything built so far (modules, config, clients) lives as long as the agent: keep it
        # out of the cyclic GC, whose full collections would otherwise walk it every time
        # (about 20 ms here, long enough to delay a scheduler pass that happens to wait on it).
        gc.freeze()
        self.watchdog.start()
        run_stop = threading.Event()  # consumer threads outlive leadership during shutdown
        self._spawn("membership", self.membership.run, run_stop)
        self._spawn("elector", self.elector.run, self.stop)
        self._spawn("paused-watch", self.pauses.run, self.stop)
        self._spawn("scheduler", self.driver.run, self.stop)
        self._spawn("schedule-publisher", self.publisher.run, self.stop)
        self._spawn("consumer", self.consumer.run, self.stop)
        if self.outbox is not None:
            self._spawn("outbox-drainer", self.outbox.run, self.stop)
        self._spawn("lease-heartbeat", self.consumer.heartbeat, run_stop)
        self._spawn("run-live-output", self.consumer.publish_live, run_stop)
        self._spawn("maintenance", self.maintenance.run, self.stop)
        self._log.info("agent_started", jobs=len(self.cfg.jobs), pid=os.getpid(),
                       eligible=self._eligible(), draining=self.maintenance.reason,
                       config_hash=self.cfg.config_hash)
        self.ops.start()
        while True:
            self._take_signals(0.5)
            if self.stop.is_set():
                break
            self.ops.tick()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
        return self._shutdown(run_stop)

    def _take_signals(self, timeout: float) -> None:
        """Act on SIGTERM/SIGINT (stop) and SIGHUP (reload), here on the main thread: the
        handlers only note them (see worker.signals)."""
        got = self._signals.wait(timeout)
        if signal.SIGTERM in got or signal.SIGINT in got:
            self.stop.set()
        if signal.SIGHUP in got:
            self._reload_requested = True

    def _shutdown(self, run_stop: threading.Event) -> int:
        self._log.info("agent_stopping", running=self.consumer.running)
        self.ops.stopping()
        self.elector.shutdown()  # revoke the lease, release, destroy: successor takes over now
        self.driver.wake.set()
        self.publisher.wake.set()
        self.membership.deregister()
        # Runs still going after shutdown_grace get TERM, then KILL after kill_grace (a job
        # may clean up); they are not recorded: their leases lapse and they are taken over.
        finished = self.consumer.drain(self.cfg.worker.shutdown_grace.total_seconds(),
                                       self.cfg.worker.kill_grace.total_seconds())
        run_stop.set()
        self.consumer.close()
        self.watchdog.stop()  # kills whatever is still running; its lease lapses, it is reclaimed
        self.ops.close()
        self._log.info("agent_stopped", all_runs_finished=finished)
        return 0

    def reload(self) -> None:
        try:
            cfg = load_config(self.cfg.path)
        except ConfigError as exc:
            self._log.error("reload_refused", error=str(exc))
            self.metrics.config_reloaded(False)
            self.reload_refused = f"{iso_utc(self.clock.now())}: {exc}"
            return
        cfg, needs_restart = settle_reload(self.cfg, cfg)
        if cfg.record_ttl != self.cfg.record_ttl:  # the longest catchup_window changed
            needs_restart.append("the longest catchup_window (run records' lifetime)")
        if needs_restart:
            self._log.warning("reload_needs_restart", settings=needs_restart,
                              detail="changed, but kept at their running values until the "
                                     "agent restarts; the rest of the config is applied")
        self.cfg = cfg
        self.consumer.set_jobs(cfg)
        # New job code (a deploy) is imported by the next callable runs, as new config is used.
        renewed = self.consumer.renew_python()
        self.driver.reload([j.scheduled() for j in cfg.jobs.values()])
        self.publisher.wake.set()
        self.membership.update_meta(self._meta(cfg))
        self.metrics.config_reloaded(True)
        self.reload_refused = None
        self._log.info("config_reloaded", jobs=len(cfg.jobs), config_hash=cfg.config_hash,
                       python_workers_renewed=renewed)

    def _install_signals(self) -> None:
        self._signals.install(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        # A crash (SIGSEGV, SIGABRT...) dumps every thread's stack to stderr (the journal).
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            faulthandler.enable(file=sys.stderr, all_threads=True)
        # `kill -USR1 <pid>` dumps them too, from a thread of its own holding the GIL. Not with
        # faulthandler.register: its C handler reads the other threads' frames while they run,
        # and a CI run saw the agent segfault in that dump.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def dump_stacks() -> None:
            while os.read(read_fd, 64):
                with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

        def asked(signum: int, frame: object) -> None:
            with contextlib.suppress(OSError):  # a dump already pending is enough
                os.write(write_fd, b"!")

        threading.Thread(target=dump_stacks, name="stack-dump", daemon=True).start()
        signal.signal(signal.SIGUSR1, asked)
