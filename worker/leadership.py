"""Leader election on a Consul session lock: HashiCorp's api/lock.go, with its gaps closed.

Algorithm (api/lock.go): create a session; loop { blocking GET of the key; if another session
holds it, block on its index; else acquire; if acquire says false and the key has no Session,
lock-delay is in force: sleep and retry }. While leading, watch the key with ``?consistent``
blocking reads; leadership is lost when the key is gone or its Session is not ours. Unlock is
release, then destroy: a clean handover with no lock-delay for the successor.

Gaps closed (consul-semantics.md, Consul issues #18271, #9788, #4935):
* every HTTP call has a timeout (blocking reads: wait + wait/16 + margin);
* the leader works only while a local lease is valid: last confirmation + min(session TTL,
  lock-delay) - margin, on the monotonic clock, so a partitioned or frozen leader stops on its
  own before anybody else can have taken the key;
* after any doubt the session is abandoned (release, destroy) and a fresh one created;
* stale sessions of this node left by a crashed predecessor process are destroyed at start.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

import consul
from scheduler.clock import Clock
from scheduler.runs import iso_utc
from worker.config import ConsulSection
from worker.consulapi import CONSUL_ERRORS, ConsulClients, acl_denied, acl_message
from worker.membership import Membership

# Taken off the local lease so that our deadline passes before the earliest moment another
# session could acquire the key, even with the two clocks running at slightly different rates
# and the request's own latency unaccounted for.
LEASE_MARGIN_S = 0.5
# While contending, a blocking read waits at most this long; the session is renewed between
# reads, so it must stay well below session_ttl/2.
CONTEND_WAIT_S = 5.0
# Retry pause when acquire is refused by lock-delay (api/lock.go uses DefaultLockRetryTime 5s;
# we retry faster because failover time is a promise here and a retry costs one request).
LOCK_DELAY_RETRY_S = 0.25
# Pause after a Consul error before trying again, so an outage is not a tight loop.
ERROR_BACKOFF_S = 1.0
# The reason logged when this node gave the lock up itself (it became ineligible: draining,
# maintenance): a hand-over, logged at info as leadership_released, not a loss.
STEPPED_DOWN = "stepped down: no longer eligible"


@dataclass(frozen=True)
class Term:
    """One period of leadership."""

    session: str
    index: int  # the leader key's ModifyIndex read right after our acquire: the fence base
    since: datetime


class LocalLease:
    """Valid until a deadline on the monotonic clock, pushed forward by each confirmation."""

    def __init__(self, clock: Clock, length_s: float) -> None:
        self._clock = clock
        self.length_s = length_s
        self._deadline = float("-inf")
        self._lock = threading.Lock()

    def confirm(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` proved we held the key at that moment."""
        with self._lock:
            self._deadline = max(self._deadline, sent_at + self.length_s)

    def revoke(self) -> None:
        with self._lock:
            self._deadline = float("-inf")

    def remaining(self) -> float:
        return max(0.0, self._deadline - self._clock.monotonic())

    def valid(self) -> bool:
        return self._clock.monotonic() < self._deadline


class Elector:
    """Contends for ``<prefix>/leader``; exposes the current term and the local lease."""

    def __init__(self, clients: ConsulClients, cfg: ConsulSection, membership: Membership,
                 address: str, clock: Clock, eligible: Callable[[], bool],
                 on_change: Callable[[Term | None], None]) -> None:
        self._c = clients.call
        self._b = clients.blocking
        self._cfg = cfg
        self._membership = membership
        self._node = membership.node
        self._address = address
        self._clock = clock
        self._eligible = eligible
        self._on_change = on_change
        self._key = cfg.leader_key
        self._ttl_s = cfg.session_ttl.total_seconds()
        self._lock_delay_s = cfg.lock_delay.total_seconds()
        self.lease = LocalLease(clock, min(self._ttl_s, self._lock_delay_s) - LEASE_MARGIN_S)
        self._monitor_wait_s = max(0.1, self.lease.length_s / 3)
        self._session: str | None = None
        self._orphans: set[str] = set()  # abandoned sessions Consul could not be told about
        self._last_renew = 0.0
        self._term: Term | None = None
        self._mutex = threading.Lock()
        self._log = structlog.get_logger("cronsul.leadership").bind(node=self._node)
        self.session_name = f"cronsul-{self._node}"

    @property
    def term(self) -> Term | None:
        return self._term

    # -- the thread -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._destroy_stale_sessions()
        while not stop.is_set():
            if not self._eligible() or not self._membership.registered.is_set():
                stop.wait(0.5)
                continue
            try:
                self._clean_orphans()
                sid = self._session or self._create_session()
                if self._contend(sid, stop):
                    self._lead(sid, stop)
            except CONSUL_ERRORS as exc:
                if acl_denied(exc):
                    operation = "lock" if self._session else "session"
                    self._log.error("consul_acl_denied",
                                    error=acl_message(operation, self._cfg.prefix, exc))
                else:
                    self._log.warning("consul_error", error=str(exc)[:300])
                self._lost("consul error")
                stop.wait(ERROR_BACKOFF_S)

    def _contend(self, sid: str, stop: threading.Event) -> bool:
        index: int | None = None
        while not stop.is_set() and self._eligible():
            self._maybe_renew(sid)
            wait = f"{int(min(CONTEND_WAIT_S, self._ttl_s / 4) * 1000)}ms"
            new_index, entry = self._b.kv.get(self._key, index=index, wait=wait)
            new_index = int(new_index)
            holder = (entry or {}).get("Session")
            if holder == sid:
                return True  # ours already (e.g. value update raced); go lead
            if holder:
                # Index went backwards (snapshot restore): start over from zero.
                index = new_index if index is None or new_index >= index else None
                continue
            if not self._eligible():
                return False  # became ineligible (maintenance) while we were blocked
            sent = self._clock.monotonic()
            if self._c.kv.put(self._key, self._value(sid, None), acquire=sid):
                self.lease.confirm(sent)
                return True
            # Refused with no holder shown: lock-delay is in force (or a race we lost).
            index = None
            stop.wait(LOCK_DELAY_RETRY_S)
        return False

    def _lead(self, sid: str, stop: threading.Event) -> None:
        sent = self._clock.monotonic()
        _, entry = self._c.kv.get(self._key, consistency="consistent")
        if not entry or entry.get("Session") != sid:
            self._lost("key not ours right after acquire")
            return
        self.lease.confirm(sent)
        fence_index = int(entry["ModifyIndex"])
        since = self._clock.now()
        # Publish the fence in the value (a re-acquire with our own session only updates it).
        self._c.kv.put(self._key, self._value(sid, fence_index, since), acquire=sid)
        with self._mutex:
            self._term = Term(sid, fence_index, since)
        self._log.info("leadership_acquired", session=sid, fence=fence_index)
        self._on_change(self._term)
        index = 0
        wait = f"{int(self._monitor_wait_s * 1000)}ms"
        while not stop.is_set():
            if not self._eligible():
                self._lost(STEPPED_DOWN)
                return
            self._maybe_renew(sid)
            sent = self._clock.monotonic()
            new_index, entry = self._b.kv.get(self._key, index=index or None, wait=wait,
                                              consistency="consistent")
            if stop.is_set():
                return
            if not entry or entry.get("Session") != sid:
                if not self._eligible():  # step_down released it: deliberate, not a loss
                    self._lost(STEPPED_DOWN)
                else:
                    self._lost("key released or taken" if entry else "key deleted")
                return
            self.lease.confirm(sent)
            new_index = int(new_index)
            index = new_index if new_index >= index else 0

    def _maybe_renew(self, sid: str) -> None:
        now = self._clock.monotonic()
        if now - self._last_renew < self._ttl_s / 2:
            return
        try:
            self._c.session.renew(sid)
            self._last_renew = now
        except CONSUL_ERRORS as exc:
            # lock.go keeps retrying until TTL has passed since the last success; a single
            # 500 such as "No cluster leader" is not lost leadership. NotFound is.
            if "NotFound" in type(exc).__name__ or now - self._last_renew > self._ttl_s:
                raise
            self._log.warning("session_renew_failed", error=str(exc)[:200])

    # -- sessions ---------------------------------------------------------------------------

    def _create_session(self) -> str:
        sid: str = self._c.session.create(
            name=self.session_name,
            checks=["serfHealth", self._membership.check_id],
            lock_delay=self._lock_delay_s,
            behavior="release",
            ttl=int(self._ttl_s),
        )
        with self._mutex:
            self._session = sid
        self._last_renew = self._clock.monotonic()
        self._log.info("session_created", session=sid)
        return sid

    def _destroy_stale_sessions(self) -> None:
        """Sessions of a previous process of this node still hold the lock until their TTL runs
        out (a restarted agent re-registers and keeps the check passing): free them now."""
        try:
            consul_node = self._c.agent.self()["Config"]["NodeName"]
            _, sessions = self._c.session.node(consul_node)
            for s in sessions or []:
                if s.get("Name") == self.session_name:
                    self._c.kv.put(self._key, "", release=s["ID"])
                    self._c.session.destroy(s["ID"])
                    self._log.info("stale_session_destroyed", session=s["ID"])
        except CONSUL_ERRORS as exc:
            self._log.warning("stale_session_cleanup_failed", error=str(exc)[:200])

    def _lost(self, reason: str) -> None:
        """Any doubt: stop leading, release, destroy the session, start afresh next time."""
        self.lease.revoke()
        with self._mutex:
            was, self._term = self._term, None
            sid, self._session = self._session, None
        if was is not None:
            deliberate = reason in ("shutdown", STEPPED_DOWN)
            level = self._log.info if deliberate else self._log.warning
            level("leadership_released" if deliberate else "leadership_lost",
                  reason=reason, session=was.session)
            self._on_change(None)
        if sid is not None:
            self._release_and_destroy(sid)

    def _release_and_destroy(self, sid: str) -> None:
        """Release, then destroy. If Consul cannot be reached the session is remembered and
        cleaned up before the next one is created: left alone it would keep holding the key
        until its TTL ran out (2 x session_ttl with no leader at all)."""
        try:
            self._c.kv.put(self._key, "", release=sid)
            self._c.session.destroy(sid)
            self._orphans.discard(sid)
        except CONSUL_ERRORS as exc:
            self._orphans.add(sid)
            self._log.warning("session_cleanup_failed", session=sid, error=str(exc)[:200])

    def _clean_orphans(self) -> None:
        for sid in list(self._orphans):
            self._release_and_destroy(sid)
            if sid in self._orphans:
                raise consul.ConsulException(f"session {sid} not yet released")

    def shutdown(self) -> None:
        """Clean handover: revoke the lease, release the key, destroy the session."""
        self._lost("shutdown")

    def step_down(self) -> None:
        """Stop leading now (called from another thread when this node became ineligible).

        Revokes the lease at once (the scheduler stops before its next pass) and releases the
        key: no lock-delay applies, so a contender blocked on the key takes it within
        milliseconds, and our own monitor read returns, sees the key is no longer ours and
        destroys the session. Without this the elector would notice ineligibility only after
        its current monitor read, up to lease/3 later."""
        with self._mutex:
            sid = self._session if self._term is not None else None
        if sid is None:
            return
        self.lease.revoke()
        try:
            self._c.kv.put(self._key, "", release=sid)
        except CONSUL_ERRORS as exc:
            self._log.warning("release_failed", error=str(exc)[:200])

    def _value(self, sid: str, fence: int | None, since: datetime | None = None) -> str:
        body: dict[str, Any] = {
            "node": self._node, "address": self._address, "pid": os.getpid(),
            "session": sid, "since": iso_utc(since or self._clock.now()), "fence": fence,
        }
        return json.dumps(body, separators=(",", ":"))
