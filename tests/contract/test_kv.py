"""KV semantics (agent/kvs_endpoint.go, agent/consul/state/kvs.go)."""

from __future__ import annotations

import threading
import time
from typing import Any

from consul_contract_support import Target


def test_missing_key_is_404_with_empty_body_and_an_index(target: Target, prefix: str) -> None:
    r = target.get(f"/v1/kv/{prefix}missing")
    assert r.status_code == 404
    assert r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1


def test_reads_carry_leader_headers(target: Target, c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v")
    r = target.get(f"/v1/kv/{prefix}k")
    assert r.status_code == 200
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert "X-Consul-LastContact" in r.headers
    assert int(r.headers["X-Consul-Index"]) >= 1


def test_python_consul_missing_key_gives_index_and_none(c: Any, prefix: str) -> None:
    index, value = c.kv.get(prefix + "nothing")
    assert value is None
    assert int(index) >= 1


def test_entry_shape(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "hello", flags=42)
    index, e = c.kv.get(prefix + "k")
    assert e["Key"] == prefix + "k"
    assert e["Value"] == b"hello"
    assert e["Flags"] == 42
    assert e["LockIndex"] == 0
    assert "Session" not in e
    assert e["CreateIndex"] == e["ModifyIndex"] == int(index)


def test_every_put_replaces_value_and_flags(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "one", flags=7)
    c.kv.put(prefix + "k", "two")
    _, e = c.kv.get(prefix + "k")
    assert (e["Value"], e["Flags"]) == (b"two", 0)


def test_identical_write_keeps_modify_index(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "same", flags=1)
    _, first = c.kv.get(prefix + "k")
    c.kv.put(prefix + "k", "same", flags=1)
    _, second = c.kv.get(prefix + "k")
    assert second["ModifyIndex"] == first["ModifyIndex"]
    c.kv.put(prefix + "k", "different", flags=1)
    _, third = c.kv.get(prefix + "k")
    assert third["ModifyIndex"] > first["ModifyIndex"]
    assert third["CreateIndex"] == first["CreateIndex"]


def test_cas_zero_only_creates(c: Any, prefix: str) -> None:
    assert c.kv.put(prefix + "k", "first", cas=0) is True
    assert c.kv.put(prefix + "k", "second", cas=0) is False
    assert c.kv.get(prefix + "k")[1]["Value"] == b"first"


def test_cas_index_must_match_modify_index(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v1")
    mi = c.kv.get(prefix + "k")[1]["ModifyIndex"]
    assert c.kv.put(prefix + "k", "v2", cas=mi + 1000) is False
    assert c.kv.put(prefix + "k", "v2", cas=mi) is True
    assert c.kv.put(prefix + "k", "v3", cas=mi) is False
    assert c.kv.get(prefix + "k")[1]["Value"] == b"v2"


def test_cas_on_missing_key_with_nonzero_index_fails(c: Any, prefix: str) -> None:
    assert c.kv.put(prefix + "absent", "v", cas=5) is False


def test_delete_is_true_even_for_missing_keys(c: Any, prefix: str) -> None:
    assert c.kv.delete(prefix + "never-there") is True
    c.kv.put(prefix + "k", "v")
    assert c.kv.delete(prefix + "k") is True
    assert c.kv.get(prefix + "k")[1] is None


def test_delete_cas(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v")
    mi = c.kv.get(prefix + "k")[1]["ModifyIndex"]
    assert c.kv.delete(prefix + "k", cas=mi + 1000) is False
    assert c.kv.get(prefix + "k")[1] is not None
    assert c.kv.delete(prefix + "k", cas=mi) is True
    assert c.kv.get(prefix + "k")[1] is None


def test_recurse_keys_and_separator(c: Any, prefix: str) -> None:
    for k in ("a", "b/1", "b/2", "c/d/e"):
        c.kv.put(prefix + k, k)
    _, entries = c.kv.get(prefix, recurse=True)
    assert [e["Key"] for e in entries] == [prefix + k for k in ("a", "b/1", "b/2", "c/d/e")]
    _, keys = c.kv.get(prefix, keys=True, separator="/")
    assert keys == [prefix + "a", prefix + "b/", prefix + "c/"]
    _, keys = c.kv.get(prefix + "b/", keys=True)
    assert keys == [prefix + "b/1", prefix + "b/2"]
    assert c.kv.delete(prefix + "b/", recurse=True) is True
    _, keys = c.kv.get(prefix, keys=True)
    assert keys == [prefix + "a", prefix + "c/d/e"]


def test_recurse_on_empty_prefix_is_404_with_index(target: Target, prefix: str) -> None:
    r = target.get(f"/v1/kv/{prefix}nothing/", params={"recurse": ""})
    assert r.status_code == 404
    assert int(r.headers["X-Consul-Index"]) >= 1


def test_raw_returns_the_bare_value(target: Target, c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", b"\x00\x01raw")
    r = target.get(f"/v1/kv/{prefix}k", params={"raw": ""})
    assert r.status_code == 200
    assert r.content == b"\x00\x01raw"


def test_empty_value_reads_back_as_none(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "")
    assert c.kv.get(prefix + "k")[1]["Value"] is None


def test_consistency_modes_are_accepted(c: Any, prefix: str) -> None:
    c.kv.put(prefix + "k", "v")
    assert c.kv.get(prefix + "k", consistency="consistent")[1]["Value"] == b"v"
    assert c.kv.get(prefix + "k", consistency="stale")[1]["Value"] == b"v"


def test_indexes_only_grow(c: Any, prefix: str) -> None:
    seen = []
    for i in range(5):
        c.kv.put(prefix + f"k{i}", str(i))
        seen.append(c.kv.get(prefix + f"k{i}")[1]["ModifyIndex"])
    c.kv.delete(prefix + "k0")
    index, _ = c.kv.get(prefix + "k0")
    assert seen == sorted(seen) and len(set(seen)) == 5
    assert int(index) > seen[-1]  # a missing key reports the KV index, tombstones included


def test_blocking_read_returns_when_the_key_changes(target: Target, prefix: str) -> None:
    c = target.client(timeout=30)
    c.kv.put(prefix + "k", "v1")
    index, _ = c.kv.get(prefix + "k")
    threading.Timer(0.3, lambda: target.client().kv.put(prefix + "k", "v2")).start()
    start = time.monotonic()
    new_index, e = c.kv.get(prefix + "k", index=index, wait="10s")
    assert time.monotonic() - start < 5
    assert int(new_index) > int(index)
    assert e["Value"] == b"v2"


def test_blocking_read_times_out_unchanged(target: Target, prefix: str) -> None:
    c = target.client(timeout=10)
    c.kv.put(prefix + "k", "v1")
    index, _ = c.kv.get(prefix + "k")
    start = time.monotonic()
    same, e = c.kv.get(prefix + "k", index=index, wait="500ms")
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 0.5 + 0.5 / 16 + 0.5
    assert same == index and e["Value"] == b"v1"


def test_blocking_read_above_current_index_waits_full_wait_and_returns_smaller(
        target: Target, prefix: str) -> None:
    """After a snapshot restore the client's index can be ahead: Consul waits the whole wait
    and answers with a smaller index, so the client must reset to 0."""
    c = target.client(timeout=10)
    c.kv.put(prefix + "k", "v")
    index, _ = c.kv.get(prefix + "k")
    ahead = int(index) + 1_000_000
    start = time.monotonic()
    r = target.get(f"/v1/kv/{prefix}k", params={"index": ahead, "wait": "1s"})
    assert time.monotonic() - start >= 1.0
    assert r.status_code == 200
    assert int(r.headers["X-Consul-Index"]) < ahead


def test_blocking_read_on_a_missing_key_wakes_when_it_is_created(target: Target,
                                                                 prefix: str) -> None:
    c = target.client(timeout=30)
    index, value = c.kv.get(prefix + "later")
    assert value is None
    threading.Timer(0.3, lambda: target.client().kv.put(prefix + "later", "now")).start()
    deadline = time.monotonic() + 5
    while value is None and time.monotonic() < deadline:
        index, value = c.kv.get(prefix + "later", index=index, wait="5s")
    assert value is not None and value["Value"] == b"now"
