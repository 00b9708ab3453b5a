"""Sessions (agent/session_endpoint.go, agent/consul/session_endpoint.go, state/session.go)."""

from __future__ import annotations

from typing import Any

import pytest
from consul_contract_support import Target

import consul


def test_defaults(c: Any, target: Target, sessions: list[str]) -> None:
    sid = c.session.create()
    sessions.append(sid)
    _, info = c.session.info(sid)
    assert info["ID"] == sid
    assert info["Node"] == target.node
    assert info["LockDelay"] == 15_000_000_000  # nanoseconds
    assert info["Behavior"] == "release"
    assert info["TTL"] == ""
    assert info["NodeChecks"] == ["serfHealth"]
    assert not info.get("Checks")


def test_lock_delay_numbers_below_1000_are_seconds(target: Target, c: Any,
                                                   sessions: list[str]) -> None:
    for raw, expected in ((5, 5_000_000_000), ("2s", 2_000_000_000), (0, 0),
                          (3_000_000_000, 3_000_000_000)):
        r = target.put("/v1/session/create", json={"LockDelay": raw})
        assert r.status_code == 200, r.text
        sessions.append(r.json()["ID"])
        assert c.session.info(r.json()["ID"])[1]["LockDelay"] == expected


def test_empty_checks_means_no_checks(target: Target, c: Any, sessions: list[str]) -> None:
    r = target.put("/v1/session/create", json={"Checks": []})
    sid = r.json()["ID"]
    sessions.append(sid)
    info = c.session.info(sid)[1]
    assert not info["NodeChecks"] and not info.get("Checks") and not info["ServiceChecks"]


@pytest.mark.parametrize("ttl", ["5s", "9s", "86401s", "25h"])
def test_ttl_outside_10s_24h_is_refused(target: Target, ttl: str) -> None:
    r = target.put("/v1/session/create", json={"TTL": ttl})
    assert r.status_code == 500
    assert "Invalid Session TTL" in r.text


@pytest.mark.parametrize("ttl", ["10s", "86400s", "0s"])
def test_ttl_inside_bounds_is_accepted(target: Target, ttl: str, sessions: list[str]) -> None:
    r = target.put("/v1/session/create", json={"TTL": ttl})
    assert r.status_code == 200, r.text
    sessions.append(r.json()["ID"])


def test_renew_returns_the_entry(c: Any, sessions: list[str]) -> None:
    sid = c.session.create(ttl=10)
    sessions.append(sid)
    entry = c.session.renew(sid)
    assert entry["ID"] == sid and entry["TTL"] == "10s"


def test_renew_of_an_unknown_session_is_not_found(c: Any, target: Target) -> None:
    bogus = "6a1c4a4c-0000-4000-8000-000000000001"
    with pytest.raises(consul.NotFound):
        c.session.renew(bogus)
    r = target.put(f"/v1/session/renew/{bogus}")
    assert r.status_code == 404


def test_destroy_of_an_unknown_session_is_true(c: Any) -> None:
    assert c.session.destroy("6a1c4a4c-0000-4000-8000-000000000002") is True


def test_info_of_an_unknown_session_is_an_empty_list(target: Target, c: Any) -> None:
    r = target.get("/v1/session/info/6a1c4a4c-0000-4000-8000-000000000003")
    assert r.status_code == 200 and r.json() == []
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert c.session.info("6a1c4a4c-0000-4000-8000-000000000003")[1] is None


def test_list_and_node_listing(c: Any, target: Target, sessions: list[str]) -> None:
    sid = c.session.create(name="listed")
    sessions.append(sid)
    _, all_sessions = c.session.list()
    assert sid in [s["ID"] for s in all_sessions]
    _, on_node = c.session.node(target.node)
    assert sid in [s["ID"] for s in on_node]
    c.session.destroy(sid)
    assert sid not in [s["ID"] for s in c.session.list()[1]]


def test_missing_check_is_refused(target: Target) -> None:
    r = target.put("/v1/session/create", json={"Checks": ["serfHealth", "no-such-check"]})
    assert r.status_code == 500
    assert "Missing check 'no-such-check' registration" in r.text


def test_critical_check_is_refused(target: Target, c: Any, services: list[str]) -> None:
    """A TTL check registered without Status starts critical."""
    sid = "contract-critical"
    c.agent.service.register("contract-critical", service_id=sid,
                             check={"TTL": "30s"})
    services.append(sid)
    r = target.put("/v1/session/create",
                   json={"NodeChecks": ["serfHealth"], "ServiceChecks": [{"ID": f"service:{sid}"}]})
    assert r.status_code == 500
    assert f"Check 'service:{sid}' is in critical state" in r.text


def test_invalid_behavior_is_refused(target: Target) -> None:
    r = target.put("/v1/session/create", json={"Behavior": "explode"})
    assert r.status_code == 500 and "Behavior" in r.text
