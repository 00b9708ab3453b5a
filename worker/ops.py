"""The agent's operational face: systemd notify and watchdog, /healthz, the metrics probes.

Driven from the agent's main loop (``tick`` every half second), so a WATCHDOG=1 ping proves the
main loop runs, and it is sent only when the other threads are alive and their loops progress.

Two levels of health, on purpose:

* **wedged** (no WATCHDOG=1, systemd restarts the agent): a thread died, or the membership or
  maintenance loop has not completed an iteration for far longer than its timeouts allow. A
  restart fixes these.
* **unhealthy** (/healthz answers 503, the agent carries on): not registered, the local Consul
  agent or Redis not answering. A restart fixes none of these and would kill the runs in
  progress, which keep going (and keep their Redis leases) through a Consul outage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
import structlog

from worker.consulapi import CALL_TIMEOUT_S
from worker.dashboard import Dashboard, Recorder
from worker.dashboard.wiring import recorder_for
from worker.httpserver import OpsHTTPServer
from worker.keys import Keys
from worker.maintenance import POLL_S
from worker.metrics import Probes
from worker.redisconn import redis_client
from worker.sdnotify import Notifier
from worker.secretfiles import redact

if TYPE_CHECKING:
    from worker.agent import Agent

# A loop iteration may legitimately take its calls' timeouts (a pass plus a re-register is
# three Consul calls); beyond that plus this slack, the loop is stuck.
WEDGE_SLACK_S = 10.0
# /healthz wants an answer from the local Consul agent at least this recently (or check_ttl,
# if longer: beyond it our TTL check has turned critical anyway).
CONSUL_FRESH_S = 5.0
# /healthz pings Redis on every request, bounded by this timeout.
REDIS_PROBE_TIMEOUT_S = 1.0


class Ops:
    def __init__(self, agent: Agent, threads: Callable[[], Sequence[threading.Thread]],
                 notifier: Notifier | None = None) -> None:
        self._agent = agent
        self._threads = threads
        self.notifier = notifier or Notifier()
        self._ready = False
        self._last_ping = float("-inf")
        self._started = time.monotonic()
        self._http: OpsHTTPServer | None = None
        self._dashboard: Dashboard | None = None
        self._recorder: Recorder | None = None  # the dashboard's history (elections, ...)
        self._probe = redis_client(agent.cfg.redis, socket_timeout=REDIS_PROBE_TIMEOUT_S,
                                   connect_timeout=REDIS_PROBE_TIMEOUT_S, retries=0)
        self._log = structlog.get_logger("cronsul.ops").bind(node=agent.cfg.agent.node)
        agent.metrics.attach(
            Probes(is_leader=self.is_leader, lease_remaining_s=self._lease_remaining,
                   draining=lambda: agent.maintenance.active,
                   running=lambda: agent.consumer.running,
                   queues=lambda: agent.cfg.worker.queues,
                   jobs=lambda: list(agent.cfg.jobs)),
            # The probe client fails fast: a scrape must answer while Redis is down, not ride
            # out the agent client's retry budget (scrapers time out after a few seconds).
            self._probe, Keys(agent.cfg.redis.key_prefix),
        )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """After the agent's threads are running: serve HTTP when configured."""
        self._started = time.monotonic()
        http = self._agent.cfg.http
        if http.listen is not None:
            self._dashboard = Dashboard(lambda: self._agent.cfg)
            self._http = OpsHTTPServer(http.host, http.port, self._agent.metrics.registry,
                                       self.health, self._dashboard)
            self._http.start()
            self._log.info("http_listening", listen=f"{http.host}:{self._http.port}")
        self._recorder = recorder_for(self._agent, self, self.http_port)
        self._recorder.start()
        if self.notifier.watchdog_interval_s is not None:
            self._log.info("systemd_watchdog", ping_every_s=self.notifier.watchdog_interval_s)
        self.tick()

    def tick(self) -> None:
        """From the main loop: READY once, STATUS on change, WATCHDOG while not wedged."""
        wedged = self.wedged()
        status = self.role()
        if not self._ready and not wedged and self._agent.membership.registered.is_set():
            self._ready = True
            self.notifier.ready(status)
            self._log.info("agent_ready", status=status)
        elif self._ready:
            self.notifier.status(status)
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        if wedged:
            self._log.error("agent_wedged", reasons=wedged)  # systemd will restart us
            return
        now = time.monotonic()
        if now - self._last_ping >= interval:
            self._last_ping = now
            self.notifier.watchdog()

    def stopping(self) -> None:
        self.notifier.stopping()

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
        if self._http is not None:
            self._http.close()
        if self._dashboard is not None:
            self._dashboard.close()
        self._probe.close()

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.port

    # -- state ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self._agent.elector.term is not None and self._agent.elector.lease.valid()

    def _lease_remaining(self) -> float:
        return self._agent.elector.lease.remaining() if self.is_leader() else 0.0

    def role(self) -> str:
        if self._agent.maintenance.active:
            return "draining"
        return "leader" if self.is_leader() else "follower"

    def wedged(self) -> list[str]:
        """Reasons the agent is stuck in a way a restart fixes; empty when it is not."""
        a = self._agent
        now = time.monotonic()
        reasons = [f"thread {t.name} died" for t in self._threads() if not t.is_alive()]
        beat_budget = a.cfg.consul.check_ttl.total_seconds() / 3 + 3 * CALL_TIMEOUT_S
        if now - max(a.membership.last_beat, self._started) > beat_budget + WEDGE_SLACK_S:
            reasons.append("membership heartbeat loop stuck")
        if now - max(a.maintenance.last_poll, self._started) > (
                POLL_S + CALL_TIMEOUT_S + WEDGE_SLACK_S):
            reasons.append("maintenance watch loop stuck")
        return reasons

    def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: ok only when registered, Consul and Redis answer, and nothing is wedged."""
        a = self._agent
        reasons = self.wedged()
        if not a.membership.registered.is_set():
            reasons.append("not registered with Consul")
        fresh = max(CONSUL_FRESH_S, a.cfg.consul.check_ttl.total_seconds())
        consul_age = time.monotonic() - max(a.membership.last_ok, a.maintenance.last_ok)
        if consul_age > fresh:
            reasons.append(f"Consul agent not answering for {consul_age:.0f}s")
        try:
            self._probe.ping()
            redis_ok = True
        except redis.RedisError as exc:
            redis_ok = False
            reasons.append(f"Redis not answering: {redact(str(exc))[:200]}")
        body: dict[str, Any] = {
            "status": "ok" if not reasons else "unhealthy",
            "node": a.cfg.agent.node,
            "role": self.role(),
            "draining": a.maintenance.reason,
            "registered": a.membership.registered.is_set(),
            "consul_last_answer_s": round(consul_age, 3) if consul_age != float("inf") else None,
            "redis": redis_ok,
            "running": a.consumer.running,
            "reasons": reasons,
            # Not unhealthy, but an operator should know: the file on disk is not what runs.
            "warnings": ([f"config reload refused at {a.reload_refused}"]
                         if a.reload_refused else []),
        }
        return not reasons, body
