"""``PUT /v1/txn`` for KV operations, all-or-nothing (agent/consul/txn_endpoint.go, state/txn.go).

Result shape: ``{"Results": [{"KV": entry}], "Errors": null}``; on failure ``{"Results": null,
"Errors": [{"OpIndex": i, "What": "..."}]}`` with HTTP 409.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from devconsul import kv
from devconsul.errors import BadRequest, ConsulError, TooLarge
from devconsul.model import Json, KVEntry
from devconsul.state import Changes, State

MAX_TXN_OPS = 128  # agent/txn_endpoint.go maxTxnOps
KV_MAX_VALUE_SIZE = 512 * 1024  # kv_max_value_size default (raft's suggested entry size)

READ_VERBS = {"get", "get-tree", "check-index", "check-session", "check-not-exists"}


class TxnOp:
    def __init__(self, raw: Json) -> None:
        kvop = _ci(raw, "KV")
        if not isinstance(kvop, dict):
            raise BadRequest("Failed to parse body: only KV operations are supported by devconsul")
        self.verb = str(_ci(kvop, "Verb") or "")
        self.key = str(_ci(kvop, "Key") or "")
        raw_value = _ci(kvop, "Value")
        try:
            self.value = base64.b64decode(raw_value, validate=True) if raw_value else b""
        except (binascii.Error, TypeError) as exc:
            raise BadRequest(f"Failed to parse body: failed to decode value: {exc}") from exc
        if len(self.value) > KV_MAX_VALUE_SIZE:
            raise TooLarge(f'Value for key "{self.key}" is too large '
                           f"({len(self.value)} > {KV_MAX_VALUE_SIZE} bytes)")
        self.flags = int(_ci(kvop, "Flags") or 0)
        self.index = int(_ci(kvop, "Index") or 0)
        self.session = str(_ci(kvop, "Session") or "")


def _ci(raw: Json, name: str) -> Any:
    for k, v in raw.items():
        if k.lower() == name.lower():
            return v
    return None


def parse_ops(body: Any) -> list[TxnOp]:
    if not isinstance(body, list):
        raise BadRequest("Failed to parse body: expected a JSON array of operations")
    if len(body) > MAX_TXN_OPS:
        raise TooLarge(f"Transaction contains too many operations ({len(body)} > {MAX_TXN_OPS})")
    return [TxnOp(op) for op in body]


def apply(st: State, idx: int, now: float, ops: list[TxnOp]) -> tuple[list[Json], list[Json]]:
    """Run the ops at one index; on the first error roll everything back."""
    errors: list[Json] = []
    # Txn.preCheck: lock-delay is enforced before the apply, like kvsPreApply.
    for i, op in enumerate(ops):
        if op.verb == "lock" and kv.in_lock_delay(st, op.key, now):
            what = f'failed to lock key "{op.key}" due to lock delay'
            errors.append({"OpIndex": i, "What": what})
    if errors:
        return [], errors
    saved = (dict(st.kvs), dict(st.tombstones), dict(st.table_index), st.index, st.changes)
    st.changes = Changes()
    results: list[Json] = []
    for i, op in enumerate(ops):
        try:
            results.extend(_apply_one(st, idx, op))
        except ConsulError as exc:
            errors.append({"OpIndex": i, "What": exc.message})
            break
    if errors:
        st.kvs, st.tombstones, st.table_index, st.index, st.changes = saved
        return [], errors
    saved[4].merge(st.changes)
    st.changes = saved[4]
    return results, []


def _result(entry: KVEntry | None, with_value: bool = False) -> list[Json]:
    return [] if entry is None else [{"KV": entry.to_json(with_value=with_value)}]


def _apply_one(st: State, idx: int, op: TxnOp) -> list[Json]:
    key = op.key
    q = f'"{key}"'
    verb = op.verb
    if verb == "set":
        return _result(kv.set_(st, idx, key, op.value, op.flags))
    if verb == "cas":
        if not kv.cas(st, idx, key, op.value, op.flags, op.index):
            raise ConsulError(f"failed to set key {q}, index is stale")
        return _result(st.kvs[key])
    if verb == "lock":
        if not kv.lock(st, idx, key, op.value, op.flags, op.session):
            raise ConsulError(f"failed to lock key {q}, lock is already held")
        return _result(st.kvs[key])
    if verb == "unlock":
        if not kv.unlock(st, idx, key, op.value, op.flags, op.session):
            raise ConsulError(f"failed to unlock key {q}, lock isn't held, "
                              "or is held by another session")
        return _result(st.kvs[key])
    if verb == "get":
        entry = st.kvs.get(key)
        if entry is None:
            raise ConsulError(f"key {q} doesn't exist")
        return _result(entry, with_value=True)
    if verb == "get-tree":
        return [r for e in kv.list_prefix(st, key)[1] for r in _result(e, with_value=True)]
    if verb == "check-index":
        entry = st.kvs.get(key)
        if entry is None:
            raise ConsulError(f"failed to check index, key {q} doesn't exist")
        if entry.modify_index != op.index:
            raise ConsulError(f"failed index check for key {q}, current modify index "
                              f"{entry.modify_index} != {op.index}")
        return _result(entry)
    if verb == "check-session":
        entry = st.kvs.get(key)
        if entry is None:
            raise ConsulError(f"failed to check session, key {q} doesn't exist")
        if entry.session != op.session:
            raise ConsulError(f"failed session check for key {q}, current session "
                              f'"{entry.session}" != "{op.session}"')
        return _result(entry)
    if verb == "check-not-exists":
        if key in st.kvs:
            raise ConsulError(f"key {q} exists")
        return []
    if verb == "delete":
        kv.delete(st, idx, key)
        return []
    if verb == "delete-tree":
        kv.delete_tree(st, idx, key)
        return []
    if verb == "delete-cas":
        if not kv.delete_cas(st, idx, key, op.index):
            raise ConsulError(f"failed to delete key {q}, index is stale")
        return []
    raise ConsulError(f"unknown KV verb {verb!r}")
