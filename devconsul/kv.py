"""KV operations, after hashicorp/consul agent/consul/state/kvs.go and agent/consul/kvs_endpoint.go.

Each write takes the apply index ``idx`` and the clock's ``now`` (for lock-delay).
"""

from __future__ import annotations

from dataclasses import replace

from devconsul.errors import ConsulError
from devconsul.model import KVEntry
from devconsul.state import State


def get(st: State, key: str) -> tuple[int, KVEntry | None]:
    """KVS.Get: a present key answers with its ModifyIndex, a missing one with the KV table
    index (which includes tombstones), never below 1."""
    entry = st.kvs.get(key)
    if entry is not None:
        return entry.modify_index, entry
    return st.max_index("kvs"), None


def list_prefix(st: State, prefix: str) -> tuple[int, list[KVEntry]]:
    """KVS.List (kvsListTxn): highest index among the prefix's entries and tombstones, else the
    whole table's index."""
    entries = [e for k, e in sorted(st.kvs.items()) if k.startswith(prefix)]
    if prefix:
        lindex = max((e.modify_index for e in entries), default=0)
        gindex = max((i for k, i in st.tombstones.items() if k.startswith(prefix)), default=0)
        lindex = max(lindex, gindex)
    else:
        lindex = st.table_index["kvs"]
    return (lindex if lindex else st.max_index("kvs")) or 1, entries


def prefix_index_is_local(st: State, prefix: str) -> bool:
    """Whether list_prefix's index comes from the prefix itself (else from the whole table)."""
    if not prefix:
        return False
    return any(k.startswith(prefix) for k in st.kvs) or any(
        k.startswith(prefix) for k in st.tombstones)


def list_keys(st: State, prefix: str, separator: str) -> tuple[int, list[str]]:
    index, entries = list_prefix(st, prefix)
    keys: list[str] = []
    seen: set[str] = set()
    for e in entries:
        if not separator:
            keys.append(e.key)
            continue
        after = e.key[len(prefix):]
        pos = after.find(separator)
        if pos < 0:
            keys.append(e.key)
            continue
        short = e.key[: len(prefix) + pos + len(separator)]
        if short not in seen:
            seen.add(short)
            keys.append(short)
    return index, keys


def _write(st: State, idx: int, new: KVEntry) -> KVEntry:
    """kvsSetTxn: keep CreateIndex; an entry equal to the stored one is not rewritten."""
    existing = st.kvs.get(new.key)
    if existing is not None:
        new = replace(new, create_index=existing.create_index)
        if existing.same_content(new):
            return existing
    else:
        new = replace(new, create_index=idx)
    new = replace(new, modify_index=idx)
    st.kvs[new.key] = new
    st.touch_key(new.key, idx)
    return new


def set_(st: State, idx: int, key: str, value: bytes, flags: int) -> KVEntry:
    """A plain PUT keeps the key's Session and LockIndex and replaces Value and Flags."""
    existing = st.kvs.get(key)
    session = existing.session if existing else ""
    lock_index = existing.lock_index if existing else 0
    return _write(st, idx, KVEntry(key, value, flags, session, lock_index, 0, 0))


def cas(st: State, idx: int, key: str, value: bytes, flags: int, index: int) -> bool:
    """cas=0: only if absent; cas=N: only if ModifyIndex == N."""
    existing = st.kvs.get(key)
    if index == 0 and existing is not None:
        return False
    if index != 0 and (existing is None or existing.modify_index != index):
        return False
    set_(st, idx, key, value, flags)
    return True


def in_lock_delay(st: State, key: str, now: float) -> bool:
    """kvsPreApply: a lock is refused while the key's lock-delay runs (leader wall time)."""
    until = st.lock_delays.get(key)
    if until is None:
        return False
    if until <= now:
        del st.lock_delays[key]
        return False
    return True


def lock(st: State, idx: int, key: str, value: bytes, flags: int, session: str) -> bool:
    """kvsLockTxn (lock-delay is checked by the caller first, as kvsPreApply does)."""
    if not session:
        raise ConsulError("missing session")
    if session not in st.sessions:
        raise ConsulError(f'invalid session "{session}"')
    existing = st.kvs.get(key)
    if existing is None:
        lock_index = 1
    elif existing.session == session:
        lock_index = existing.lock_index
    elif existing.session:
        return False
    else:
        lock_index = existing.lock_index + 1
    _write(st, idx, KVEntry(key, value, flags, session, lock_index, 0, 0))
    return True


def unlock(st: State, idx: int, key: str, value: bytes, flags: int, session: str) -> bool:
    """kvsUnlockTxn: only the holder may release; LockIndex is kept, Value/Flags replaced."""
    if not session:
        raise ConsulError("missing session")
    existing = st.kvs.get(key)
    if existing is None or existing.session != session:
        return False
    _write(st, idx, KVEntry(key, value, flags, "", existing.lock_index, 0, 0))
    return True


def delete(st: State, idx: int, key: str) -> None:
    if key not in st.kvs:
        return
    del st.kvs[key]
    st.tombstones[key] = idx
    st.touch_key(key, idx)


def delete_cas(st: State, idx: int, key: str, index: int) -> bool:
    """kvsDeleteCASTxn: a missing key counts as deleted (true); otherwise ModifyIndex must match."""
    existing = st.kvs.get(key)
    if existing is None or existing.modify_index != index:
        return existing is None
    delete(st, idx, key)
    return True


def delete_tree(st: State, idx: int, prefix: str) -> None:
    for key in [k for k in st.kvs if k.startswith(prefix)]:
        delete(st, idx, key)


def release_session_keys(st: State, idx: int, now: float, session_id: str, behavior: str,
                         lock_delay: float) -> None:
    """deleteSessionTxn: every key the session holds gets a lock-delay, then is released
    (Session cleared, LockIndex/Value/Flags kept) or deleted, per the session's Behavior."""
    for key in [k for k, e in st.kvs.items() if e.session == session_id]:
        if behavior == "delete":
            delete(st, idx, key)
        else:
            _write(st, idx, replace(st.kvs[key], session=""))
        if lock_delay > 0:
            st.lock_delays[key] = now + lock_delay
