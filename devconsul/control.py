"""The ``/_dev/`` control API: agent endpoints, faults, serf health, clock, state dump.

Dev-server only; a real Consul agent has none of it. Always answers, whatever the faults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devconsul import catalog, persist
from devconsul.durations import parse_duration
from devconsul.errors import BadRequest, NotFound
from devconsul.model import CRITICAL, PASSING
from devconsul.state import State
from devconsul.web import Request, Response

if TYPE_CHECKING:
    from devconsul.app import App


def agents_put(app: App, req: Request, node: str) -> Response:
    if not node:
        raise BadRequest("Missing node name")
    try:
        port = int(req.param("port", "0"))
    except ValueError as exc:
        raise BadRequest("port must be an integer") from exc
    return Response.of_json({"node": node, "port": app.add_agent(node, port)})


def agents_get(app: App, req: Request, _: str) -> Response:
    return Response.of_json(app.endpoints())


def fault(app: App, req: Request, node: str) -> Response:
    if node not in app.endpoints():
        raise NotFound(f"no agent endpoint for node {node!r}")
    try:
        app.faults.set(node, req.param("mode", "ok"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    return Response.of_json({"node": node, "mode": app.faults.mode(node)})


def serf(app: App, req: Request, node: str) -> Response:
    status = req.param("status", PASSING)
    if status not in (PASSING, CRITICAL):
        raise BadRequest("status must be passing or critical")
    app.store.write(lambda st, idx, now: catalog.set_serf(st, idx, now, node, status))
    return Response.of_json({"node": node, "status": status})


def clock(app: App, req: Request, _: str) -> Response:
    try:
        step = parse_duration(req.param("step", "0s"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if step < 0:
        raise BadRequest("the clock only steps forward")
    return Response.of_json({"offset": app.store.step_clock(step)})


def state(app: App, req: Request, _: str) -> Response:
    def dump(st: State) -> dict[str, Any]:
        now = app.store.clock.now()
        out = persist.dump(st)
        out["lock_delays"] = {k: round(v - now, 3) for k, v in st.lock_delays.items() if v > now}
        out["session_ttl_remaining"] = {
            s.id: round(s.deadline - now, 3) for s in st.sessions.values() if s.deadline}
        out["clock_offset"] = app.store.clock.offset
        return out

    body = app.store.read(dump)
    body["faults"] = app.faults.snapshot()
    body["endpoints"] = app.endpoints()
    body["blocking_queries"] = app.store.waiter_count()
    return Response.of_json(body)
