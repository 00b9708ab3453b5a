"""Nodes, services and health checks: what each simulated agent registers and Consul's catalog
holds (agent/agent.go, agent/checks/check.go CheckTTL, agent/consul/state/catalog.go).

The dev server has no anti-entropy: an agent's change reaches the catalog in the same apply.
"""

from __future__ import annotations

import uuid
from typing import Any

from devconsul import sessions
from devconsul.durations import parse_duration
from devconsul.errors import BadRequest, NotFound
from devconsul.model import (
    CRITICAL,
    DEFAULT_MAINT_REASON,
    DEFAULT_SERVICE_MAINT_REASON,
    NODE_MAINT_CHECK_ID,
    PASSING,
    SERF_ALIVE_OUTPUT,
    SERF_CHECK_ID,
    SERF_CHECK_NAME,
    SERF_DEAD_OUTPUT,
    SERVICE_MAINT_PREFIX,
    WARNING,
    Check,
    Json,
    Node,
    Service,
)
from devconsul.state import State

# agent/config default check_deregister_interval_min: shorter DeregisterCriticalServiceAfter
# values are raised to this.
MIN_DEREGISTER_AFTER = 60.0
TTL_EXPIRED = "TTL expired"  # agent/checks/check.go CheckTTL.getExpiredOutput


def norm(body: Json) -> dict[str, Any]:
    """Consul decodes bodies case-insensitively and accepts snake_case aliases."""
    return {k.replace("_", "").lower(): v for k, v in body.items()}


def ensure_node(st: State, idx: int, name: str, address: str = "127.0.0.1") -> Node:
    node = st.nodes.get(name)
    if node is None:
        node = Node(name, str(uuid.uuid4()), address, idx, idx)
        st.nodes[name] = node
        st.touch("nodes", idx)
        serf = Check(node=name, id=SERF_CHECK_ID, name=SERF_CHECK_NAME, status=PASSING,
                     notes="", output=SERF_ALIVE_OUTPUT, service_id="", service_name="",
                     service_tags=[], type="serf", ttl=0.0, deregister_after=0.0,
                     create_index=idx, modify_index=idx)
        st.checks[(name, SERF_CHECK_ID)] = serf
        st.touch("checks", idx)
    return node


def set_status(st: State, idx: int, now: float, check: Check, status: str, output: str) -> None:
    """Update a check in the catalog; a critical check invalidates the sessions listing it."""
    if status not in (PASSING, WARNING, CRITICAL):
        raise BadRequest(f'Invalid check status: "{status}"')
    was = check.status
    if status == check.status and output == check.output:
        return
    check.status, check.output = status, output
    check.modify_index = idx
    st.touch("checks", idx)
    if status == CRITICAL:
        if was != CRITICAL and check.deregister_after > 0 and check.service_id:
            check.reap_deadline = now + max(check.deregister_after, MIN_DEREGISTER_AFTER)
            st.schedule(check.reap_deadline, "reap", (check.node, check.id))
        sessions.invalidate_for_check(st, idx, now, check.node, check.id)
    else:
        check.reap_deadline = 0.0


def set_serf(st: State, idx: int, now: float, node: str, status: str) -> None:
    check = st.checks.get((node, SERF_CHECK_ID))
    if check is None:
        raise NotFound(f"Unknown node {node!r}")
    output = SERF_ALIVE_OUTPUT if status == PASSING else SERF_DEAD_OUTPUT
    set_status(st, idx, now, check, status, output)


def agent_check(st: State, node: str, check_id: str) -> Check:
    """An agent-local check (serfHealth belongs to the servers, not the agent)."""
    check = st.checks.get((node, check_id))
    if check is None or check.id == SERF_CHECK_ID:
        raise NotFound(f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                       "not the check name.")
    return check


def update_ttl(st: State, idx: int, now: float, node: str, check_id: str, status: str,
               output: str) -> None:
    """/v1/agent/check/{pass,warn,fail,update}: CheckTTL.SetStatus resets the TTL timer."""
    check = agent_check(st, node, check_id)
    if check.ttl <= 0:
        raise NotFound(f'CheckID "{check_id}" does not have associated TTL')
    check.last_output = output
    check.ttl_deadline = now + check.ttl
    st.schedule(check.ttl_deadline, "check", (check.node, check.id))
    set_status(st, idx, now, check, status, output)


def ttl_fired(st: State, idx: int, now: float, node: str, check_id: str, when: float) -> None:
    check = st.checks.get((node, check_id))
    if check is None or check.ttl_deadline != when:
        return
    output = TTL_EXPIRED
    if check.last_output:
        output = f"{TTL_EXPIRED} (last output before timeout follows): {check.last_output}"
    check.ttl_deadline = 0.0  # a TTL check stays critical until updated again
    set_status(st, idx, now, check, CRITICAL, output)


def reap_fired(st: State, idx: int, now: float, node: str, check_id: str, when: float) -> None:
    check = st.checks.get((node, check_id))
    if check is None or check.reap_deadline != when or check.status != CRITICAL:
        return
    if (node, check.service_id) in st.services:
        deregister_service(st, idx, now, node, check.service_id)


def _check_from_def(node: str, raw: Json, service: Service | None, default_id: str,
                    idx: int) -> Check:
    d = norm(raw)
    cid = str(d.get("checkid") or d.get("id") or default_id)
    if not cid:
        cid = str(d.get("name") or "")
    if not cid:
        raise BadRequest("Missing check ID")
    name = str(d.get("name") or (f"Service '{service.name}' check" if service else cid))
    ttl = parse_duration(str(d["ttl"])) if d.get("ttl") else 0.0
    dereg = d.get("deregistercriticalserviceafter")
    status = str(d.get("status") or CRITICAL)
    kind = "ttl" if ttl else next((k for k in ("http", "tcp", "grpc", "args", "script",
                                               "dockercontainerid") if d.get(k)), "")
    definition = {k: v for k, v in raw.items() if k.lower() not in ("status", "name", "id")}
    return Check(
        node=node, id=cid, name=name, status=status, notes=str(d.get("notes") or ""),
        output="", service_id=service.id if service else str(d.get("serviceid") or ""),
        service_name=service.name if service else "",
        service_tags=list(service.tags) if service else [], type=kind, ttl=ttl,
        deregister_after=parse_duration(str(dereg)) if dereg else 0.0,
        create_index=idx, modify_index=idx, definition=definition,
    )


def add_check(st: State, idx: int, now: float, check: Check) -> None:
    """Agent.addCheck: a re-registered check keeps its status and output; a TTL restarts."""
    existing = st.checks.get((check.node, check.id))
    if existing is not None:
        check.status, check.output = existing.status, existing.output
        check.last_output = existing.last_output
        check.create_index = existing.create_index
        check.reap_deadline = existing.reap_deadline
        same = existing.to_json() | {"ModifyIndex": 0} == check.to_json() | {"ModifyIndex": 0}
        check.modify_index = existing.modify_index if same else idx
    elif check.status not in (PASSING, WARNING, CRITICAL):
        raise BadRequest(f'Invalid check status: "{check.status}"')
    st.checks[(check.node, check.id)] = check
    if existing is None or check.modify_index == idx:
        st.touch("checks", idx)
    if check.ttl > 0:
        check.ttl_deadline = now + check.ttl
        st.schedule(check.ttl_deadline, "check", (check.node, check.id))
    if check.status == CRITICAL and existing is None and check.service_id \
            and check.deregister_after > 0:
        check.reap_deadline = now + max(check.deregister_after, MIN_DEREGISTER_AFTER)
        st.schedule(check.reap_deadline, "reap", (check.node, check.id))


def register_service(st: State, idx: int, now: float, node: str, body: Json) -> None:
    d = norm(body)
    name = str(d.get("name") or "")
    if not name:
        raise BadRequest("Missing service name")
    sid = str(d.get("id") or name)
    existing = st.services.get((node, sid))
    svc = Service(
        node=node, id=sid, name=name, tags=[str(t) for t in d.get("tags") or []],
        address=str(d.get("address") or ""), port=int(d.get("port") or 0),
        meta={str(k): str(v) for k, v in (d.get("meta") or {}).items()},
        enable_tag_override=bool(d.get("enabletagoverride")),
        create_index=existing.create_index if existing else idx,
        modify_index=idx,
    )
    if existing is not None and existing.same_content(svc):
        svc.modify_index = existing.modify_index
    else:
        st.touch("services", idx)
    st.services[(node, sid)] = svc
    defs: list[Json] = []
    if isinstance(d.get("check"), dict):
        defs.append(d["check"])
    defs.extend(c for c in d.get("checks") or [] if isinstance(c, dict))
    wanted: set[str] = set()
    for n, raw in enumerate(defs, start=1):
        default_id = f"service:{sid}" if len(defs) == 1 else f"service:{sid}:{n}"
        check = _check_from_def(node, raw, svc, default_id, idx)
        wanted.add(check.id)
        add_check(st, idx, now, check)
    # Checks of the old definition that the new one drops go away (agent.go AddService).
    for old in st.service_checks(node, sid):
        if old.id not in wanted and not old.id.startswith(SERVICE_MAINT_PREFIX):
            remove_check(st, idx, now, node, old.id)


def remove_check(st: State, idx: int, now: float, node: str, check_id: str) -> None:
    if st.checks.pop((node, check_id), None) is not None:
        st.touch("checks", idx)
        sessions.invalidate_for_check(st, idx, now, node, check_id)


def deregister_service(st: State, idx: int, now: float, node: str, service_id: str) -> None:
    if (node, service_id) not in st.services:
        raise NotFound(f'Unknown service ID "{service_id}". Ensure that the service ID is '
                       "passed, not the service name.")
    del st.services[(node, service_id)]
    st.touch("services", idx)
    for check in st.service_checks(node, service_id):
        remove_check(st, idx, now, node, check.id)


def register_check(st: State, idx: int, now: float, node: str, body: Json) -> None:
    d = norm(body)
    svc = None
    if d.get("serviceid"):
        svc = st.services.get((node, str(d["serviceid"])))
        if svc is None:
            raise NotFound(f'ServiceID "{d["serviceid"]}" does not exist')
    add_check(st, idx, now, _check_from_def(node, body, svc, "", idx))


def deregister_check(st: State, idx: int, now: float, node: str, check_id: str) -> None:
    agent_check(st, node, check_id)
    remove_check(st, idx, now, node, check_id)


def set_node_maintenance(st: State, idx: int, now: float, node: str, enable: bool,
                         reason: str) -> None:
    """agent.EnableNodeMaintenance: a separate critical check; sessions are left alone since
    none lists it."""
    if not enable:
        remove_check(st, idx, now, node, NODE_MAINT_CHECK_ID)
        return
    if (node, NODE_MAINT_CHECK_ID) in st.checks:
        return
    st.checks[(node, NODE_MAINT_CHECK_ID)] = Check(
        node=node, id=NODE_MAINT_CHECK_ID, name="Node Maintenance Mode", status=CRITICAL,
        notes=reason or DEFAULT_MAINT_REASON, output="", service_id="", service_name="",
        service_tags=[], type="maintenance", ttl=0.0, deregister_after=0.0,
        create_index=idx, modify_index=idx)
    st.touch("checks", idx)


def set_service_maintenance(st: State, idx: int, now: float, node: str, service_id: str,
                            enable: bool, reason: str) -> None:
    svc = st.services.get((node, service_id))
    if svc is None:
        raise NotFound(f'Unknown service ID "{service_id}". Ensure that the service ID is '
                       "passed, not the service name.")
    cid = SERVICE_MAINT_PREFIX + service_id
    if not enable:
        remove_check(st, idx, now, node, cid)
        return
    if (node, cid) in st.checks:
        return
    st.checks[(node, cid)] = Check(
        node=node, id=cid, name="Service Maintenance Mode", status=CRITICAL,
        notes=reason or DEFAULT_SERVICE_MAINT_REASON, output="", service_id=svc.id,
        service_name=svc.name, service_tags=list(svc.tags), type="maintenance", ttl=0.0,
        deregister_after=0.0, create_index=idx, modify_index=idx)
    st.touch("checks", idx)
