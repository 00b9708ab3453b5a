"""PUT /v1/txn with KV operations (agent/txn_endpoint.go, agent/consul/state/txn.go)."""

from __future__ import annotations

import base64
from typing import Any

from consul_contract_support import Target


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_txn_applies_all_ops_and_returns_results(target: Target, c: Any, prefix: str) -> None:
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "set", "Key": prefix + "a", "Value": b64("1")}},
        {"KV": {"Verb": "set", "Key": prefix + "b", "Value": b64("2"), "Flags": 9}},
        {"KV": {"Verb": "get", "Key": prefix + "a"}},
    ])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["Errors"] is None
    assert [res["KV"]["Key"] for res in body["Results"]] == [prefix + "a", prefix + "b",
                                                             prefix + "a"]
    assert body["Results"][2]["KV"]["Value"] == b64("1")
    assert c.kv.get(prefix + "b")[1]["Flags"] == 9


def test_txn_is_all_or_nothing(target: Target, c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v")
    stale = c.kv.get(prefix + "k")[1]["ModifyIndex"] + 1000
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "set", "Key": prefix + "new", "Value": b64("x")}},
        {"KV": {"Verb": "cas", "Key": prefix + "k", "Value": b64("y"), "Index": stale}},
    ])
    assert r.status_code == 409
    body = r.json()
    assert body["Results"] is None
    assert body["Errors"][0]["OpIndex"] == 1 and body["Errors"][0]["What"]
    assert c.kv.get(prefix + "new")[1] is None
    assert c.kv.get(prefix + "k")[1]["Value"] == b"v"


def test_txn_lock_check_session_unlock(target: Target, c: Any, prefix: str,
                                       sessions: list[str]) -> None:
    sid = c.session.create(lock_delay=0)
    sessions.append(sid)
    key = prefix + "leader"
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "lock", "Key": key, "Value": b64("me"), "Session": sid}}])
    assert r.status_code == 200, r.text
    assert r.json()["Results"][0]["KV"]["LockIndex"] == 1
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "check-session", "Key": key, "Session": sid}},
        {"KV": {"Verb": "set", "Key": prefix + "fenced", "Value": b64("ok")}}])
    assert r.status_code == 200, r.text
    other = c.session.create(lock_delay=0)
    sessions.append(other)
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "check-session", "Key": key, "Session": other}},
        {"KV": {"Verb": "set", "Key": prefix + "zombie", "Value": b64("no")}}])
    assert r.status_code == 409
    assert c.kv.get(prefix + "zombie")[1] is None
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "unlock", "Key": key, "Session": sid}}])
    assert r.status_code == 200, r.text
    assert "Session" not in c.kv.get(key)[1]


def test_txn_check_index_and_delete_cas(target: Target, c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v")
    mi = c.kv.get(prefix + "k")[1]["ModifyIndex"]
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "check-index", "Key": prefix + "k", "Index": mi}},
        {"KV": {"Verb": "delete-cas", "Key": prefix + "k", "Index": mi}}])
    assert r.status_code == 200, r.text
    assert c.kv.get(prefix + "k")[1] is None


def test_txn_lock_with_unknown_session_fails(target: Target, prefix: str) -> None:
    r = target.put("/v1/txn", json=[
        {"KV": {"Verb": "lock", "Key": prefix + "k", "Value": b64("x"),
                "Session": "6a1c4a4c-0000-4000-8000-000000000004"}}])
    assert r.status_code == 409
    assert "invalid session" in r.json()["Errors"][0]["What"]
