"""Locks: acquire/release, LockIndex, lock-delay, Behavior (agent/consul/state/kvs.go,
agent/consul/kvs_endpoint.go kvsPreApply, agent/consul/state/session.go deleteSessionTxn)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from consul_contract_support import Target

import consul

LOCK_DELAY = 1.0  # seconds; short so the suite stays fast


def new_session(c: Any, sessions: list[str], **kw: Any) -> str:
    kw.setdefault("lock_delay", LOCK_DELAY)
    sid = c.session.create(**kw)
    sessions.append(sid)
    return str(sid)


def test_acquire_with_unknown_session_is_500_invalid_session(target: Target, c: Any,
                                                              prefix: str) -> None:
    bogus = "6a1c4a4c-0000-4000-8000-000000000000"
    r = target.put(f"/v1/kv/{prefix}lock", params={"acquire": bogus}, data=b"x")
    assert r.status_code == 500
    assert "invalid session" in r.text
    with pytest.raises(consul.ConsulException, match="invalid session"):
        c.kv.put(prefix + "lock", "x", acquire=bogus)


def test_lock_index_across_acquire_release_acquire(c: Any, prefix: str,
                                                   sessions: list[str]) -> None:
    s1 = new_session(c, sessions)
    key = prefix + "lock"
    assert c.kv.put(key, "a", acquire=s1) is True
    e = c.kv.get(key)[1]
    assert (e["LockIndex"], e["Session"]) == (1, s1)
    assert c.kv.put(key, "b", acquire=s1) is True  # already ours: LockIndex unchanged
    e = c.kv.get(key)[1]
    assert (e["LockIndex"], e["Value"]) == (1, b"b")
    assert c.kv.put(key, "c", release=s1) is True
    e = c.kv.get(key)[1]
    assert e["LockIndex"] == 1 and "Session" not in e
    assert c.kv.put(key, "d", acquire=s1) is True
    assert c.kv.get(key)[1]["LockIndex"] == 2


def test_acquire_of_a_key_held_by_another_session_is_false(c: Any, prefix: str,
                                                           sessions: list[str]) -> None:
    s1, s2 = new_session(c, sessions), new_session(c, sessions)
    key = prefix + "lock"
    assert c.kv.put(key, "mine", acquire=s1) is True
    before = c.kv.get(key)[1]
    assert c.kv.put(key, "theirs", acquire=s2) is False
    assert c.kv.get(key)[1] == before


def test_release_by_non_holder_is_false(c: Any, prefix: str, sessions: list[str]) -> None:
    s1, s2 = new_session(c, sessions), new_session(c, sessions)
    key = prefix + "lock"
    assert c.kv.put(key, "v", release=s1) is False  # not even there
    c.kv.put(key, "v", acquire=s1)
    assert c.kv.put(key, "v", release=s2) is False
    assert c.kv.get(key)[1]["Session"] == s1


def test_release_with_empty_body_wipes_the_value(c: Any, prefix: str,
                                                 sessions: list[str]) -> None:
    s1 = new_session(c, sessions)
    key = prefix + "lock"
    c.kv.put(key, "payload", acquire=s1, flags=3)
    assert c.kv.put(key, None, release=s1) is True
    e = c.kv.get(key)[1]
    assert e["Value"] is None and e["Flags"] == 0 and e["LockIndex"] == 1


def test_plain_put_keeps_the_lock_holder(c: Any, prefix: str, sessions: list[str]) -> None:
    s1 = new_session(c, sessions)
    key = prefix + "lock"
    c.kv.put(key, "v", acquire=s1)
    c.kv.put(key, "overwritten")
    e = c.kv.get(key)[1]
    assert e["Session"] == s1 and e["Value"] == b"overwritten"


def test_delete_of_a_locked_key_is_true(c: Any, prefix: str, sessions: list[str]) -> None:
    s1 = new_session(c, sessions)
    c.kv.put(prefix + "lock", "v", acquire=s1)
    assert c.kv.delete(prefix + "lock") is True
    assert c.kv.get(prefix + "lock")[1] is None


def test_destroy_without_release_applies_lock_delay(c: Any, prefix: str,
                                                    sessions: list[str]) -> None:
    s1, s2 = new_session(c, sessions), new_session(c, sessions)
    key = prefix + "lock"
    assert c.kv.put(key, "leader-1", acquire=s1) is True
    c.session.destroy(s1)
    destroyed = time.monotonic()
    e = c.kv.get(key)[1]
    assert "Session" not in e and e["Value"] == b"leader-1" and e["LockIndex"] == 1
    # Within the lock-delay: refused, and the key shows no Session (that is how a client
    # tells lock-delay apart from "held by someone else").
    assert c.kv.put(key, "leader-2", acquire=s2) is False
    assert "Session" not in c.kv.get(key)[1]
    while c.kv.put(key, "leader-2", acquire=s2) is False:
        assert time.monotonic() - destroyed < LOCK_DELAY + 3
        time.sleep(0.05)
    assert time.monotonic() - destroyed >= LOCK_DELAY - 0.05
    e = c.kv.get(key)[1]
    assert (e["Session"], e["LockIndex"]) == (s2, 2)


def test_release_then_destroy_lets_another_acquire_at_once(c: Any, prefix: str,
                                                           sessions: list[str]) -> None:
    s1 = new_session(c, sessions, lock_delay=10)
    s2 = new_session(c, sessions)
    key = prefix + "lock"
    c.kv.put(key, "leader-1", acquire=s1)
    assert c.kv.put(key, "", release=s1) is True
    c.session.destroy(s1)
    assert c.kv.put(key, "leader-2", acquire=s2) is True


def test_lock_delay_zero_disables_it(c: Any, prefix: str, sessions: list[str]) -> None:
    s1 = new_session(c, sessions, lock_delay=0)
    s2 = new_session(c, sessions)
    key = prefix + "lock"
    c.kv.put(key, "v", acquire=s1)
    c.session.destroy(s1)
    assert c.kv.put(key, "v", acquire=s2) is True


def test_behavior_delete_removes_held_keys(c: Any, prefix: str, sessions: list[str]) -> None:
    s1 = new_session(c, sessions, behavior="delete")
    c.kv.put(prefix + "ephemeral", "v", acquire=s1)
    c.session.destroy(s1)
    assert c.kv.get(prefix + "ephemeral")[1] is None


def test_behavior_release_keeps_value_and_lock_index(c: Any, prefix: str,
                                                     sessions: list[str]) -> None:
    s1 = new_session(c, sessions)
    key = prefix + "lock"
    c.kv.put(key, "v", acquire=s1)
    before = c.kv.get(key)[1]
    c.session.destroy(s1)
    after = c.kv.get(key)[1]
    assert "Session" not in after
    assert (after["Value"], after["LockIndex"]) == (before["Value"], before["LockIndex"])
    assert after["ModifyIndex"] > before["ModifyIndex"]
