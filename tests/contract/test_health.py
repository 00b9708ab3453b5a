"""Services, TTL checks, maintenance and how they act on sessions (agent/agent.go,
agent/checks/check.go CheckTTL, agent/consul/state/catalog.go ensureCheckTxn)."""

from __future__ import annotations

import threading
import time
from typing import Any

from consul_contract_support import (
    Target,
    catalog_check,
    eventually,
    session_gone,
    unique,
    wait_check_status,
)

import consul


def register(c: Any, target: Target, services: list[str], ttl: str = "30s",
             status: str | None = "passing", **check: Any) -> str:
    sid = unique("svc")
    chk: dict[str, Any] = {"TTL": ttl, **check}
    if status:
        chk["Status"] = status
    assert c.agent.service.register(sid, service_id=sid, port=8080, tags=["t1"],
                                    meta={"role": "test"}, check=chk)
    services.append(sid)
    eventually(lambda: catalog_check(c, target.node, f"service:{sid}"))
    return sid


def session_on(c: Any, sessions: list[str], service_id: str, **kw: Any) -> str:
    sid = c.session.create(checks=["serfHealth", f"service:{service_id}"], lock_delay=1, **kw)
    sessions.append(sid)
    return str(sid)


def test_agent_self_names_the_node(c: Any, target: Target) -> None:
    me = c.agent.self()
    assert me["Config"]["NodeName"] == target.node
    assert me["Member"]["Name"] == target.node
    assert me["Config"]["Datacenter"]


def test_catalog_nodes_and_leader(c: Any, target: Target) -> None:
    _, nodes = c.catalog.nodes()
    assert target.node in [n["Node"] for n in nodes]
    assert c.status.leader()


def test_service_registration_is_visible_everywhere(c: Any, target: Target,
                                                    services: list[str]) -> None:
    sid = register(c, target, services)
    assert c.agent.services()[sid]["Port"] == 8080
    check = c.agent.checks()[f"service:{sid}"]
    assert check["Status"] == "passing" and check["ServiceID"] == sid
    _, entries = c.health.service(sid)
    assert [e["Service"]["ID"] for e in entries] == [sid]
    assert {ch["CheckID"] for ch in entries[0]["Checks"]} >= {"serfHealth", f"service:{sid}"}
    _, listed = c.catalog.service(sid)
    assert listed[0]["ServiceMeta"] == {"role": "test"}
    assert sid in c.catalog.services()[1]
    _, checks = c.health.checks(sid)
    assert [ch["CheckID"] for ch in checks] == [f"service:{sid}"]


def test_ttl_check_without_status_starts_critical(c: Any, target: Target,
                                                  services: list[str]) -> None:
    sid = register(c, target, services, status=None)
    assert catalog_check(c, target.node, f"service:{sid}")["Status"] == "critical"
    c.agent.check.ttl_pass(f"service:{sid}")
    wait_check_status(c, target.node, f"service:{sid}", "passing")


def test_ttl_check_expires_to_critical(c: Any, target: Target, services: list[str]) -> None:
    sid = register(c, target, services, ttl="1s")
    check = wait_check_status(c, target.node, f"service:{sid}", "critical", timeout=4)
    assert check["Output"].startswith("TTL expired")


def test_check_update_sets_status_and_output(target: Target, c: Any,
                                             services: list[str]) -> None:
    sid = register(c, target, services)
    r = target.put(f"/v1/agent/check/update/service:{sid}",
                   json={"Status": "warning", "Output": "slow"})
    assert r.status_code == 200
    check = wait_check_status(c, target.node, f"service:{sid}", "warning")
    assert check["Output"] == "slow"


def test_updating_an_unknown_check_fails(target: Target, c: Any) -> None:
    """404 on current Consul; 1.10 answers 500 'does not have associated TTL': accept both."""
    r = target.put("/v1/agent/check/pass/no-such-check")
    assert r.status_code in (404, 500)
    try:
        ok = c.agent.check.ttl_pass("no-such-check")  # a 404 comes back as False
    except consul.ConsulException:
        ok = False
    assert ok is False


def test_ttl_expiry_invalidates_a_session_listing_it_and_releases_its_lock(
        c: Any, target: Target, services: list[str], sessions: list[str],
        prefix: str) -> None:
    sid = register(c, target, services, ttl="1s")
    session = session_on(c, sessions, sid)
    key = prefix + "leader"
    assert c.kv.put(key, "me", acquire=session) is True
    eventually(lambda: session_gone(c, session), timeout=5)
    e = c.kv.get(key)[1]
    assert "Session" not in e
    assert (e["Value"], e["LockIndex"]) == (b"me", 1)


def test_a_failing_check_invalidates_but_a_warning_does_not(
        c: Any, target: Target, services: list[str], sessions: list[str]) -> None:
    sid = register(c, target, services)
    session = session_on(c, sessions, sid)
    c.agent.check.ttl_warn(f"service:{sid}")
    wait_check_status(c, target.node, f"service:{sid}", "warning")
    assert not session_gone(c, session)
    c.agent.check.ttl_fail(f"service:{sid}")
    eventually(lambda: session_gone(c, session))


def test_deregistering_the_service_invalidates_the_session(
        c: Any, target: Target, services: list[str], sessions: list[str]) -> None:
    sid = register(c, target, services)
    session = session_on(c, sessions, sid)
    assert c.agent.service.deregister(sid) is True
    eventually(lambda: session_gone(c, session))
    assert f"service:{sid}" not in c.agent.checks()


def test_reregistering_keeps_check_status_and_sessions(
        c: Any, target: Target, services: list[str], sessions: list[str]) -> None:
    sid = register(c, target, services)
    session = session_on(c, sessions, sid)
    # Same registration again, this time without a Status: the check stays passing.
    c.agent.service.register(sid, service_id=sid, port=8080, check={"TTL": "30s"})
    time.sleep(0.3)
    assert catalog_check(c, target.node, f"service:{sid}")["Status"] == "passing"
    assert not session_gone(c, session)


def test_node_maintenance_leaves_the_lock_held(
        c: Any, target: Target, services: list[str], sessions: list[str],
        prefix: str) -> None:
    sid = register(c, target, services)
    session = session_on(c, sessions, sid)
    c.kv.put(prefix + "leader", "me", acquire=session)
    assert c.agent.maintenance(True, "draining for a test") is True
    check = eventually(lambda: catalog_check(c, target.node, "_node_maintenance"))
    assert check["Status"] == "critical" and check["Notes"] == "draining for a test"
    eventually(lambda: c.health.service(sid, passing=True)[1] == [])
    assert not session_gone(c, session)
    assert c.kv.get(prefix + "leader")[1]["Session"] == session
    c.agent.maintenance(False)
    eventually(lambda: c.health.service(sid, passing=True)[1])
    assert "_node_maintenance" not in c.agent.checks()


def test_service_maintenance(c: Any, target: Target, services: list[str],
                             sessions: list[str]) -> None:
    sid = register(c, target, services)
    session = session_on(c, sessions, sid)
    assert c.agent.service.maintenance(sid, True, "upgrade") is True
    check = eventually(lambda: catalog_check(c, target.node, f"_service_maintenance:{sid}"))
    assert check["Status"] == "critical" and check["ServiceID"] == sid
    assert not session_gone(c, session)
    c.agent.service.maintenance(sid, False)
    eventually(lambda: catalog_check(c, target.node, f"_service_maintenance:{sid}") is None)


def test_health_service_blocks_until_a_check_changes(c: Any, target: Target,
                                                     services: list[str]) -> None:
    sid = register(c, target, services)
    index, _ = c.health.service(sid)
    threading.Timer(0.3, lambda: target.client().agent.check.ttl_fail(f"service:{sid}")).start()
    blocking = target.client(timeout=30)
    deadline = time.monotonic() + 10
    statuses: set[str] = set()
    while "critical" not in statuses and time.monotonic() < deadline:
        index, entries = blocking.health.service(sid, index=index, wait="5s")
        statuses = {ch["Status"] for e in entries for ch in e["Checks"]
                    if ch["CheckID"] == f"service:{sid}"}
    assert "critical" in statuses
