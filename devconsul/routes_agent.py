"""Agent, health and catalog endpoints (agent/agent_endpoint.go, agent/health_endpoint.go,
agent/catalog_endpoint.go). ``/v1/agent/*`` acts on the node whose endpoint was called."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from devconsul import __version__, catalog, queries
from devconsul.model import CRITICAL, DATACENTER, PASSING, SERF_CHECK_ID, WARNING
from devconsul.state import State
from devconsul.store import Watch
from devconsul.web import Request, Response, consistency

if TYPE_CHECKING:
    from devconsul.app import App

T = TypeVar("T")
CATALOG_WATCH = Watch(tables=queries.CATALOG_TABLES)
SERF_STATUS_ALIVE, SERF_STATUS_FAILED = 1, 4  # serf.MemberStatus


def _member(st: State, node: str) -> dict[str, Any]:
    serf = st.checks.get((node, SERF_CHECK_ID))
    alive = serf is None or serf.status != CRITICAL
    return {
        "Name": node,
        "Addr": "127.0.0.1",
        "Port": 8301,
        "Tags": {"dc": DATACENTER, "role": "consul", "build": __version__, "vsn": "2"},
        "Status": SERF_STATUS_ALIVE if alive else SERF_STATUS_FAILED,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    }


def agent_self(app: App, req: Request, _: str) -> Response:
    def build(st: State) -> dict[str, Any]:
        node = st.nodes[req.node]
        return {
            "Config": {
                "Datacenter": DATACENTER, "PrimaryDatacenter": DATACENTER,
                "NodeName": req.node, "NodeID": node.id, "Server": True,
                "Revision": "devconsul", "Version": __version__,
            },
            "DebugConfig": {"DevMode": True, "NodeName": req.node, "Datacenter": DATACENTER,
                            "SessionTTLMin": "10s"},
            "Coord": None,
            "Member": _member(st, req.node),
            "Stats": {"consul": {"leader": "true", "known_servers": "1", "server": "true"}},
            "Meta": {"consul-network-segment": ""},
        }

    return Response.of_json(app.store.read(build))


def agent_members(app: App, req: Request, _: str) -> Response:
    return Response.of_json(app.store.read(lambda st: [_member(st, n) for n in sorted(st.nodes)]))


def agent_services(app: App, req: Request, _: str) -> Response:
    return Response.of_json(app.store.read(lambda st: queries.agent_services(st, req.node)))


def agent_checks(app: App, req: Request, _: str) -> Response:
    return Response.of_json(app.store.read(lambda st: queries.agent_checks(st, req.node)))


def _ok(app: App, fn: Callable[[State, int, float], object]) -> Response:
    app.store.write(fn)
    return Response(200, b"")


def service_register(app: App, req: Request, _: str) -> Response:
    body = req.json_object()
    return _ok(app, lambda st, idx, now: catalog.register_service(st, idx, now, req.node, body))


def service_deregister(app: App, req: Request, sid: str) -> Response:
    return _ok(app, lambda st, idx, now: catalog.deregister_service(st, idx, now, req.node, sid))


def service_maintenance(app: App, req: Request, sid: str) -> Response:
    enable, reason = req.bool_param("enable"), req.param("reason")
    return _ok(app, lambda st, idx, now: catalog.set_service_maintenance(
        st, idx, now, req.node, sid, enable, reason))


def node_maintenance(app: App, req: Request, _: str) -> Response:
    enable, reason = req.bool_param("enable"), req.param("reason")
    return _ok(app, lambda st, idx, now: catalog.set_node_maintenance(
        st, idx, now, req.node, enable, reason))


def check_register(app: App, req: Request, _: str) -> Response:
    body = req.json_object()
    return _ok(app, lambda st, idx, now: catalog.register_check(st, idx, now, req.node, body))


def check_deregister(app: App, req: Request, cid: str) -> Response:
    return _ok(app, lambda st, idx, now: catalog.deregister_check(st, idx, now, req.node, cid))


def _ttl_update(status: str) -> Callable[[App, Request, str], Response]:
    def handler(app: App, req: Request, cid: str) -> Response:
        note = req.param("note")
        return _ok(app, lambda st, idx, now: catalog.update_ttl(
            st, idx, now, req.node, cid, status, note))

    return handler


check_pass = _ttl_update(PASSING)
check_warn = _ttl_update(WARNING)
check_fail = _ttl_update(CRITICAL)


def check_update(app: App, req: Request, cid: str) -> Response:
    body = catalog.norm(req.json_object())
    status, output = str(body.get("status") or ""), str(body.get("output") or "")
    return _ok(app, lambda st, idx, now: catalog.update_ttl(
        st, idx, now, req.node, cid, status, output))


# -- health and catalog: blocking reads of the catalog tables ---------------------------------

def _blocking(app: App, req: Request, fn: Callable[[State], tuple[int, T]]) -> Response:
    mode = consistency(req)
    min_index, wait = req.blocking()

    def query(st: State) -> tuple[int, T, Watch]:
        index, body = fn(st)
        return index, body, CATALOG_WATCH

    index, body = app.store.blocking(query, min_index, wait)
    return Response.of_json(body).set_meta(index, mode)


def health_service(app: App, req: Request, name: str) -> Response:
    passing, tag = req.has("passing"), req.param("tag")
    return _blocking(app, req, lambda st: queries.health_service(st, name, passing, tag))


def health_node(app: App, req: Request, node: str) -> Response:
    return _blocking(app, req, lambda st: queries.health_node(st, node))


def health_checks(app: App, req: Request, service: str) -> Response:
    return _blocking(app, req, lambda st: queries.health_checks(st, service))


def health_state(app: App, req: Request, state: str) -> Response:
    return _blocking(app, req, lambda st: queries.health_state(st, state))


def catalog_nodes(app: App, req: Request, _: str) -> Response:
    return _blocking(app, req, queries.catalog_nodes)


def catalog_services(app: App, req: Request, _: str) -> Response:
    return _blocking(app, req, queries.catalog_services)


def catalog_service(app: App, req: Request, name: str) -> Response:
    tag = req.param("tag")
    return _blocking(app, req, lambda st: queries.catalog_service(st, name, tag))


def catalog_node(app: App, req: Request, node: str) -> Response:
    return _blocking(app, req, lambda st: queries.catalog_node(st, node))


def catalog_datacenters(app: App, req: Request, _: str) -> Response:
    return Response.of_json([DATACENTER])
