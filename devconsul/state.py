"""The dev server's replicated state: tables, one global Raft-like index, change tracking.

Pure: no threads, no I/O, no clock reads. Every mutation is an "apply" at one index ``idx``
(``State.index + 1``), the way a Raft log entry is applied by Consul's FSM; every table it
touches gets ``idx`` as its table index, so indexes only ever grow. Callers (``store.Store``)
serialise applies with a lock, pass ``now`` from the injected clock, and collect ``changes``
to wake blocking queries.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from devconsul.model import Check, KVEntry, Node, Service, Session

TABLES = ("kvs", "sessions", "nodes", "services", "checks")


@dataclass
class Changes:
    """What one or more applies touched: tables and, for the KV table, keys."""

    tables: set[str] = field(default_factory=set)
    kv_keys: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def merge(self, other: Changes) -> None:
        self.tables |= other.tables
        self.kv_keys |= other.kv_keys


TimerKey = tuple[str, ...]


class State:
    def __init__(self) -> None:
        self.index = 0
        self.table_index: dict[str, int] = dict.fromkeys(TABLES, 0)
        self.kvs: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        # Lock-delay expiry per key (clock time). Like Consul, kept by the leader only and
        # not persisted: a restart forgets them (agent/consul/state/delay.go).
        self.lock_delays: dict[str, float] = {}
        self.sessions: dict[str, Session] = {}
        self.nodes: dict[str, Node] = {}
        self.services: dict[tuple[str, str], Service] = {}
        self.checks: dict[tuple[str, str], Check] = {}
        # Extra agent endpoints: node name -> port (persisted so a restart keeps the ports).
        self.agents: dict[str, int] = {}
        self.changes = Changes()
        self._timers: list[tuple[float, int, str, TimerKey]] = []
        self._seq = itertools.count()
        self.timers_moved_earlier = False

    # -- indexes ---------------------------------------------------------------------------

    def next_index(self) -> int:
        return self.index + 1

    def touch(self, table: str, idx: int) -> None:
        self.table_index[table] = idx
        if idx > self.index:
            self.index = idx
        self.changes.tables.add(table)

    def touch_key(self, key: str, idx: int) -> None:
        self.touch("kvs", idx)
        self.changes.kv_keys.add(key)

    def take_changes(self) -> Changes:
        out, self.changes = self.changes, Changes()
        return out

    def max_index(self, *tables: str) -> int:
        """The highest index of the given tables, never below 1 (agent/consul/rpc.go)."""
        return max(1, *(self.table_index[t] for t in tables))

    # -- timers ----------------------------------------------------------------------------

    def schedule(self, when: float, kind: str, key: TimerKey) -> None:
        """Arm a deadline. Stale entries stay in the heap and are skipped when they fire."""
        if not self._timers or when < self._timers[0][0]:
            self.timers_moved_earlier = True
        heapq.heappush(self._timers, (when, next(self._seq), kind, key))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def pop_due(self, now: float) -> list[tuple[float, str, TimerKey]]:
        due: list[tuple[float, str, TimerKey]] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, kind, key = heapq.heappop(self._timers)
            due.append((when, kind, key))
        return due

    def clear_timers(self) -> None:
        self._timers.clear()

    # -- lookups ---------------------------------------------------------------------------

    def node_checks(self, node: str) -> list[Check]:
        return [c for (n, _), c in sorted(self.checks.items()) if n == node]

    def service_checks(self, node: str, service_id: str) -> list[Check]:
        return [c for c in self.node_checks(node) if c.service_id == service_id]
