"""Drain on Consul maintenance: the operator's switch for taking a node out of service.

``consul maint -enable`` (node maintenance, check ``_node_maintenance``) or service maintenance
on ``cronsul-<node>`` (check ``_service_maintenance:cronsul-<node>``; what ``cronsul drain``
sets) makes the agent drain:

* it is no longer eligible for leadership and, if it leads, steps down at once (the key is
  released, so a contender takes over within milliseconds, no lock-delay);
* it takes no new runs (the consumer's ``accepting`` event is cleared) and lets running ones
  finish; their leases keep being renewed;
* it reports ``draining`` (sd_notify STATUS, /healthz detail, the ``cronsul_draining`` metric,
  a log line).

Leaving maintenance undoes all three. Maintenance never invalidates the session (Consul adds a
separate critical check that the session does not list), which is why cronsul watches for it.

The watch polls the local agent's ``/v1/agent/checks`` every second: the local agent knows its
own maintenance checks at once, even when the servers are unreachable, and the call is cheap.
"""

from __future__ import annotations

import getpass
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

import consul
from scheduler.errors import ConnectionFailure, CronsulError
from worker.config import Config
from worker.consulapi import CALL_TIMEOUT_S, CONSUL_ERRORS, make_clients
from worker.membership import SERVICE_NAME

NODE_MAINT_CHECK = "_node_maintenance"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
# Poll period of the local agent's checks: detection latency, well inside the 2 s promise for
# a leader to step down.
POLL_S = 1.0


def service_id(node: str) -> str:
    return f"{SERVICE_NAME}-{node}"


def maintenance_reason(checks: Mapping[str, Any], svc_id: str) -> str | None:
    """The reason text when ``checks`` (``/v1/agent/checks``) put this node in maintenance."""
    for check_id in (NODE_MAINT_CHECK, SERVICE_MAINT_PREFIX + svc_id):
        check = checks.get(check_id)
        if check is not None:
            notes = str(check.get("Notes") or "").strip()
            scope = "node" if check_id == NODE_MAINT_CHECK else "service"
            return f"{scope} maintenance" + (f": {notes}" if notes else "")
    return None


class MaintenanceWatch:
    """Polls this node's checks; drains while in maintenance, resumes when it ends."""

    def __init__(self, client: consul.Consul, svc_id: str, accepting: threading.Event,
                 step_down: Callable[[], None], running: Callable[[], int],
                 stopping: threading.Event) -> None:
        self._c = client
        self._service_id = svc_id
        self._accepting = accepting
        self._step_down = step_down
        self._running = running
        self._stopping = stopping
        self._reason: str | None = None
        self._announced_idle = False
        self.last_poll = time.monotonic()  # the loop's progress (wedge detection)
        self.last_ok = float("-inf")  # last time the local Consul agent answered
        self._log = structlog.get_logger("cronsul.maintenance").bind(service_id=svc_id)

    @property
    def active(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll_once()
            stop.wait(POLL_S)

    def poll_once(self) -> None:
        try:
            checks = self._c.agent.checks()
        except CONSUL_ERRORS as exc:
            # Keep the last known state: an unreachable agent is no reason to stop or start
            # draining (leadership already depends on Consul through the session).
            self._log.warning("maintenance_poll_failed", error=str(exc)[:200])
            return
        finally:
            self.last_poll = time.monotonic()
        self.last_ok = time.monotonic()
        self.apply(maintenance_reason(checks or {}, self._service_id))

    def apply(self, reason: str | None) -> None:
        """Enter, stay in or leave the draining state."""
        if reason is not None and self._reason is None:
            self._reason = reason  # first, so _eligible() is already False when we step down
            self._accepting.clear()
            self._step_down()
            self._announced_idle = False
            self._log.warning("draining", reason=reason, running=self._running())
        elif reason is None and self._reason is not None:
            self._reason = None
            if not self._stopping.is_set():  # shutdown drains for good
                self._accepting.set()
            self._log.info("drain_ended")
        elif reason is not None and not self._announced_idle and self._running() == 0:
            self._announced_idle = True
            self._log.info("drained", reason=reason)


def set_drain(cfg: Config, enable: bool, reason: str | None = None) -> str:
    """Toggle service maintenance on this node's ``cronsul-<node>`` through the local Consul
    agent (the one in ``[consul] address``): what ``cronsul drain`` / ``undrain`` run."""
    svc = service_id(cfg.agent.node)
    if enable and not reason:
        reason = f"cronsul drain by {_who()}"
    c = make_clients(cfg.consul, CALL_TIMEOUT_S).call
    where = f"{cfg.consul.host}:{cfg.consul.port}"
    missing = CronsulError(
        f"service {svc} is not registered on the Consul agent at {where}: is the cronsul agent "
        "running on this host with this config?")
    try:
        ok = c.agent.service.maintenance(svc, "true" if enable else "false", reason=reason)
    except consul.ACLPermissionDenied as exc:
        raise CronsulError(f"Consul ACL denied service maintenance on {svc}: the token needs "
                           f'service_prefix "{SERVICE_NAME}" {{ policy = "write" }}') from exc
    except CONSUL_ERRORS as exc:
        if "Unknown service" in str(exc):  # older agents answer 500 rather than 404
            raise missing from exc
        raise ConnectionFailure(f"cannot reach Consul at {where}: {exc}") from exc
    if not ok:  # 404
        raise missing
    return svc


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
