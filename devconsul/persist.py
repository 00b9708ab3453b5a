"""Saving and reloading the state (``--data-dir``), like a Consul server's Raft snapshot.

Deadlines are not saved: on reload, like after a real leader change, session TTL timers
restart at the full 2 x TTL, check TTLs restart at their full TTL, and lock-delays are gone
(agent/consul/session_ttl.go initializeSessionTimers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from devconsul import catalog, sessions
from devconsul.model import CRITICAL, Check, KVEntry, Node, Service, Session
from devconsul.state import TABLES, State

FORMAT_VERSION = 1
STATE_FILE = "state.json"


def dump(st: State) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "index": st.index,
        "table_index": st.table_index,
        "kvs": [e.to_state() for e in st.kvs.values()],
        "tombstones": st.tombstones,
        "sessions": [s.to_state() for s in st.sessions.values()],
        "nodes": [dict(n.__dict__) for n in st.nodes.values()],
        "services": [dict(s.__dict__) for s in st.services.values()],
        "checks": [c.to_state() for c in st.checks.values()],
        "agents": st.agents,
    }


def load(raw: dict[str, Any], now: float) -> State:
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported state format {raw.get('version')!r}")
    st = State()
    st.index = int(raw["index"])
    st.table_index = {t: int(raw["table_index"].get(t, 0)) for t in TABLES}
    st.kvs = {e["key"]: KVEntry.from_state(e) for e in raw["kvs"]}
    st.tombstones = {str(k): int(v) for k, v in raw["tombstones"].items()}
    st.nodes = {n["name"]: Node(**n) for n in raw["nodes"]}
    st.services = {(s["node"], s["id"]): Service(**s) for s in raw["services"]}
    st.checks = {(c["node"], c["id"]): Check.from_state(c) for c in raw["checks"]}
    st.sessions = {s["id"]: Session.from_state(s) for s in raw["sessions"]}
    st.agents = {str(k): int(v) for k, v in raw["agents"].items()}
    for sess in st.sessions.values():
        sessions.arm_ttl(st, sess, now)
    for check in st.checks.values():
        if check.ttl > 0:
            check.ttl_deadline = now + check.ttl
            st.schedule(check.ttl_deadline, "check", (check.node, check.id))
        if check.status == CRITICAL and check.deregister_after > 0 and check.service_id:
            check.reap_deadline = now + max(check.deregister_after, catalog.MIN_DEREGISTER_AFTER)
            st.schedule(check.reap_deadline, "reap", (check.node, check.id))
    return st


def save(st: State, data_dir: Path) -> None:
    """Write atomically: a crash leaves either the old file or the new one."""
    target = data_dir / STATE_FILE
    tmp = data_dir / (STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(dump(st), fh, separators=(",", ":"))
    os.replace(tmp, target)


def read(data_dir: Path, now: float) -> State | None:
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        return load(json.load(fh), now)
