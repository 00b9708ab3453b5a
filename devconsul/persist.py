"""Saving and reloading the state (``--data-dir``), like a Consul server's snapshot + log.

``state.json`` is a full snapshot written atomically (temp file + rename); ``journal.log``
holds one JSON line per KV-only apply after it (the common, hot case), so a KV write costs an
append instead of a snapshot. Lines at or below the snapshot's index are skipped on replay,
and a torn last line is ignored. The journal is folded into a new snapshot every
``MAX_JOURNAL_LINES`` lines and whenever sessions or the catalog change.

Deadlines are not saved: on reload, like after a real leader change, session TTL timers
restart at the full 2 x TTL, check TTLs restart at their full TTL, and lock-delays are gone
(agent/consul/session_ttl.go initializeSessionTimers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from devconsul import catalog, sessions
from devconsul.model import CRITICAL, Check, KVEntry, Node, Service, Session
from devconsul.state import TABLES, Changes, State

FORMAT_VERSION = 1
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.log"
MAX_JOURNAL_LINES = 2000


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


def _replay(st: State, line: str) -> None:
    rec = json.loads(line)
    if int(rec["i"]) <= st.index:
        return
    for raw in rec["set"]:
        st.kvs[raw["key"]] = KVEntry.from_state(raw)
    for key, idx in rec["del"].items():
        st.kvs.pop(key, None)
        st.tombstones[key] = int(idx)
    st.index = int(rec["i"])
    st.table_index["kvs"] = int(rec["t"])


class Persister:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._journal: IO[str] | None = None
        self._lines = 0

    def read(self, now: float) -> State | None:
        path = self.data_dir / STATE_FILE
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as fh:
            st = load(json.load(fh), now)
        journal = self.data_dir / JOURNAL_FILE
        if journal.exists():
            with open(journal, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        _replay(st, line)
                    except (ValueError, KeyError):  # a line torn by a crash: the end
                        break
        return st

    def save(self, st: State) -> None:
        """Write a full snapshot atomically, then start an empty journal."""
        target = self.data_dir / STATE_FILE
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(dump(st), fh, separators=(",", ":"))
        os.replace(tmp, target)
        if self._journal is not None:
            self._journal.close()
        self._journal = open(self.data_dir / JOURNAL_FILE, "w", encoding="utf-8")  # noqa: SIM115
        self._lines = 0

    def commit(self, st: State, changes: Changes) -> None:
        """Persist one apply: a journal line for KV-only changes, else a snapshot."""
        if changes.tables != {"kvs"} or self._journal is None \
                or self._lines >= MAX_JOURNAL_LINES:
            self.save(st)
            return
        rec = {
            "i": st.index,
            "t": st.table_index["kvs"],
            "set": [st.kvs[k].to_state() for k in sorted(changes.kv_keys) if k in st.kvs],
            "del": {k: st.tombstones[k] for k in sorted(changes.kv_keys) if k not in st.kvs},
        }
        self._journal.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._journal.flush()  # in the OS's hands: survives the process being killed
        self._lines += 1

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
