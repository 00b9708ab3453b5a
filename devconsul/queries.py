"""Read-side views: health, catalog and agent endpoints (agent/health_endpoint.go,
agent/catalog_endpoint.go, agent/agent_endpoint.go). Each returns (index, JSON body)."""

from __future__ import annotations

from devconsul.model import DATACENTER, PASSING, Json, Service
from devconsul.state import State

CATALOG_TABLES = ("nodes", "services", "checks")


def _catalog_index(st: State) -> int:
    return st.max_index(*CATALOG_TABLES)


def _services_named(st: State, name: str) -> list[Service]:
    return [s for _, s in sorted(st.services.items()) if s.name == name]


def health_service(st: State, name: str, passing: bool, tag: str = "") -> tuple[int, list[Json]]:
    out: list[Json] = []
    for svc in _services_named(st, name):
        if tag and tag not in svc.tags:
            continue
        checks = [c for c in st.node_checks(svc.node) if not c.service_id or c.service_id == svc.id]
        # ?passing drops every entry with any check not passing (filterNonPassing).
        if passing and any(c.status != PASSING for c in checks):
            continue
        out.append({
            "Node": st.nodes[svc.node].to_json(),
            "Service": svc.to_json(),
            "Checks": [c.to_json() for c in checks],
        })
    return _catalog_index(st), out


def health_node(st: State, node: str) -> tuple[int, list[Json]]:
    return _catalog_index(st), [c.to_json() for c in st.node_checks(node)]


def health_checks(st: State, service: str) -> tuple[int, list[Json]]:
    return _catalog_index(st), [c.to_json() for _, c in sorted(st.checks.items())
                                if c.service_name == service and c.service_id]


def health_state(st: State, state: str) -> tuple[int, list[Json]]:
    return _catalog_index(st), [c.to_json() for _, c in sorted(st.checks.items())
                                if state == "any" or c.status == state]


def catalog_nodes(st: State) -> tuple[int, list[Json]]:
    return st.max_index("nodes"), [n.to_json() for _, n in sorted(st.nodes.items())]


def catalog_services(st: State) -> tuple[int, dict[str, list[str]]]:
    out: dict[str, list[str]] = {}
    for _, svc in sorted(st.services.items()):
        tags = out.setdefault(svc.name, [])
        tags.extend(t for t in svc.tags if t not in tags)
    return st.max_index("services", "nodes"), out


def catalog_service(st: State, name: str, tag: str = "") -> tuple[int, list[Json]]:
    out: list[Json] = []
    for svc in _services_named(st, name):
        if tag and tag not in svc.tags:
            continue
        node = st.nodes[svc.node]
        out.append({
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": node.address, "wan": node.address},
            "NodeMeta": {"consul-network-segment": ""},
            "ServiceKind": "",
            "ServiceID": svc.id,
            "ServiceName": svc.name,
            "ServiceTags": list(svc.tags),
            "ServiceAddress": svc.address,
            "ServiceWeights": {"Passing": 1, "Warning": 1},
            "ServiceMeta": dict(svc.meta),
            "ServicePort": svc.port,
            "ServiceEnableTagOverride": svc.enable_tag_override,
            "CreateIndex": svc.create_index,
            "ModifyIndex": svc.modify_index,
        })
    return st.max_index("services", "nodes"), out


def catalog_node(st: State, node: str) -> tuple[int, Json | None]:
    n = st.nodes.get(node)
    if n is None:
        return _catalog_index(st), None
    services = {s.id: s.to_json() for (nn, _), s in sorted(st.services.items()) if nn == node}
    return _catalog_index(st), {"Node": n.to_json(), "Services": services}


def agent_checks(st: State, node: str) -> dict[str, Json]:
    """Agent-local checks: the serfHealth check is the servers', not the agent's."""
    return {c.id: c.to_json() for c in st.node_checks(node) if c.type != "serf"}


def agent_services(st: State, node: str) -> dict[str, Json]:
    return {s.id: s.to_json(with_indexes=False)
            for (n, _), s in sorted(st.services.items()) if n == node}
