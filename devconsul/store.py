"""The state behind a lock: serialised applies, blocking queries and the TTL timer thread.

Blocking queries never poll: a query that has nothing newer than the client's index registers
a waiter naming what it watches (KV keys, a KV prefix, tables) and sleeps on its own Event;
each apply wakes only the waiters whose watch it touched (like memdb watch channels). One
background thread sleeps until the earliest deadline of a heap (session TTLs, check TTLs,
critical-service reaping) and applies what is due.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from devconsul import catalog, persist, sessions
from devconsul.clock import Clock
from devconsul.state import Changes, State

T = TypeVar("T")
log = logging.getLogger("devconsul")


@dataclass(frozen=True)
class Watch:
    """What a blocking query depends on."""

    tables: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def touched_by(self, changes: Changes) -> bool:
        if any(t in changes.tables for t in self.tables):
            return True
        if any(k in changes.kv_keys for k in self.keys):
            return True
        return any(k.startswith(p) for p in self.prefixes for k in changes.kv_keys)


class _Waiter:
    __slots__ = ("event", "watch")

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.event = threading.Event()


Query = Callable[[State], tuple[int, T, Watch]]


class Store:
    def __init__(self, clock: Clock, data_dir: Path | None = None) -> None:
        self.clock = clock
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._timer_cond = threading.Condition(self._lock)
        self._waiters: set[_Waiter] = set()
        self._stopped = False
        self._persister = persist.Persister(data_dir) if data_dir is not None else None
        loaded = self._persister.read(clock.now()) if self._persister is not None else None
        self.state = loaded if loaded is not None else State()
        self.restored = loaded is not None
        if self._persister is not None:
            self._persister.save(self.state)
        self._thread = threading.Thread(target=self._timer_loop, name="devconsul-timers",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._timer_cond.notify()
            for w in self._waiters:
                w.event.set()

    # -- writes ----------------------------------------------------------------------------

    def write(self, fn: Callable[[State, int, float], T]) -> T:
        """One apply: ``fn(state, idx, now)`` under the lock, then wake watchers and persist."""
        with self._lock:
            st = self.state
            try:
                return fn(st, st.next_index(), self.clock.now())
            finally:
                self._committed()

    def read(self, fn: Callable[[State], T]) -> T:
        with self._lock:
            return fn(self.state)

    def step_clock(self, seconds: float) -> float:
        with self._lock:
            offset = self.clock.step(seconds)
            self._timer_cond.notify()
            return offset

    def save(self) -> None:
        with self._lock:
            if self._persister is not None:
                self._persister.save(self.state)

    def close(self) -> None:
        """Final snapshot; no more persistence afterwards."""
        with self._lock:
            if self._persister is not None:
                self._persister.save(self.state)
                self._persister.close()
                self._persister = None

    def _committed(self) -> None:
        st = self.state
        changes = st.take_changes()
        if changes:
            for w in self._waiters:
                if w.watch.touched_by(changes):
                    w.event.set()
            if self._persister is not None:
                self._persister.commit(st, changes)
        if st.timers_moved_earlier:
            st.timers_moved_earlier = False
            self._timer_cond.notify()

    # -- blocking reads --------------------------------------------------------------------

    def blocking(self, query: Query[T], min_index: int, wait: float) -> tuple[int, T]:
        """agent/consul/rpc.go blockingQuery: answer at once without an index; otherwise until
        the result's index exceeds ``min_index`` or ``wait`` (real seconds) runs out."""
        deadline = time.monotonic() + wait
        waiter: _Waiter | None = None
        try:
            while True:
                with self._lock:
                    if waiter is not None:
                        self._waiters.discard(waiter)
                    index, result, watch = query(self.state)
                    remaining = deadline - time.monotonic()
                    if min_index <= 0 or index > min_index or remaining <= 0 or self._stopped:
                        return max(index, 1), result
                    waiter = _Waiter(watch)
                    self._waiters.add(waiter)
                waiter.event.wait(remaining)
        finally:
            if waiter is not None:
                with self._lock:
                    self._waiters.discard(waiter)

    def waiter_count(self) -> int:
        with self._lock:
            return len(self._waiters)

    # -- timers ----------------------------------------------------------------------------

    def _timer_loop(self) -> None:
        with self._lock:
            while not self._stopped:
                st = self.state
                now = self.clock.now()
                for when, kind, key in st.pop_due(now):
                    try:
                        _fire(st, st.next_index(), now, kind, key, when)
                    except Exception:  # a bad timer must not kill the thread
                        log.exception("timer %s %s failed", kind, key)
                self._committed()
                nxt = st.next_deadline()
                st.timers_moved_earlier = False
                timeout = None if nxt is None else max(0.0, nxt - self.clock.now())
                self._timer_cond.wait(timeout)


def _fire(st: State, idx: int, now: float, kind: str, key: tuple[str, ...], when: float) -> None:
    if kind == "session":
        sessions.ttl_fired(st, idx, now, key[0], when)
    elif kind == "check":
        catalog.ttl_fired(st, idx, now, key[0], key[1], when)
    elif kind == "reap":
        catalog.reap_fired(st, idx, now, key[0], key[1], when)
