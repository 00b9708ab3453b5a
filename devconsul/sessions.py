"""Sessions, after hashicorp/consul agent/session_endpoint.go, agent/consul/session_endpoint.go,
agent/consul/session_ttl.go and agent/consul/state/session.go."""

from __future__ import annotations

import uuid
from typing import Any

from devconsul import kv
from devconsul.durations import format_duration, parse_duration
from devconsul.errors import BadRequest, ConsulError
from devconsul.model import CRITICAL, SERF_CHECK_ID, Json, Session
from devconsul.state import State

DEFAULT_LOCK_DELAY = 15.0  # agent/session_endpoint.go: LockDelay 15 * time.Second
MAX_LOCK_DELAY = 60.0  # structs.MaxLockDelay
LOCK_DELAY_SECONDS_THRESHOLD = 1000  # numbers below this are seconds, not nanoseconds
SESSION_TTL_MIN = 10.0  # server config SessionTTLMin
SESSION_TTL_MAX = 24 * 3600.0  # structs.SessionTTLMax
SESSION_TTL_MULTIPLIER = 2  # structs.SessionTTLMultiplier: the server waits 2 x TTL


def _field(body: Json, name: str) -> tuple[bool, Any]:
    for k, v in body.items():
        if k.lower() == name.lower():
            return True, v
    return False, None


def _lock_delay(raw: Any) -> float:
    """Session.UnmarshalJSON: strings are Go durations, numbers nanoseconds; either, when below
    1000 (ns), is taken as seconds."""
    if isinstance(raw, str):
        try:
            secs = parse_duration(raw)
        except ValueError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from exc
        return secs * 1e9 if secs * 1e9 < LOCK_DELAY_SECONDS_THRESHOLD else secs
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw) if raw < LOCK_DELAY_SECONDS_THRESHOLD else raw / 1e9
    raise BadRequest(f"Request decode failed: bad LockDelay {raw!r}")


def _str_list(raw: Any, name: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"Request decode failed: {name} must be a list")
    out: list[str] = []
    for item in raw:
        if isinstance(item, dict):  # ServiceChecks: [{"ID": ..., "Namespace": ...}]
            item = _field(item, "ID")[1]
        out.append(str(item))
    return out


def create(st: State, idx: int, now: float, default_node: str, body: Json) -> Session:
    """Session create with the HTTP endpoint's defaults and fixupEmptySessionChecks."""
    name = str(_field(body, "Name")[1] or "")
    node = str(_field(body, "Node")[1] or default_node)
    has_checks, raw_checks = _field(body, "Checks")
    has_node_checks, raw_node_checks = _field(body, "NodeChecks")
    checks = _str_list(raw_checks, "Checks") if has_checks else [SERF_CHECK_ID]
    node_checks = (_str_list(raw_node_checks, "NodeChecks") if has_node_checks
                   else [SERF_CHECK_ID])
    service_checks = _str_list(_field(body, "ServiceChecks")[1], "ServiceChecks")
    # fixupEmptySessionChecks (agent/session_endpoint.go)
    if not checks:
        node_checks = []
    elif checks == [SERF_CHECK_ID] or not node_checks:
        checks = []
    has_delay, raw_delay = _field(body, "LockDelay")
    lock_delay = _lock_delay(raw_delay) if has_delay and raw_delay is not None \
        else DEFAULT_LOCK_DELAY
    behavior = str(_field(body, "Behavior")[1] or "release")
    if behavior not in ("release", "delete"):
        raise ConsulError(f"Invalid Behavior setting '{behavior}'")
    ttl = str(_field(body, "TTL")[1] or "")
    ttl_seconds = 0.0
    if ttl:
        try:
            ttl_seconds = parse_duration(ttl)
        except ValueError as exc:
            raise ConsulError(f"Session TTL '{ttl}' invalid: {exc}") from exc
        if ttl_seconds != 0 and not SESSION_TTL_MIN <= ttl_seconds <= SESSION_TTL_MAX:
            raise ConsulError(
                f"Invalid Session TTL '{round(ttl_seconds * 1e9)}', must be between "
                f"[{format_duration(SESSION_TTL_MIN)}={format_duration(SESSION_TTL_MAX)}]"
            )
    if node not in st.nodes:
        raise ConsulError("Missing node registration")
    sess = Session(
        id=str(uuid.uuid4()), name=name, node=node, lock_delay=lock_delay, behavior=behavior,
        ttl=ttl, ttl_seconds=ttl_seconds, node_checks=node_checks,
        service_checks=service_checks, checks=checks, create_index=idx, modify_index=idx,
    )
    # validateSessionChecksTxn (agent/consul/state/session_oss.go)
    for cid in sess.check_ids():
        check = st.checks.get((node, cid))
        if check is None:
            raise ConsulError(f"Missing check '{cid}' registration")
        if check.status == CRITICAL:
            raise ConsulError(f"Check '{cid}' is in critical state")
    st.sessions[sess.id] = sess
    st.touch("sessions", idx)
    arm_ttl(st, sess, now)
    return sess


def arm_ttl(st: State, sess: Session, now: float) -> None:
    """session_ttl.go resetSessionTimer: the server invalidates at 2 x TTL."""
    if sess.ttl_seconds > 0:
        sess.deadline = now + sess.ttl_seconds * SESSION_TTL_MULTIPLIER
        st.schedule(sess.deadline, "session", (sess.id,))


def renew(st: State, now: float, session_id: str) -> Session | None:
    sess = st.sessions.get(session_id)
    if sess is not None:
        arm_ttl(st, sess, now)
    return sess


def destroy(st: State, idx: int, now: float, session_id: str) -> None:
    """deleteSessionTxn: unknown ids are fine; held keys get lock-delay then release/delete."""
    sess = st.sessions.pop(session_id, None)
    if sess is None:
        return
    st.touch("sessions", idx)
    kv.release_session_keys(st, idx, now, sess.id, sess.behavior,
                            min(sess.lock_delay, MAX_LOCK_DELAY))


def ttl_fired(st: State, idx: int, now: float, session_id: str, when: float) -> None:
    sess = st.sessions.get(session_id)
    if sess is not None and sess.deadline == when:
        destroy(st, idx, now, session_id)


def invalidate_for_check(st: State, idx: int, now: float, node: str, check_id: str) -> None:
    """A listed check turned critical or went away: every session depending on it dies
    (ensureCheckTxn / deleteCheckTxn in agent/consul/state/catalog.go)."""
    for sess in list(st.sessions.values()):
        if sess.node == node and check_id in sess.check_ids():
            destroy(st, idx, now, sess.id)


def node_sessions(st: State, node: str) -> list[Session]:
    return [s for s in sorted(st.sessions.values(), key=lambda s: s.create_index)
            if s.node == node]
