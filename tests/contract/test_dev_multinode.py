"""Dev-server-only: several simulated agents, fault injection, serf health, clock steps."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import requests

import consul
from devconsul.testing import DevConsul


def client(address: str, timeout: float = 5.0) -> Any:
    host, port = address.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), timeout=timeout)


@pytest.fixture
def cluster(own_dev: DevConsul) -> tuple[DevConsul, Any, Any]:
    a = client(own_dev.add_agent("node-a"))
    b = client(own_dev.add_agent("node-b"))
    return own_dev, a, b


def test_each_endpoint_is_its_own_node(cluster: tuple[DevConsul, Any, Any]) -> None:
    _, a, b = cluster
    assert a.agent.self()["Config"]["NodeName"] == "node-a"
    assert b.agent.self()["Config"]["NodeName"] == "node-b"
    a.agent.service.register("web", service_id="web-a", check={"TTL": "30s",
                                                                "Status": "passing"})
    assert "web-a" in a.agent.services() and "web-a" not in b.agent.services()
    _, nodes = b.catalog.nodes()
    assert {"devconsul", "node-a", "node-b"} <= {n["Node"] for n in nodes}
    sid = a.session.create()
    assert b.session.info(sid)[1]["Node"] == "node-a"  # defaults to the called agent's node
    _, checks = b.health.node("node-a")
    assert {c["CheckID"] for c in checks} == {"serfHealth", "service:web-a"}


def test_add_agent_is_idempotent(own_dev: DevConsul) -> None:
    first = own_dev.add_agent("node-x")
    assert own_dev.add_agent("node-x") == first


def test_refuse_drops_one_node_while_others_work(cluster: tuple[DevConsul, Any, Any]) -> None:
    dev, a, b = cluster
    a.kv.put("k", "v")
    dev.fault("node-a", "refuse")
    with pytest.raises(requests.exceptions.ConnectionError):
        a.kv.get("k")
    assert b.kv.get("k")[1]["Value"] == b"v"
    dev.fault("node-a", "ok")
    assert a.kv.get("k")[1]["Value"] == b"v"


def test_refuse_cuts_an_open_blocking_query(cluster: tuple[DevConsul, Any, Any]) -> None:
    dev, a, _ = cluster
    index, _ = a.kv.get("blocked")
    blocking = client(dev.agent_address("node-a"), timeout=20)
    threading.Timer(0.5, lambda: dev.fault("node-a", "refuse")).start()
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        blocking.kv.get("blocked", index=index, wait="10s")
    assert time.monotonic() - start < 5
    dev.fault("node-a", "ok")


def test_hang_never_answers_until_lifted(cluster: tuple[DevConsul, Any, Any]) -> None:
    dev, a, b = cluster
    dev.fault("node-a", "hang")
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        client(dev.agent_address("node-a"), timeout=0.5).kv.get("k")
    assert time.monotonic() - start >= 0.5
    assert b.kv.put("k", "still works") is True
    dev.fault("node-a", "ok")
    assert a.kv.get("k")[1]["Value"] == b"still works"


def test_control_api_answers_even_when_the_main_node_is_faulted(own_dev: DevConsul) -> None:
    own_dev.fault(own_dev.node_name, "refuse")
    with pytest.raises(requests.exceptions.ConnectionError):
        client(own_dev.address).kv.get("k")
    own_dev.fault(own_dev.node_name, "ok")
    assert client(own_dev.address).kv.get("k")[1] is None


def test_serf_critical_invalidates_the_nodes_sessions(cluster: tuple[DevConsul, Any, Any]) -> None:
    dev, a, b = cluster
    sa = a.session.create(lock_delay=0)
    sb = b.session.create(lock_delay=0)
    assert a.kv.put("leader", "a", acquire=sa) is True
    dev.serf("node-a", "critical")
    assert b.session.info(sa)[1] is None
    assert b.session.info(sb)[1] is not None
    assert "Session" not in b.kv.get("leader")[1]
    assert b.kv.put("leader", "b", acquire=sb) is True
    members = {m["Name"]: m["Status"] for m in b.agent.members()}
    assert members["node-a"] == 4 and members["node-b"] == 1
    dev.serf("node-a", "passing")
    assert a.session.create()


def test_clock_step_fires_session_ttl(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    sid = c.session.create(ttl=10, lock_delay=0)
    c.kv.put("leader", "me", acquire=sid)
    own_dev.step_clock(15)  # 15 s < 2 x TTL: still alive
    time.sleep(0.1)
    assert c.session.info(sid)[1] is not None
    own_dev.step_clock(6)  # 21 s > 2 x TTL
    deadline = time.monotonic() + 2
    while c.session.info(sid)[1] is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.session.info(sid)[1] is None
    assert "Session" not in c.kv.get("leader")[1]


def test_clock_step_renewal_pushes_the_deadline(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    sid = c.session.create(ttl=10)
    own_dev.step_clock(15)
    c.session.renew(sid)
    own_dev.step_clock(15)
    time.sleep(0.1)
    assert c.session.info(sid)[1] is not None


def test_clock_step_fires_check_ttl_and_lock_delay_ends(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    c.agent.service.register("svc", service_id="svc",
                             check={"TTL": "60s", "Status": "passing"})
    s1 = c.session.create(checks=["serfHealth", "service:svc"], lock_delay=30)
    s2 = c.session.create(lock_delay=0)
    c.kv.put("leader", "one", acquire=s1)
    own_dev.step_clock(61)
    deadline = time.monotonic() + 2
    while c.session.info(s1)[1] is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.agent.checks()["service:svc"]["Output"] == "TTL expired"
    assert c.kv.put("leader", "two", acquire=s2) is False  # 30 s lock-delay
    own_dev.step_clock(31)
    assert c.kv.put("leader", "two", acquire=s2) is True


def test_state_dump(own_dev: DevConsul) -> None:
    c = client(own_dev.address)
    c.kv.put("k", "v")
    state = own_dev.state()
    assert [e["key"] for e in state["kvs"]] == ["k"]
    assert state["endpoints"][own_dev.node_name] == own_dev.port


def test_deregister_critical_service_after_reaps_the_service(own_dev: DevConsul) -> None:
    """Consul raises DeregisterCriticalServiceAfter to at least 1 minute; step past it."""
    c = client(own_dev.address)
    c.agent.service.register("doomed", service_id="doomed",
                             check={"TTL": "1s", "Status": "passing",
                                    "DeregisterCriticalServiceAfter": "1s"})
    deadline = time.monotonic() + 4
    while c.agent.checks()["service:doomed"]["Status"] != "critical":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    own_dev.step_clock(30)
    time.sleep(0.1)
    assert "doomed" in c.agent.services()
    own_dev.step_clock(31)
    deadline = time.monotonic() + 2
    while "doomed" in c.agent.services():
        assert time.monotonic() < deadline
        time.sleep(0.02)
