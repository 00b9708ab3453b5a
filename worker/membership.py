"""Service registration and the TTL health check that keeps this node's session alive."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime

import structlog

import consul
from scheduler.runs import iso_utc
from worker.consulapi import CONSUL_ERRORS

SERVICE_NAME = "cronsul"


class Membership:
    """Registers ``cronsul-<node>`` with a TTL check and passes it every check_ttl/3."""

    def __init__(self, client: consul.Consul, node: str, address: str, check_ttl_s: float,
                 meta: dict[str, str], known_key: str | None = None) -> None:
        self._c = client
        # <prefix>/nodes/<node>: this node's record of itself, kept when it stops (a stopped
        # service leaves the catalog, and `cronsul status` would not know it is missing).
        self._known_key = known_key
        self.node = node
        self.service_id = f"{SERVICE_NAME}-{node}"
        self.check_id = f"service:{self.service_id}"
        self._address = address
        self._ttl = check_ttl_s
        self._meta = meta
        self._log = structlog.get_logger("cronsul.membership").bind(node=node)
        self.registered = threading.Event()
        # Set by deregister (shutdown): the heartbeat, still running while the runs drain,
        # must not register the service again (it would stay in Consul, critical, after the
        # agent is gone). The lock orders a re-registration against the deregistration.
        self._leaving = False
        self._leave_lock = threading.Lock()
        self.healthy = True  # cleared while the agent should look unhealthy (wedged)
        # Monotonic times of the last heartbeat that completed (either way) and that succeeded:
        # the first shows the loop is not wedged, the second that Consul answers (/healthz).
        self.last_beat = time.monotonic()
        self.last_ok = float("-inf")

    def register(self) -> None:
        # Register passing: a session listing a critical check cannot be created, and a TTL
        # check registered without a status starts critical (consul-semantics.md).
        self._c.agent.service.register(
            SERVICE_NAME, service_id=self.service_id, address=self._address,
            tags=["cronsul"], meta=self._meta,
            check={"TTL": f"{self._ttl:g}s", "Status": "passing",
                   # A node that vanished for good leaves no ghost service behind.
                   "DeregisterCriticalServiceAfter": "24h",
                   "Notes": "passed by the cronsul agent every check_ttl/3"},
        )
        # Re-registering keeps the check's old status (a restarted agent's check may still be
        # critical from its dead predecessor), so pass it explicitly before anyone relies on it.
        if not self._c.agent.check.ttl_pass(self.check_id, notes="registered"):
            raise consul.NotFound(f"check {self.check_id} missing right after registration")
        self.last_ok = time.monotonic()
        self.registered.set()
        self._log.info("service_registered", service_id=self.service_id)
        self._record_known(None)

    def _record_known(self, stopped_at: str | None) -> None:
        """Best effort: a node missing from `status`'s known nodes is only less visible."""
        if self._known_key is None:
            return
        body = {"node": self.node, "address": self._address, "pid": os.getpid(),
                "at": iso_utc(datetime.now(UTC)),
                "stopped": stopped_at is not None}
        try:
            self._c.kv.put(self._known_key, json.dumps(body, separators=(",", ":")))
        except CONSUL_ERRORS as exc:
            self._log.warning("known_node_record_failed", error=str(exc)[:200])

    def update_meta(self, meta: dict[str, str]) -> None:
        """New service Meta (the config hash after a reload); re-registering keeps the check."""
        self._meta = meta
        try:
            self.register()
        except CONSUL_ERRORS as exc:
            self._log.warning("register_failed", error=str(exc)[:200])

    def heartbeat(self) -> bool:
        """Pass the TTL check; re-register when Consul forgot us (its state was lost)."""
        try:
            return self._heartbeat()
        finally:
            self.last_beat = time.monotonic()

    def _heartbeat(self) -> bool:
        if self._leaving:
            return False
        try:
            # python-consul2 answers a 404 (the check is gone: Consul lost its state) with
            # False rather than an exception; both mean "register again".
            if not self._c.agent.check.ttl_pass(self.check_id, notes="ok"):
                raise consul.NotFound(f"check {self.check_id} is not registered")
            self.last_ok = time.monotonic()
            return True
        except CONSUL_ERRORS as exc:
            # 404 on new Consul, 500 "does not have associated TTL" on 1.10: both mean the
            # check is gone. Anything else is a transient failure; either way re-register.
            with self._leave_lock:
                if self._leaving:  # the check is gone because we deregistered: stay gone
                    return False
                self._log.warning("check_pass_failed", error=str(exc)[:200])
                try:
                    self.register()
                    return True
                except CONSUL_ERRORS as exc2:
                    self._log.warning("register_failed", error=str(exc2)[:200])
                    return False

    def deregister(self) -> None:
        """Leave for good (shutdown): no heartbeat registers the service again afterwards."""
        with self._leave_lock:
            self._leaving = True
            try:
                self._c.agent.service.deregister(self.service_id)
                self._log.info("service_deregistered", service_id=self.service_id)
            except CONSUL_ERRORS as exc:
                self._log.warning("deregister_failed", error=str(exc)[:200])
            self.registered.clear()
        self._record_known("stopped")

    def run(self, stop: threading.Event) -> None:
        """The heartbeat loop (its own thread)."""
        interval = self._ttl / 3
        while not stop.wait(interval):
            self.heartbeat()
